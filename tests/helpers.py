"""Shared helpers for tests: tiny randomly initialised models with the default model's tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch


def make_tiny_llama(path: Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    from l3m.models import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_args(tmp_path, config_class=None, **kw):
    """An L3MConfig (or ``config_class``, a subclass) for the tiny test models: a few short samples, no checkpoints,
    CPU, seed 0; ``kw`` overrides."""
    from l3m import L3MConfig

    base = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        num_generations=2,
        max_new_tokens=12,
        learning_rate=1e-3,
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    base.update(kw)
    return (config_class or L3MConfig)(**base)
