"""Sampled tokens per second and peak memory of l3m's samplers (hf, static, paged), against the memory-bandwidth limit.

    python benchmarks/sampling/bench_samplers.py                  # CPU: SmolLM2-135M-Instruct, 4 prompts x 4 x 64
    python benchmarks/sampling/bench_samplers.py --gpu            # GPU: a 1.0B random Llama, bf16, 32 x 128, 64 x 512
    python benchmarks/sampling/bench_samplers.py --gpu --model DIR --name gpu-real   # GPU: a real model

Each sampler runs in its own process (its peak memory is its own), on the same prompts in the same order, through
:func:`l3m.sampling.generate` exactly as training calls it. The rounds are interleaved, sampler after sampler, so
that a slower or faster spell of a shared machine falls on every sampler alike: a warm-up round each, then the timed
rounds (round r is seeded with r in every sampler). Sampled tokens are the tokens each sample keeps, its end token
included: the tokens l3m scores.

The bandwidth limit: a decode step reads every weight once, so it takes at least ``weight bytes / bandwidth``
seconds, and ``B`` sequences can be sampled at most ``B / that`` tokens per second. The bandwidth is ``--bandwidth``;
by default 3.35e12 B/s (an H100's HBM3) with ``--gpu``, and on a CPU the copy rate of a 256 MiB buffer measured
here (bytes read plus bytes written per second, with the sampling's thread count).

The compute limit beside it: the FLOP rate of the model's largest weight matrix applied to as many vectors as
there are sequences (a decode step's shape) bounds the tokens/s at ``rate / (2 * parameters)``. On a CPU this is
the lower of the two limits.

Peak memory, over the timed rounds: on a CPU the peak resident set size (``VmHWM`` of ``/proc/self/status``, reset
after the warm-up), with the resident set size after the warm-up beside it (the weights are mapped from their file
and only resident once a forward pass has read them); on a GPU ``torch.cuda.max_memory_allocated`` (the weights
included), with the memory allocated after the warm-up beside it.

Writes ``results/<name>.json`` (every number) and ``results/<name>.md`` (the table) beside this script.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/random_llama.py

HERE = Path(__file__).resolve().parent
SAMPLERS = ("hf", "static", "paged")
MARK = "@@bench "  # the workers' result lines on stdout start with this


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="the GPU preset (a CUDA device is required)")
    p.add_argument("--model", default=None, help="model name or directory (CPU default 'default'; GPU: random 1.0B)")
    p.add_argument("--tokenizer", default=None, help="tokenizer of the random GPU model (default: the default model's)")
    p.add_argument("--samplers", default=",".join(SAMPLERS), help="comma-separated samplers to compare")
    p.add_argument("--sizes", default=None, help="SEQUENCESxNEW_TOKENS,... (CPU 16x64; GPU 32x128,64x512)")
    p.add_argument("--k", type=int, default=4, help="samples per prompt (prompts = sequences / k)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per sampler and size")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (compilation, graph capture)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (the CPU preset's machine is shared)")
    p.add_argument("--bandwidth", type=float, default=None, help="memory bandwidth in B/s (default: see above)")
    p.add_argument("--name", default=None, help="results file name (default cpu, or gpu)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one sampler
    p.add_argument("--size", default=None, help=argparse.SUPPRESS)  # internal: the worker's size
    return p.parse_args(argv)


def sizes_of(ns) -> list[tuple[int, int]]:
    text = ns.sizes or ("32x128,64x512" if ns.gpu else "16x64")
    out = []
    for part in text.split(","):
        seqs, new = (int(x) for x in part.lower().split("x"))
        if seqs % ns.k:
            raise SystemExit(f"--sizes: {seqs} sequences is not a multiple of k={ns.k}")
        out.append((seqs, new))
    return out


# ---------------------------------------------------------------------------------------------------- the worker


def random_llama(tokenizer_dir: str | None):
    """The 1.0B random Llama of scripts/gpu_check.py, bf16 on the GPU, with the default model's tokenizer."""
    import torch
    from random_llama import random_llama_1b
    from transformers import AutoTokenizer

    from l3m.models import default_model_path

    tok = AutoTokenizer.from_pretrained(tokenizer_dir or default_model_path())
    return random_llama_1b(tok, "cuda").to(torch.bfloat16), tok


