"""The YAML run config of ``l3m train``: reading, ``key=value`` overrides, and validation.

Everything is checked before any model is loaded, and every problem names the field it is in.

    model: default                # hub name, local directory, or "default" (SmolLM2-135M-Instruct)
    method: l3m                   # l3m (the paper's), minimax (the MM baseline) or experimental
    data:
      train: builtin              # a .json/.jsonl(.gz) file, "builtin", "builtin:heldout", or "hf:NAME[:SPLIT]"
      eval: builtin:heldout       # optional
      prompts: null               # optional separate prompts to sample from
    constraints:
      - {kind: length, max: 40}
    peft: null                    # optional LoRA: {r: 16, lora_alpha: 32, target_modules: all-linear}
    training: {output_dir: runs/x, max_steps: 30, ...}   # any field of the method's config class
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from l3m.constraints import validate_constraint_specs
from l3m.errors import L3MUserError, did_you_mean

TOP_KEYS = {"model", "method", "data", "constraints", "peft", "training", "trust_remote_code", "dtype"}
METHODS = ("l3m", "minimax", "experimental")
DATA_KEYS = {"train", "eval", "prompts", "heldout_fraction", "heldout_seed"}
PEFT_KEYS = {"r", "lora_alpha", "lora_dropout", "target_modules", "bias", "modules_to_save", "use_rslora"}


_SCI = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def fix_numbers(node: Any) -> Any:
    """YAML 1.1 reads ``5e-5`` (no dot) as a string; users mean a number."""
    if isinstance(node, dict):
        return {k: fix_numbers(v) for k, v in node.items()}
    if isinstance(node, list):
        return [fix_numbers(v) for v in node]
    if isinstance(node, str) and _SCI.match(node.strip()):
        return float(node)
    return node


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise L3MUserError(f"override '{text}' is not of the form key=value (e.g. training.max_steps=10)")
    key, _, raw = text.partition("=")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    for ov in overrides:
        keys, value = parse_override(ov)
        node = cfg
        for k in keys[:-1]:
            if node.get(k) is None:
                node[k] = {}
            node = node[k]
            if not isinstance(node, dict):
                raise L3MUserError(f"override '{ov}': '{k}' is not a section")
        node[keys[-1]] = value
    return cfg


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> dict:
    cfg: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise L3MUserError(f"config file '{path}' does not exist")
        try:
            cfg = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise L3MUserError(f"{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
        if not isinstance(cfg, dict):
            raise L3MUserError(f"{path}: the config must be a mapping of sections (model, data, constraints, training)")
        cfg["_base_dir"] = str(p.parent)
    cfg = fix_numbers(apply_overrides(cfg, overrides or []))
    validate_run_config(cfg, str(path or "config"))
    return cfg


def _check_keys(section: dict, known: set[str], where: str) -> None:
    for key in section:
        if key not in known:
            raise L3MUserError(
                f"{where}: unknown key '{key}'{did_you_mean(key, known)}; known keys: {', '.join(sorted(known))}"
            )


def method_classes(method: str = "l3m") -> tuple[type, type]:
    """The (config, trainer) classes of a run config's ``method``."""
    if method == "minimax":
        from l3m.minimax import MinimaxConfig, MinimaxTrainer

        return MinimaxConfig, MinimaxTrainer
    if method == "experimental":
        from l3m.experimental import ExperimentalL3MConfig, ExperimentalL3MTrainer

        return ExperimentalL3MConfig, ExperimentalL3MTrainer
    from l3m.config import L3MConfig
    from l3m.trainer import L3MTrainer

    return L3MConfig, L3MTrainer


def config_fields(method: str = "l3m") -> set[str]:
    return {f.name for f in dataclasses.fields(method_classes(method)[0]) if f.init}


def _data_path_ok(value: Any, where: str, base_dir: str) -> None:
    if not isinstance(value, str):
        raise L3MUserError(f"{where}: expected a file path, 'builtin', or 'hf:NAME', got {value!r}")
    if value == "builtin" or value.startswith(("builtin:", "hf:")):
        return
    if not Path(value).is_file() and not (Path(base_dir) / value).is_file():
        raise L3MUserError(f"{where}: data file '{value}' does not exist")


def resolve_data_path(value: str | None, base_dir: str) -> str | None:
    """A relative data path is taken from the working directory, else from the config's folder."""
    if value is None or value == "builtin" or value.startswith(("builtin:", "hf:")) or Path(value).is_file():
        return value
    return str(Path(base_dir) / value)


def validate_run_config(cfg: dict, where: str) -> None:
    base = cfg.get("_base_dir", ".")
    _check_keys({k: v for k, v in cfg.items() if k != "_base_dir"}, TOP_KEYS, where)
    data = cfg.get("data") or {}
    if not isinstance(data, dict):
        raise L3MUserError(f"{where}: 'data' must be a mapping with 'train' (and optional 'eval', 'prompts')")
    _check_keys(data, DATA_KEYS, f"{where}: data")
    if "train" not in data:
        raise L3MUserError(f"{where}: data.train is missing: name a data file, 'builtin', or 'hf:NAME'")
    for key in ("train", "eval", "prompts"):
        if data.get(key) is not None:
            _data_path_ok(data[key], f"{where}: data.{key}", base)
    frac = data.get("heldout_fraction", 0)
    if not isinstance(frac, (int, float)) or not 0 <= frac < 1:
        raise L3MUserError(f"{where}: data.heldout_fraction must be a number in [0, 1), got {frac!r}")
    if not isinstance(data.get("heldout_seed", 0), int) or isinstance(data.get("heldout_seed", 0), bool):
        raise L3MUserError(f"{where}: data.heldout_seed must be an integer, got {data['heldout_seed']!r}")
    try:
        validate_constraint_specs(cfg.get("constraints"))
    except L3MUserError as exc:
        raise L3MUserError(f"{where}: {exc}") from None
    method = cfg.get("method", "l3m")
    if method not in METHODS:
        raise L3MUserError(f"{where}: method must be one of {', '.join(METHODS)}, got {method!r}")
    training = cfg.get("training") or {}
    if not isinstance(training, dict):
        raise L3MUserError(f"{where}: 'training' must be a mapping of {method_classes(method)[0].__name__} fields")
    if "method" in training:
        raise L3MUserError(f"{where}: training.method: the method is a top-level key (method: {training['method']})")
    _check_keys(training, config_fields(method), f"{where}: training")
    if cfg.get("peft") is not None:
        if not isinstance(cfg["peft"], dict):
            raise L3MUserError(f"{where}: 'peft' must be a mapping of LoRA settings (r, lora_alpha, ...)")
        _check_keys(cfg["peft"], PEFT_KEYS, f"{where}: peft")
    if "model" in cfg and not isinstance(cfg["model"], str):
        raise L3MUserError(f"{where}: 'model' must be a hub name, a local directory, or 'default'")
