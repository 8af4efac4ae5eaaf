"""``l3m merge ADAPTER_DIR OUT_DIR``: fold a LoRA adapter into its base model and save a plain model.

A run with a ``peft:`` block saves only the adapter (``adapter_config.json`` + ``adapter_model.safetensors``).
Merging gives a model that loads with ``AutoModelForCausalLM.from_pretrained`` alone, without ``peft``, and
generates as fast as the base model. The base model is the one named in ``adapter_config.json`` (or ``--base``),
loaded from safetensors only; the tokenizer saved beside the adapter, when there is one, goes with the result.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from l3m.errors import L3MUserError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def adapter_base_model(adapter_dir: str | os.PathLike) -> str:
    """The base model an adapter was trained on, as recorded in its ``adapter_config.json``."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise L3MUserError(f"'{adapter_dir}' holds no {ADAPTER_CONFIG}: not a PEFT adapter directory")
    try:
        base = json.loads(path.read_text()).get("base_model_name_or_path")
    except json.JSONDecodeError as exc:
        raise L3MUserError(f"{path}: malformed JSON ({exc.msg})") from None
    if not base:
        raise L3MUserError(f"{path}: no 'base_model_name_or_path'; name the base model with --base")
    return str(base)


def merge_adapter(
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    base: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
) -> Path:
    """Merge the LoRA adapter in ``adapter_dir`` into its base model; write safetensors and the tokenizer to
    ``out_dir`` (through a temporary folder renamed at the end, so a failed merge leaves no half-written model)."""
    from peft import PeftModel

    from l3m.models import check_model_exists, load_causal_lm, load_tokenizer

    adapter_dir, out = Path(adapter_dir), Path(out_dir)
    base = base or adapter_base_model(adapter_dir)
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise L3MUserError(
            f"'{adapter_dir}' holds no {ADAPTER_WEIGHTS}: l3m merges safetensors adapters only (a pickled "
            "adapter_model.bin can run code when loaded)"
        )
    if out.exists() and any(out.iterdir()):
        raise L3MUserError(f"output directory '{out}' exists and is not empty")
    check_model_exists(base, "base model (adapter_config.json's base_model_name_or_path, or --base)")
    model = load_causal_lm(base, dtype=dtype, trust_remote_code=trust_remote_code)
    model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    merged = model.merge_and_unload()
    has_tokenizer = any((adapter_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    tok = load_tokenizer(str(adapter_dir) if has_tokenizer else base, trust_remote_code=trust_remote_code)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
