"""Preference pairs for reward-model training: TRL's formats and the preference sets in ``shared/data``.

Accepted records (JSON array, JSONL, gzipped JSONL, a ``datasets`` data set, or a list of dicts); the
format is recognised per record from its fields:

* TRL's preference format: ``{"prompt"?, "chosen", "rejected"}``, each a string or a list of
  ``{role, content}`` messages. Without ``prompt`` the prompt is implicit: the shared leading messages of
  ``chosen`` and ``rejected`` (conversational), or the shared dialogue of an HH-RLHF transcript
  ``"\\n\\nHuman: ... \\n\\nAssistant: ..."`` (plain strings);
* PandaLM: ``{instruction, input, response1, response2, annotator1, annotator2, ...}``; each annotator
  votes 1 or 2 (that response is better) or 0 (tie); the label most annotators gave wins, and the pair is
  dropped when that label is 0 or when two labels draw;
* Auto-J pairwise: ``{prompt, "response 1", "response 2", label}``; ``label`` 0 = response 1 better,
  1 = response 2, 2 = tie (dropped);
* PKU-SafeRLHF: ``{prompt, response: [safer, less_safe]}``.

Pairs whose two responses are identical are dropped as ties too. A multi-turn prompt is flattened into
one string (``prompt_text``), because :func:`l3m.rewards.format_for_reward`, which a reward model's
input goes through at training and at scoring time, takes the prompt as a string.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from l3m.data import read_records
from l3m.errors import L3MUserError

FORMATS = ("trl", "hh", "pandalm", "autoj", "pku")
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


@dataclass
class PreferencePair:
    """One comparison: the prompt (chat messages ending with a user turn) and the better/worse response."""

    prompt: list[dict]
    chosen: str
    rejected: str
    where: str = ""

    @property
    def prompt_text(self) -> str:
        """The prompt as the one string a reward model sees (a single user turn is kept verbatim)."""
        return prompt_to_text(self.prompt)


@dataclass
class PreferenceData:
    """Pairs read from one or more sources, with what was dropped and why."""

    pairs: list[PreferencePair]
    n_records: int = 0
    n_ties: int = 0  # annotator ties and pairs with identical responses
    n_unusable: int = 0  # transcripts whose two sides disagree before the last turn
    formats: dict[str, int] = field(default_factory=dict)

    def __add__(self, other: PreferenceData) -> PreferenceData:
        fmts = dict(self.formats)
        for k, v in other.formats.items():
            fmts[k] = fmts.get(k, 0) + v
        return PreferenceData(
            self.pairs + other.pairs,
            self.n_records + other.n_records,
            self.n_ties + other.n_ties,
            self.n_unusable + other.n_unusable,
            fmts,
        )

    def describe(self) -> str:
        fmts = ", ".join(f"{k}: {v}" for k, v in sorted(self.formats.items()))
        return f"{len(self.pairs)} pairs from {self.n_records} records ({fmts}); dropped {self.n_ties} ties" + (
            f" and {self.n_unusable} unusable transcripts" if self.n_unusable else ""
        )


def prompt_to_text(messages: Sequence[dict]) -> str:
    """A single user turn stays as it is; a longer dialogue becomes an HH-style transcript."""
    turns = [m for m in messages if m["role"] != "system" or str(m["content"]).strip()]
    if len(turns) == 1 and turns[0]["role"] == "user":
        return str(turns[0]["content"])
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "\n\n".join(f"{names.get(m['role'], m['role'])}: {m['content']}" for m in turns)


def parse_hh_transcript(text: str, where: str) -> list[dict]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b ..."`` -> messages (the text before the first marker must be empty)."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise L3MUserError(
            f"{where}: a 'chosen'/'rejected' string without a 'prompt' must be an HH-RLHF transcript "
            "('\\n\\nHuman: ...\\n\\nAssistant: ...'); otherwise give the prompt in a 'prompt' field"
        )
    msgs = []
    for role, content in zip(parts[1::2], parts[2::2]):
        msgs.append({"role": "user" if role == "Human" else "assistant", "content": content.strip()})
    return msgs


def _text(value: Any, where: str, name: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):  # a few PandaLM responses are JSON true/false
        return str(value)
    raise L3MUserError(f"{where}: '{name}' must be a string, got {type(value).__name__}")


def _messages(value: Any, where: str, name: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise L3MUserError(f"{where}: '{name}' must be a string or a list of {{role, content}} messages")


def _completion(value: Any, where: str, name: str) -> str:
    """A response: a string, or messages whose last one is the assistant's answer."""
    if isinstance(value, str):
        return value
    msgs = _messages(value, where, name)
    if not msgs or msgs[-1]["role"] != "assistant":
        raise L3MUserError(f"{where}: '{name}' as messages must end with an assistant message")
    return str(msgs[-1]["content"])