def proc_status(field: str) -> int:
    """A ``kB`` field of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker(ns) -> None:
    import torch

    from l3m.data import load_examples, pad, prompt_ids
    from l3m.logprobs import eos_token_ids
    from l3m.models import load_causal_lm, load_tokenizer
    from l3m.sampling import generate, generation_config, split_completions

    cuda = ns.gpu
    if not cuda:
        torch.set_num_threads(ns.threads)
    seqs, new = (int(x) for x in ns.size.split("x"))
    if cuda and ns.model is None:
        model, tok = random_llama(ns.tokenizer)
    else:
        name = ns.model or "default"
        tok = load_tokenizer(name)
        model = load_causal_lm(name, dtype="bfloat16" if cuda else None)
        if cuda:
            model = model.cuda()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    examples = load_examples("builtin")
    n_prompts = seqs // ns.k
    ids = [prompt_ids(tok, examples[i % len(examples)].prompt)[-256:] for i in range(n_prompts)]
    p_ids, p_mask = pad(ids, tok.pad_token_id, "left"), pad([[1] * len(x) for x in ids], 0, "left")
    eos = eos_token_ids(model, tok)
    config = generation_config(new, ns.temperature, eos, tok.pad_token_id)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    matmul = matmul_rate(model, seqs, cuda)
    rss_reset = False
    emit(
        {
            "event": "ready",
            "weight_bytes": weight_bytes,
            "params": sum(p.numel() for p in model.parameters()),
            "dtype": str(next(model.parameters()).dtype),
            "attn": getattr(model.config, "_attn_implementation", None),
            "prompt_tokens": [len(x) for x in ids],
            "matmul_flops": matmul,
        }
    )
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "round":
            torch.manual_seed(cmd["seed"])
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = generate(model, p_ids, p_mask, ns.k, config, ns.worker)
            if cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            comps = split_completions(out, eos)
            scored = comps.scored_ids()
            emit(
                {
                    "event": "round",
                    "seconds": dt,
                    "tokens": sum(len(s) for s in scored),
                    "mean_length": sum(comps.lengths) / len(scored),
                    "truncated": sum(comps.truncated) / len(scored),
                    "samples": hash(tuple(map(tuple, scored))),
                }
            )
        elif cmd["op"] == "reset":  # after the warm-up: the peaks of the timed rounds from here
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            rss_reset = reset_peak_rss()
            emit({"event": "reset", "resident_rss": proc_status("VmRSS"), "allocated_cuda": allocated(cuda)})
        elif cmd["op"] == "peak":
            peak = {"peak_rss": proc_status("VmHWM"), "rss_reset": rss_reset}
            if cuda:
                peak["peak_cuda"] = torch.cuda.max_memory_allocated()
            emit({"event": "peak", **peak})
        else:
            return


def allocated(cuda: bool) -> int | None:
    import torch

    return torch.cuda.memory_allocated() if cuda else None


def matmul_rate(model, rows: int, cuda: bool) -> float:
    """FLOP/s of the model's largest matrix applied to ``rows`` vectors, as in a decode step (the best of 5)."""
    import torch

    w = max((p for p in model.parameters() if p.dim() == 2), key=lambda p: p.numel()).detach()
    x = torch.randn(rows, w.shape[1], dtype=w.dtype, device=w.device)
    best = float("inf")
    for _ in range(6):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.nn.functional.linear(x, w)
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * rows * w.numel() / best


def emit(obj: dict) -> None:
    print(MARK + json.dumps(obj), flush=True)


# ---------------------------------------------------------------------------------------------------- the driver


