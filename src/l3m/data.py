"""Reading task data in the formats users already have, and turning it into token ids.

Accepted rows (JSON array, JSONL, gzipped JSONL, or a ``datasets`` data set):

* conversational: ``{"messages": [{"role": ..., "content": ...}, ...]}``; the last message is the
  assistant's response, the rest is the prompt;
* ``{"prompt": ..., "completion": ...}``, each a string or a list of messages;
* Alpaca-style: ``{"instruction": ..., "input": ..., "output": ...}`` (``input`` optional);
* ShareGPT-style: ``{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]}``;
* question answering: ``{"question": ..., "answer": ...}``.

For a prompt set (sampling only), the response may be missing, and a ``.txt`` file holds one prompt per line.
The model's chat template is applied; only response tokens count in the task loss.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from l3m.errors import L3MUserError

logger = logging.getLogger(__name__)

BUILTIN_SPLITS = ("train", "heldout")
FALLBACK_USER = "### User:\n"
FALLBACK_ASSISTANT = "\n\n### Assistant:\n"


@dataclass
class Example:
    prompt: list[dict]  # chat messages, ending with a user turn
    response: str | None  # the reference response (None in a prompt-only set)
    where: str = ""  # "file:line" for error messages

    @property
    def prompt_text(self) -> str:
        """The last user message: what reward functions receive as the prompt."""
        return self.prompt[-1]["content"]


# ----------------------------------------------------------------------------------------------
# Reading files


def builtin_path(split: str) -> Path:
    if split not in BUILTIN_SPLITS:
        raise L3MUserError(f"builtin data has splits {BUILTIN_SPLITS}, not '{split}'")
    return Path(str(resources.files("l3m") / "default_data" / f"{split}.jsonl"))


def _read_json_array(text: str, path: str) -> list[tuple[Any, str]]:
    """Items of a JSON array with the line each starts on, so errors can name ``file:line``."""
    dec = json.JSONDecoder()
    i = text.find("[")
    if i < 0:
        raise L3MUserError(f"{path}: expected a JSON array of records (or JSONL, one record per line)")
    i += 1
    items = []
    n = len(text)
    while True:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n:
            raise L3MUserError(f"{path}:{text.count(chr(10), 0, n) + 1}: the JSON array is not closed with ']'")
        if text[i] == "]":
            return items
        line = text.count("\n", 0, i) + 1
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            raise L3MUserError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg}, column {exc.colno})") from None
        items.append((obj, f"{path}:{line}"))


def read_records(path: str | os.PathLike) -> list[tuple[Any, str]]:
    """(record, "file:line") pairs from a .json, .jsonl or .jsonl.gz file."""
    p = Path(path)
    if not p.is_file():
        raise L3MUserError(f"data file '{path}' does not exist")
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rt", encoding="utf-8") as f:
            text = f.read()
    except (UnicodeDecodeError, OSError) as exc:
        raise L3MUserError(f"{path}: cannot read the file as UTF-8 text ({exc})") from None
    if text.lstrip().startswith("["):
        return _read_json_array(text, str(path))
    if p.suffix == ".txt" or p.name.endswith(".txt.gz"):  # plain text: one prompt per line
        return [
            ({"prompt": line.strip()}, f"{path}:{n}") for n, line in enumerate(text.splitlines(), 1) if line.strip()
        ]
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((json.loads(line), f"{path}:{lineno}"))
        except json.JSONDecodeError as exc:
            raise L3MUserError(
                f"{path}:{lineno}: malformed JSON line ({exc.msg}, column {exc.colno}); "
                "each line of a JSONL file must be one JSON object"
            ) from None
    return records


def _messages(value: Any, where: str, field: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise L3MUserError(f"{where}: '{field}' must be a string or a list of {{role, content}} messages")


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _sharegpt(value: Any, where: str) -> list[dict]:
    """ShareGPT turns ``{"from": "human"|"gpt"|"system", "value": ...}`` as chat messages."""
    if not isinstance(value, list) or not all(isinstance(t, dict) and "from" in t and "value" in t for t in value):
        raise L3MUserError(f"{where}: 'conversations' must be a list of {{from, value}} turns (ShareGPT)")
    out = []
    for t in value:
        role = SHAREGPT_ROLES.get(str(t["from"]).lower())
        if role is None:
            raise L3MUserError(
                f"{where}: unknown ShareGPT speaker {t['from']!r}; expected one of {sorted(SHAREGPT_ROLES)}"
            )
        out.append({"role": role, "content": t["value"]})
    return out


def row_to_example(row: Any, where: str, need_response: bool = True) -> Example:
    """One record in any supported format -> :class:`Example`; errors name ``where`` (``file:line``)."""
    if not isinstance(row, dict):
        raise L3MUserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    response: str | None
    if "messages" in row or "conversations" in row:
        if "messages" in row:
            msgs = _messages(row["messages"], where, "messages")
        else:
            msgs = _sharegpt(row["conversations"], where)
        if msgs and msgs[-1]["role"] == "assistant":
            prompt, response = msgs[:-1], msgs[-1]["content"]
        else:
            prompt, response = msgs, None
    elif "prompt" in row:
        prompt = _messages(row["prompt"], where, "prompt")
        comp = row.get("completion")
        if comp is None:
            response = None
        elif isinstance(comp, str):
            response = comp
        else:
            cmsgs = _messages(comp, where, "completion")
            response = cmsgs[-1]["content"] if cmsgs else None
    elif "instruction" in row:
        instr = row["instruction"]
        extra = row.get("input") or ""
        if not isinstance(instr, str) or not isinstance(extra, str):
            raise L3MUserError(f"{where}: 'instruction' and 'input' must be strings")
        prompt = [{"role": "user", "content": f"{instr}\n\n{extra}" if extra.strip() else instr}]
        response = row.get("output")
    elif "question" in row:
        prompt = _messages(row["question"], where, "question")
        response = row.get("answer")
    else:
        raise L3MUserError(
            f"{where}: the record has none of the fields of a known format (fields: {sorted(row)}); expected "
            "'messages', or 'prompt' + 'completion', or 'instruction' (+ 'input') + 'output', or 'conversations' "
            "(ShareGPT), or 'question' + 'answer'"
        )
    if not prompt or prompt[-1]["role"] != "user" or not str(prompt[-1]["content"]).strip():
        raise L3MUserError(f"{where}: the prompt is empty or does not end with a user message")
    if response is not None and not isinstance(response, str):
        raise L3MUserError(f"{where}: the response must be a string, got {type(response).__name__}")
    if need_response and (response is None or not response.strip()):
        raise L3MUserError(
            f"{where}: the record has no reference response (or an empty one); task data needs one "
            "('messages' ending with an assistant turn, 'completion', or 'output')"
        )
    return Example(prompt=prompt, response=response, where=where)


def load_examples(source: Any, need_response: bool = True, split: str | None = None) -> list[Example]:
    """Examples from a file path, ``builtin`` / ``builtin:heldout``, ``hf:NAME[:SPLIT]``, a ``datasets``
    data set, or a list of dicts."""
    if isinstance(source, (str, os.PathLike)):
        s = str(source)
        if s == "builtin" or s.startswith("builtin:"):
            split_name = s.split(":", 1)[1] if ":" in s else (split or "train")
            records = read_records(builtin_path(split_name))
        elif s.startswith("hf:"):
            import datasets

            _, name, *rest = s.split(":")
            try:
                ds = datasets.load_dataset(name, split=rest[0] if rest else (split or "train"))
            except Exception as exc:  # noqa: BLE001
                raise L3MUserError(f"data set '{name}' could not be loaded with datasets ({exc})") from None
            records = [(r, f"{name}[{i}]") for i, r in enumerate(ds)]
        else:
            records = read_records(s)
    else:
        name = getattr(source, "info", None) and getattr(source.info, "dataset_name", None) or "dataset"
        records = [(r, f"{name}[{i}]") for i, r in enumerate(source)]
    if not records:
        raise L3MUserError(f"data source '{source}' holds no records")
    return [row_to_example(r, w, need_response) for r, w in records]


# ----------------------------------------------------------------------------------------------
# Token ids


def prompt_ids(tokenizer, prompt: list[dict]) -> list[int]:
    """The prompt with the generation prompt appended (chat template, or a plain fallback)."""
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False))
    text = "".join(f"{FALLBACK_USER if m['role'] == 'user' else m['role'] + ': '}{m['content']}" for m in prompt)
    return tokenizer(text + FALLBACK_ASSISTANT, add_special_tokens=True)["input_ids"]


def response_ids(tokenizer, prompt: list[dict], response: str, p_ids: list[int]) -> list[int]:
    """The response's tokens as the template writes them, ending with the end-of-turn token."""
    if getattr(tokenizer, "chat_template", None):
        full = list(
            tokenizer.apply_chat_template(
                prompt + [{"role": "assistant", "content": response}], tokenize=True, return_dict=False
            )
        )
        if full[: len(p_ids)] == p_ids:
            resp = full[len(p_ids) :]
            # drop what the template adds after the end-of-turn token (e.g. a newline)
            eos = tokenizer.eos_token_id
            if eos in resp:
                resp = resp[: resp.index(eos) + 1]
            return resp
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id]