def detect_format(row: Any, where: str) -> str:
    """Which of :data:`FORMATS` a record is in, from its fields."""
    if not isinstance(row, dict):
        raise L3MUserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "chosen" in row and "rejected" in row:
        if "prompt" not in row and isinstance(row["chosen"], str):
            return "hh"
        return "trl"
    if "response1" in row and "response2" in row and any(k.startswith("annotator") for k in row):
        return "pandalm"
    if "response 1" in row and "response 2" in row and "label" in row:
        return "autoj"
    if "prompt" in row and isinstance(row.get("response"), list):
        return "pku"
    raise L3MUserError(
        f"{where}: not a preference record (fields: {sorted(row)}); expected 'chosen' + 'rejected' (+ 'prompt'), "
        "PandaLM ('response1', 'response2', 'annotator1'...), Auto-J ('response 1', 'response 2', 'label') or "
        "PKU-SafeRLHF ('prompt', 'response': [safer, less_safe])"
    )


def _pandalm_winner(row: dict, where: str) -> int:
    """1 or 2 when the plurality of annotators prefers that response; 0 for a tie or a draw."""
    votes = [row[k] for k in sorted(row) if k.startswith("annotator")]
    counts: dict[int, int] = {}
    for v in votes:
        try:
            v = int(v)
        except (TypeError, ValueError):
            raise L3MUserError(f"{where}: annotator votes must be 0, 1 or 2, got {v!r}") from None
        if v not in (0, 1, 2):
            raise L3MUserError(f"{where}: annotator votes must be 0, 1 or 2, got {v!r}")
        counts[v] = counts.get(v, 0) + 1
    best = max(counts.values())
    top = [v for v, n in counts.items() if n == best]
    return top[0] if len(top) == 1 else 0


def record_to_pair(row: Any, where: str, fmt: str | None = None) -> PreferencePair | str:
    """One record -> a :class:`PreferencePair`, or ``"tie"`` / ``"unusable"`` when it must be dropped."""
    fmt = fmt or detect_format(row, where)
    if fmt == "trl":
        chosen_raw, rejected_raw = row["chosen"], row["rejected"]
        if "prompt" in row and row["prompt"] is not None:
            prompt = _messages(row["prompt"], where, "prompt")
            chosen, rejected = _completion(chosen_raw, where, "chosen"), _completion(rejected_raw, where, "rejected")
        else:  # implicit prompt: the messages both sides share
            c, r = _messages(chosen_raw, where, "chosen"), _messages(rejected_raw, where, "rejected")
            if c[:-1] != r[:-1]:
                return "unusable"
            prompt, chosen, rejected = c[:-1], _completion(c, where, "chosen"), _completion(r, where, "rejected")
    elif fmt == "hh":
        c = parse_hh_transcript(_text(row["chosen"], where, "chosen"), where)
        r = parse_hh_transcript(_text(row["rejected"], where, "rejected"), where)
        if c[:-1] != r[:-1] or c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
            return "unusable"
        prompt, chosen, rejected = c[:-1], c[-1]["content"], r[-1]["content"]
    elif fmt == "pandalm":
        instr = _text(row.get("instruction", ""), where, "instruction")
        extra = _text(row.get("input") or "", where, "input")
        prompt = [{"role": "user", "content": f"{instr}\n\n{extra}" if extra.strip() else instr}]
        win = _pandalm_winner(row, where)
        if win == 0:
            return "tie"
        a, b = _text(row["response1"], where, "response1"), _text(row["response2"], where, "response2")
        chosen, rejected = (a, b) if win == 1 else (b, a)
    elif fmt == "autoj":
        prompt = _messages(row["prompt"], where, "prompt")
        label = row["label"]
        if label not in (0, 1, 2):
            raise L3MUserError(f"{where}: Auto-J 'label' must be 0, 1 or 2 (tie), got {label!r}")
        if label == 2:
            return "tie"
        a, b = _text(row["response 1"], where, "response 1"), _text(row["response 2"], where, "response 2")
        chosen, rejected = (a, b) if label == 0 else (b, a)
    elif fmt == "pku":
        resp = row["response"]
        if len(resp) != 2:
            raise L3MUserError(f"{where}: 'response' must be [safer, less_safe], got {len(resp)} items")
        prompt = _messages(row["prompt"], where, "prompt")
        chosen, rejected = _text(resp[0], where, "response[0]"), _text(resp[1], where, "response[1]")
    else:
        raise L3MUserError(f"{where}: unknown preference format {fmt!r}; known: {', '.join(FORMATS)}")
    if not prompt or prompt[-1]["role"] != "user" or not str(prompt[-1]["content"]).strip():
        raise L3MUserError(f"{where}: the prompt is empty or does not end with a user message")
    if chosen.strip() == rejected.strip():
        return "tie"
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, where=where)


