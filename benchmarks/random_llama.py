"""The 1.0B random Llama the GPU benchmarks run on (the shape of scripts/gpu_check.py's), shared by the benchmarks.

About 1.0B parameters with SmolLM2's 49k-token vocabulary (Llama-3.2-1B's shape, a little narrower in the MLP),
initialised from seed 0 so that every side of a benchmark gets the same weights.
"""

from __future__ import annotations


def random_llama_1b(tok, device: str = "cuda"):
    """A randomly initialised ~1.0B-parameter Llama for ``tok`` on ``device`` (float32; cast it as needed)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=20,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return model