class TruncationCounter:
    """Counts truncated prompts/responses and warns once with the totals."""

    def __init__(self):
        self.prompts = 0
        self.responses = 0

    def report(self, what: str) -> None:
        if self.prompts or self.responses:
            logger.warning(
                "%s: truncated %d prompt(s) longer than max_prompt_length (kept their last tokens) and %d "
                "response(s) past max_length; raise training.max_prompt_length or training.max_length to keep them",
                what,
                self.prompts,
                self.responses,
            )


def tokenize_examples(
    tokenizer, examples: list[Example], max_length: int = 512, max_prompt_length: int = 256, what: str = "data"
) -> list[dict]:
    """Feature dicts: ``prompt_ids`` (for sampling), and ``input_ids`` + ``response_mask`` (task loss)."""
    counter = TruncationCounter()
    feats = []
    for i, ex in enumerate(examples):
        p = prompt_ids(tokenizer, ex.prompt)
        if len(p) > max_prompt_length:
            p = p[-max_prompt_length:]
            counter.prompts += 1
        feat: dict[str, Any] = {"prompt_ids": p, "index": i}
        if ex.response is not None:
            r = response_ids(tokenizer, ex.prompt, ex.response, p)
            room = max(max_length - len(p), 1)
            if len(r) > room:
                r = r[:room]
                counter.responses += 1
            feat["input_ids"] = p + r
            feat["response_mask"] = [0] * len(p) + [1] * len(r)
        feats.append(feat)
    counter.report(what)
    return feats


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[dict], examples: list[Example] | None = None):
        self.items = items
        self.examples = examples

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def pad(seqs: list[list[int]], value: int, side: str = "right") -> torch.Tensor:
    n = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), n), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            if side == "right":
                out[i, : len(s)] = torch.as_tensor(s)
            else:
                out[i, n - len(s) :] = torch.as_tensor(s)
    return out