def _records(source: Any) -> list[tuple[Any, str]]:
    if isinstance(source, str | os.PathLike):
        s = str(source)
        if s.startswith("hf:"):
            import datasets

            _, name, *rest = s.split(":")
            try:
                ds = datasets.load_dataset(name, split=rest[0] if rest else "train")
            except Exception as exc:  # noqa: BLE001
                raise L3MUserError(f"data set '{name}' could not be loaded with datasets ({exc})") from None
            return [(r, f"{name}[{i}]") for i, r in enumerate(ds)]
        return read_records(s)
    name = getattr(getattr(source, "info", None), "dataset_name", None) or "dataset"
    return [(r, f"{name}[{i}]") for i, r in enumerate(source)]


def load_preference_pairs(source: Any, fmt: str | None = None) -> PreferenceData:
    """Pairs from a file (.json/.jsonl/.jsonl.gz), ``hf:NAME[:SPLIT]``, a ``datasets`` data set or a list of
    dicts; ties and unusable transcripts are dropped and counted. ``fmt`` forces one of :data:`FORMATS`."""
    if fmt is not None and fmt not in FORMATS:
        raise L3MUserError(f"unknown preference format {fmt!r}; known: {', '.join(FORMATS)}")
    records = _records(source)
    if not records:
        raise L3MUserError(f"preference source '{source}' holds no records")
    out = PreferenceData(pairs=[], n_records=len(records))
    for row, where in records:
        f = fmt or detect_format(row, where)
        got = record_to_pair(row, where, f)
        if got == "tie":
            out.n_ties += 1
        elif got == "unusable":
            out.n_unusable += 1
        else:
            out.pairs.append(got)
            out.formats[f] = out.formats.get(f, 0) + 1
    return out


def load_preference_sources(sources: Any, fmt: str | None = None) -> PreferenceData:
    """One source or a list of them, concatenated."""
    if isinstance(sources, list | tuple) and sources and not isinstance(sources[0], dict):
        total = PreferenceData(pairs=[])
        for s in sources:
            total = total + load_preference_pairs(s, fmt)
        return total
    return load_preference_pairs(sources, fmt)


def split_pairs(
    pairs: Sequence[PreferencePair], fraction: float, seed: int = 0
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """A seeded (train, held-out) split **by prompt**: pairs that share a prompt land on the same side, so
    the held-out accuracy is measured on prompts the reward model never saw."""
    if not 0 <= fraction < 1:
        raise ValueError(f"the held-out fraction must be in [0, 1), got {fraction}")
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        groups.setdefault(p.prompt_text, []).append(i)
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    target = round(len(pairs) * fraction)
    held: set[int] = set()
    for k in keys:
        if len(held) >= target:
            break
        held.update(groups[k])
    train = [p for i, p in enumerate(pairs) if i not in held]
    return train, [p for i, p in enumerate(pairs) if i in held]


def subsample(pairs: Sequence[PreferencePair], n: int | None, seed: int = 0) -> list[PreferencePair]:
    """At most ``n`` pairs, a seeded random choice kept in the original order."""
    if n is None or n >= len(pairs):
        return list(pairs)
    keep = sorted(random.Random(seed).sample(range(len(pairs)), n))
    return [pairs[i] for i in keep]