class Worker:
    def __init__(self, ns, sampler: str, size: str):
        argv = [sys.executable, __file__, "--worker", sampler, "--size", size, "--k", str(ns.k)]
        argv += ["--temperature", str(ns.temperature), "--threads", str(ns.threads)]
        argv += ["--gpu"] if ns.gpu else []
        for flag, value in (("--model", ns.model), ("--tokenizer", ns.tokenizer)):
            argv += [flag, value] if value else []
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        if not ns.gpu:
            env["OMP_NUM_THREADS"] = str(ns.threads)
        self.sampler = sampler
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = self.read("ready")

    def read(self, event: str) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                obj = json.loads(line[len(MARK) :])
                if obj["event"] == event:
                    return obj
        raise RuntimeError(f"the {self.sampler} worker exited (status {self.proc.wait()})")

    def ask(self, op: str, event: str, **kw) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        return self.read(event)

    def close(self) -> None:
        self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
        self.proc.stdin.close()
        self.proc.wait(timeout=120)


def cpu_bandwidth(threads: int) -> float:
    """Bytes read plus bytes written per second, copying a 256 MiB float buffer (the median of 7 copies)."""
    import torch

    torch.set_num_threads(threads)
    src = torch.ones(64 * 2**20)
    dst = torch.empty_like(src)
    dst.copy_(src)
    rates = []
    for _ in range(7):
        t0 = time.perf_counter()
        dst.copy_(src)
        rates.append(2 * src.numel() * src.element_size() / (time.perf_counter() - t0))
    return statistics.median(rates)