class L3MCollator:
    """Pads a batch: task sequences on the right, prompts (for generation) on the left."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        batch: dict[str, Any] = {"index": torch.as_tensor([f["index"] for f in features])}
        prompts = [f["prompt_ids"] for f in features]
        batch["prompt_ids"] = pad(prompts, self.pad_token_id, "left")
        batch["prompt_attention_mask"] = pad([[1] * len(p) for p in prompts], 0, "left")
        if "input_ids" in features[0]:
            batch["input_ids"] = pad([f["input_ids"] for f in features], self.pad_token_id)
            batch["response_mask"] = pad([f["response_mask"] for f in features], 0)
            batch["attention_mask"] = pad([[1] * len(f["input_ids"]) for f in features], 0)
        return batch


def split_heldout(examples: list[Example], fraction: float, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """A seeded random split into (train, held-out)."""
    idx = list(range(len(examples)))
    random.Random(seed).shuffle(idx)
    n_held = int(round(len(idx) * fraction))
    held = sorted(idx[:n_held])
    train = sorted(idx[n_held:])
    return [examples[i] for i in train], [examples[i] for i in held]


def split_by_key(keys: list[str], sizes: dict[str, int], seed: int) -> dict[str, list[int]]:
    """Disjoint index lists, one per split, from a seeded shuffle of the distinct ``keys`` (e.g. prompts).

    Records that share a key go to one split together. The splits are filled in reverse order of ``sizes``
    (e.g. test, then selection), each up to its size; the first split (train) takes every record left over.
    Raises ``ValueError`` when a later split cannot be filled to its size exactly.
    """
    groups: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    names = list(sizes)
    out: dict[str, list[int]] = {n: [] for n in names}
    for g in order:
        dest = next((n for n in reversed(names[1:]) if len(out[n]) + len(g) <= sizes[n]), names[0])
        out[dest] += g
    for n in names[1:]:
        if len(out[n]) != sizes[n]:
            raise ValueError(f"split '{n}' holds {len(out[n])} records, not {sizes[n]}")
    return {n: sorted(v) for n, v in out.items()}