def run_size(ns, samplers: list[str], seqs: int, new: int, bandwidth: float) -> dict:
    size = f"{seqs}x{new}"
    print(f"\n== {size}: {seqs // ns.k} prompts x {ns.k} samples x {new} new tokens", flush=True)
    workers = {s: Worker(ns, s, size) for s in samplers}
    try:
        rounds: dict[str, list[dict]] = {s: [] for s in samplers}
        warm: dict[str, list[float]] = {s: [] for s in samplers}
        for r in range(ns.warmup):
            for s, w in workers.items():
                warm[s].append(w.ask("round", "round", seed=1000 + r)["seconds"])
        resident = {s: w.ask("reset", "reset") for s, w in workers.items()}
        for r in range(ns.rounds):
            for s, w in workers.items():
                res = w.ask("round", "round", seed=r)
                rounds[s].append(res)
                rate = res["tokens"] / res["seconds"]
                print(f"  round {r} {s:>6}: {res['seconds']:.2f} s, {rate:.1f} tok/s", flush=True)
        peaks = {s: w.ask("peak", "peak") for s, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()
    info = workers[samplers[0]].info
    step_s = info["weight_bytes"] / bandwidth
    limit = seqs / step_s
    rows = []
    for s in samplers:
        secs = [x["seconds"] for x in rounds[s]]
        toks = [x["tokens"] for x in rounds[s]]
        rate = sum(toks) / sum(secs)
        rows.append(
            {
                "sampler": s,
                "tokens_per_s": rate,
                "round_s": secs,
                "median_round_s": statistics.median(secs),
                "tokens_per_round": toks,
                "warmup_s": warm[s],
                "mean_length": statistics.mean(x["mean_length"] for x in rounds[s]),
                "truncated": statistics.mean(x["truncated"] for x in rounds[s]),
                "share_of_limit": rate / limit,
                "share_of_compute_limit": rate * 2 * info["params"] / info["matmul_flops"],
                "peak_memory_bytes": peaks[s].get("peak_cuda", peaks[s]["peak_rss"]),
                "resident_bytes": resident[s]["allocated_cuda"] or resident[s]["resident_rss"],
                "peak": peaks[s],
                "same_samples_as_hf": [x["samples"] for x in rounds[s]] == [x["samples"] for x in rounds.get("hf", [])],
            }
        )
    base = next((r["tokens_per_s"] for r in rows if r["sampler"] == "hf"), None)
    for r in rows:
        r["vs_hf"] = r["tokens_per_s"] / base if base else None
    return {
        "size": size,
        "sequences": seqs,
        "prompts": seqs // ns.k,
        "k": ns.k,
        "max_new_tokens": new,
        "prompt_tokens": info["prompt_tokens"],
        "weight_bytes": info["weight_bytes"],
        "params": info["params"],
        "dtype": info["dtype"],
        "attn_implementation": info["attn"],
        "decode_step_limit_s": step_s,
        "tokens_per_s_limit": limit,
        "matmul_flops": info["matmul_flops"],
        "tokens_per_s_compute_limit": info["matmul_flops"] / (2 * info["params"]),
        "samplers": rows,
    }


def markdown(result: dict) -> str:
    cpu = not result["gpu"]
    lines = [
        f"# Samplers: {result['model']} ({result['device']})",
        "",
        f"Temperature {result['temperature']}, {result['rounds']} timed rounds after {result['warmup']} warm-up "
        f"round(s), interleaved; bandwidth {result['bandwidth'] / 1e9:.1f} GB/s ({result['bandwidth_source']})"
        + (f", {result['threads']} CPU thread(s)" if cpu else "")
        + ".",
        "",
    ]
    mem = "peak RSS (after warm-up)" if cpu else "peak GPU memory (after warm-up)"
    for size in result["sizes"]:
        lines += [
            f"## {size['prompts']} prompts x {size['k']} samples x {size['max_new_tokens']} new tokens",
            "",
            f"Weights {size['weight_bytes'] / 1e9:.2f} GB ({size['dtype']}): a decode step takes at least "
            f"{size['decode_step_limit_s'] * 1e3:.2f} ms, so {size['sequences']} sequences at most "
            f"{size['tokens_per_s_limit']:.0f} tokens/s. Compute: the largest weight matrix applied to "
            f"{size['sequences']} vectors runs at {size['matmul_flops'] / 1e9:.1f} GFLOP/s here; at 2 FLOPs per "
            f"parameter and token, that allows at most {size['tokens_per_s_compute_limit']:.0f} tokens/s.",
            "",
            "| sampler | sampled tokens/s | vs hf | share of the bandwidth limit | share of the compute limit "
            f"| median round (s) | first round (s) | mean length | cut off | {mem} |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in size["samplers"]:
            m = f"{r['peak_memory_bytes'] / 2**20:.0f} MiB ({r['resident_bytes'] / 2**20:.0f} MiB)"
            first = f"{r['warmup_s'][0]:.2f}" if r["warmup_s"] else "-"
            lines.append(
                f"| {r['sampler']} | {r['tokens_per_s']:.1f} | {r['vs_hf']:.2f}x | {100 * r['share_of_limit']:.1f}% "
                f"| {100 * r['share_of_compute_limit']:.1f}% "
                f"| {r['median_round_s']:.2f} | {first} | {r['mean_length']:.1f} | {100 * r['truncated']:.0f}% | {m} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> dict | None:
    ns = parse_args(argv)
    if ns.worker:
        worker(ns)
        return None
    import torch

    if ns.gpu and not torch.cuda.is_available():
        sys.exit("bench_samplers: --gpu needs a CUDA device")
    samplers = [s.strip() for s in ns.samplers.split(",") if s.strip()]
    unknown = set(samplers) - set(SAMPLERS)
    if unknown:
        sys.exit(f"bench_samplers: unknown samplers {sorted(unknown)}")
    if ns.bandwidth:
        bandwidth, source = ns.bandwidth, "--bandwidth"
    elif ns.gpu:
        bandwidth, source = 3.35e12, "H100 HBM3"
    else:
        bandwidth, source = cpu_bandwidth(ns.threads), "measured: 256 MiB copy"
    device = torch.cuda.get_device_name() if ns.gpu else f"CPU ({platform.processor() or platform.machine()})"
    import transformers

    result = {
        "model": ns.model or ("random Llama 1.0B" if ns.gpu else "SmolLM2-135M-Instruct"),
        "gpu": ns.gpu,
        "device": device,
        "cpu_count": os.cpu_count(),
        "threads": ns.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "temperature": ns.temperature,
        "rounds": ns.rounds,
        "warmup": ns.warmup,
        "bandwidth": bandwidth,
        "bandwidth_source": source,
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "sizes": [],
    }
    name = ns.name or ("gpu" if ns.gpu else "cpu")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    for seqs, new in sizes_of(ns):
        result["sizes"].append(run_size(ns, samplers, seqs, new, bandwidth))
        (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")  # after each size: partial results
        (out / f"{name}.md").write_text(markdown(result))
    print("\n" + markdown(result))
    return result


if __name__ == "__main__":
    main()
