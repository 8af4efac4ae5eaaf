"""Sampling the policy: one sampler for training and for evaluation.

The samples are drawn from exactly the distribution their log-probabilities are scored under,
``softmax(logits / temperature)``: the generation config is built from l3m's own settings alone. Nothing is taken
from the model's ``generation_config`` but its end tokens, since a ``repetition_penalty``, ``no_repeat_ngram_size``,
``min_new_tokens``, ``top_p`` or ``top_k`` there would change the distribution the samples come from and not the one
the score-function gradient assumes (a biased ``grad C_i``). ``top_p < 1`` and ``top_k > 0`` are refused for the
same reason (see :func:`check_sampling_settings`).

A completion is the response's tokens up to, not including, its first end token: ``completion_ids[j]`` has
``lengths[j]`` tokens, in training and in evaluation alike. The log-probability of a sample covers its end token
too (stopping there is part of the sampled response); :meth:`Completions.scored_ids` gives those tokens.

Three samplers draw the samples, all from that same distribution and all returning the same structures
(``sampler`` in :class:`l3m.L3MConfig`, ``--sampler`` in ``l3m evaluate``):

* ``hf`` (default): transformers' ``generate`` with a dynamic KV cache; each prompt is encoded once for its ``k``
  samples (:func:`_shared_prompt_cache`).
* ``static``: ``generate`` with transformers' static KV cache (``cache_implementation="static"``), each prompt
  encoded once per sample. Prompts are left-padded to a multiple of :data:`STATIC_PROMPT_BUCKET` tokens and the
  cache is sized to that width plus ``max_new_tokens`` (transformers keeps the largest size a model has seen), so
  the shapes repeat from call to call. transformers compiles the decode step by itself on accelerators (CUDA graphs
  on a GPU); there the batch is also padded up to a power of two. On a CPU transformers does not compile, and
  neither does l3m: the static cache runs eagerly. On a CPU it draws the same random numbers as ``hf``, and so the
  same samples.
* ``paged``: transformers' continuous batching (``init_continuous_batching``, paged attention): a sequence that
  ends frees its cache blocks at once, and each prompt is prefilled once and forked into its ``k`` samples. Its
  cache is sized to the call's requests, so nothing is evicted. Its samples are reproducible: all requests are
  queued before the generation loop starts (one schedule), and the loop's RNG is seeded from the caller's, so a
  seed gives the same samples, on one process or several (they are not ``hf``'s samples: the random numbers are
  drawn in another order). It refuses sharded weights (FSDP, DeepSpeed ZeRO-3).

A backend is one function in :data:`_BACKENDS`; another engine (vLLM, say) would be one more entry.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, GenerationConfig

from l3m.constraints import SampleBatch
from l3m.data import Example, pad, prompt_ids
from l3m.logprobs import cache_kwarg, cache_of, eos_token_ids


def check_sampling_settings(top_p: float = 1.0, top_k: int = 0) -> None:
    """Refuse truncated sampling: l3m scores samples under the full ``softmax(logits / temperature)``."""
    if top_p != 1.0 or top_k not in (0, None):
        raise ValueError(
            f"top_p={top_p}, top_k={top_k}: truncated sampling draws from a distribution other than the one the "
            "samples are scored under (softmax(logits / temperature)), which biases the constraints' gradient; "
            "leave top_p at 1.0 and top_k at 0, and use temperature to sharpen the samples"
        )


def generation_config(max_new_tokens: int, temperature: float, eos_ids: list[int], pad_id: int) -> GenerationConfig:
    """The explicit generation config of every sampling call: ancestral sampling at ``temperature``, nothing else."""
    return GenerationConfig(
        do_sample=True,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=1.0,
        top_k=0,
        eos_token_id=list(eos_ids),
        pad_token_id=pad_id,
        use_cache=True,
    )


@contextlib.contextmanager
def seeded_rng(device: str | torch.device, seed: int):
    """Run under an RNG seeded with ``seed``; the global RNG state is restored afterwards."""
    dev = torch.device(device)
    devices = [] if dev.type == "cpu" else [dev.index if dev.index is not None else 0]
    kwargs = {} if dev.type in ("cpu", "cuda") else {"device_type": dev.type}
    with torch.random.fork_rng(devices=devices, **kwargs):
        torch.manual_seed(seed % (2**63))
        yield


@contextlib.contextmanager
def _own_generation_config(model, config: GenerationConfig):
    """Let ``generate`` see ``config`` as the model's own generation config, so that no setting of the model's (a
    repetition penalty, a minimum length) fills the fields ``config`` leaves unset."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = base.generation_config
    base.generation_config = config
    try:
        yield
    finally:
        base.generation_config = saved


def _shared_prompt_cache(model, ids: torch.Tensor, mask: torch.Tensor, k: int):
    """The KV cache of the prompts but their last token, computed once and repeated ``k`` times; ``None`` where that
    does not apply (one sample per prompt, one-token prompts, a model whose cache is not a ``DynamicCache``)."""
    if k < 2 or ids.shape[1] < 2:
        return None
    try:
        out = model(
            input_ids=ids[:, :-1],
            attention_mask=mask[:, :-1],
            position_ids=(mask[:, :-1].cumsum(1) - 1).clamp(min=0),
            use_cache=True,
            logits_to_keep=1,
        )
    except TypeError:  # an architecture without logits_to_keep
        return None
    cache = cache_of(out)
    if type(cache) is not DynamicCache:
        return None
    cache.batch_repeat_interleave(k)
    return cache


def _hf(model, ids: torch.Tensor, mask: torch.Tensor, k: int, config: GenerationConfig) -> torch.Tensor:
    """``generate`` with a dynamic KV cache, each prompt encoded once for its ``k`` samples: the samples are drawn as
    ``generate(..., num_return_sequences=k)`` draws them, with the same random numbers."""
    cache = _shared_prompt_cache(model, ids, mask, k)
    if cache is None:
        out = model.generate(input_ids=ids, attention_mask=mask, num_return_sequences=k)
    else:
        rep_ids, rep_mask = ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)
        out = model.generate(input_ids=rep_ids, attention_mask=rep_mask, **{cache_kwarg(model): cache})
    return out[:, ids.shape[1] :]


STATIC_PROMPT_BUCKET = 64  # the static sampler pads prompts on the left to a multiple of this many tokens


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _static(model, ids: torch.Tensor, mask: torch.Tensor, k: int, config: GenerationConfig) -> torch.Tensor:
    """``generate`` with transformers' static KV cache, on bucketed shapes (see the module's docstring)."""
    width = _round_up(ids.shape[1], STATIC_PROMPT_BUCKET)
    if width > ids.shape[1]:
        fill = width - ids.shape[1]
        ids = torch.cat([ids.new_full((ids.shape[0], fill), config.pad_token_id), ids], 1)
        mask = torch.cat([mask.new_zeros((mask.shape[0], fill)), mask], 1)
    rows = ids.shape[0] * k
    ids, mask = ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)
    if ids.device.type != "cpu":  # transformers compiles the decode step here: a fixed batch shape too
        extra = 2 ** math.ceil(math.log2(rows)) - rows
        ids, mask = torch.cat([ids, ids[:1].expand(extra, -1)]), torch.cat([mask, mask[:1].expand(extra, -1)])
    static = copy.deepcopy(config)
    static.cache_implementation = "static"
    static.max_cache_len = width + config.max_new_tokens
    with _own_generation_config(model, static):
        out = model.generate(input_ids=ids, attention_mask=mask)
    return out[:rows, width:]


PAGE_SIZE = 32  # tokens per page of the paged sampler's KV cache


def _paged(model, ids: torch.Tensor, mask: torch.Tensor, k: int, config: GenerationConfig) -> torch.Tensor:
    """transformers' continuous batching: paged attention, slots freed as sequences end (see the module's
    docstring). The cache holds every request of the call at full length, so nothing is ever evicted."""
    from transformers import ContinuousBatchingConfig
    from transformers.generation.logits_process import TemperatureLogitsWarper
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    from transformers.integrations.fsdp import is_fsdp_managed_module

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if is_deepspeed_zero3_enabled() or is_fsdp_managed_module(base):
        raise ValueError(
            "the paged sampler cannot sample from sharded weights (FSDP, DeepSpeed ZeRO-3): its processes would run "
            "different numbers of forward passes, each gathering the weights; use sampler 'hf' or 'static'"
        )
    paged = copy.deepcopy(config)
    paged.num_return_sequences = k  # each prompt is prefilled once, then forked into its k samples
    processors = base._get_logits_processor(paged)
    if not all(isinstance(p, TemperatureLogitsWarper) for p in processors):  # exactness: softmax(logits / T) only
        raise ValueError(f"the paged sampler would apply logits processors beyond the temperature: {processors}")
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    n = len(prompts) * k
    pages = sum(math.ceil((len(p) + config.max_new_tokens + 1) / PAGE_SIZE) for p in prompts)
    dev = torch.device(base.device)
    # The seed comes from the caller's RNG (seeded per micro-batch and process by the trainer). transformers seeds the
    # global RNG with it plus the data-parallel rank, which l3m's seed accounts for already: the rank is taken off, so
    # that a micro-batch draws the same samples whichever process samples it. The RNG state is restored afterwards.
    dist = torch.distributed
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    seed = int(torch.randint(0, 2**31 - 1, (1,))) - rank
    cb = ContinuousBatchingConfig(
        page_size=PAGE_SIZE,
        num_blocks=k * pages + len(prompts),
        max_batch_tokens=min(8192, max(sum(map(len, prompts)), n)),
        max_requests_per_batch=n,
        seed=seed,
        drop_unsupported_processors=False,
    )
    devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), _objects_frozen():
        manager = base.init_continuous_batching(generation_config=paged, continuous_batching_config=cb)
        try:
            manager.warmup()  # builds the batch processor (and seeds it) before the loop starts
            request_ids = manager.add_requests(prompts, max_new_tokens=config.max_new_tokens)
            manager.start()  # every request is queued already: one schedule for a given seed
            results = {}
            while len(results) < n:
                out = manager.get_result(timeout=1)
                if out is not None and out.is_finished():
                    results[out.request_id] = out
                elif out is None and not manager.is_running():
                    break
        finally:
            manager.stop(block=True)
            manager.destroy()
    rows = []
    for rid in request_ids:
        for key in [f"{rid}__child#{i}" for i in range(k - 1)] + [rid]:
            out = results.get(key)
            if out is None or out.error is not None:
                raise RuntimeError(f"paged sampling failed for request {key}: {getattr(out, 'error', 'no result')}")
            rows.append(list(out.generated_tokens))
    return _pad_rows(rows, config.pad_token_id)


@contextlib.contextmanager
def _objects_frozen():
    """Keep the process's objects out of the garbage collections transformers runs as continuous batching stops
    (``gc.collect()`` twice per call: about 0.2 s each in a process holding a model), so that they only scan the
    call's own objects; unfrozen afterwards, the objects are collected as usual. Where something else froze objects
    already, that freeze is left as it is."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _pad_rows(rows: list[list[int]], pad_id: int) -> torch.Tensor:
    width = max(1, max(map(len, rows)))
    return torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long)


Backend = Callable[[object, torch.Tensor, torch.Tensor, int, GenerationConfig], torch.Tensor]
_BACKENDS: dict[str, Backend] = {"hf": _hf, "static": _static, "paged": _paged}
SAMPLERS = tuple(_BACKENDS)


def check_sampler(sampler: str) -> None:
    if sampler not in _BACKENDS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {sampler!r}")


@torch.no_grad()  # not inference_mode: FSDP gathers sharded weights in each forward call, which that forbids
def generate(
    model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, k: int, config: GenerationConfig, sampler: str = "hf"
) -> torch.Tensor:
    """``k`` samples per left-padded prompt, grouped consecutively: the new tokens ``[P * k, T]`` (padded after each
    sample's end), drawn by ``sampler`` (``hf``, ``static`` or ``paged``; see the module's docstring)."""
    check_sampler(sampler)
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    ids, mask = prompt_ids.to(dev), prompt_mask.to(dev)
    try:
        with _own_generation_config(model, config):
            out = _BACKENDS[sampler](model, ids, mask, k, config)
    finally:
        model.train(was_training)
    return out.cpu()


@dataclass
class Completions:
    """Sampled responses, split at their first end token."""

    ids: list[list[int]]  # the response's tokens, the end token not included
    end_ids: list[int | None]  # the end token each response stopped with; None where it was cut off

    @property
    def lengths(self) -> list[int]:
        return [len(x) for x in self.ids]

    @property
    def truncated(self) -> list[bool]:
        """Cut off at ``max_new_tokens`` without an end token."""
        return [e is None for e in self.end_ids]

    def scored_ids(self) -> list[list[int]]:
        """The tokens a sample's log-probability covers: the response and the end token it stopped with."""
        return [x if e is None else x + [e] for x, e in zip(self.ids, self.end_ids)]


def split_completions(new_tokens: torch.Tensor, eos_ids: Sequence[int]) -> Completions:
    """Each row of ``generate``'s new tokens up to its first end token."""
    eos = set(eos_ids)
    ids, ends = [], []
    for row in new_tokens.tolist():
        end = next((j for j, t in enumerate(row) if t in eos), None)
        ids.append(row if end is None else row[:end])
        ends.append(None if end is None else row[end])
    return Completions(ids, ends)


def sample_batch(tokenizer, prompt_texts: list[str], comps: Completions, k: int, extra: dict | None = None):
    """What the constraints see: ``k`` decoded responses per prompt, with their ids, lengths and cut-off flags."""
    return SampleBatch(
        prompts=[prompt_texts[i // k] for i in range(len(comps.ids))],
        completions=tokenizer.batch_decode(comps.ids, skip_special_tokens=True),
        completion_ids=comps.ids,
        lengths=torch.as_tensor(comps.lengths, dtype=torch.long),
        group_ids=torch.arange(len(prompt_texts)).repeat_interleave(k),
        truncated=torch.as_tensor(comps.truncated, dtype=torch.bool),
        extra=extra or {},
    )


def sample_examples(
    model,
    tokenizer,
    examples: Sequence[Example],
    k: int = 2,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    batch_size: int = 8,
    max_prompt_length: int = 256,
    seed: int | None = 0,
    progress: bool = True,
    sampler: str = "hf",
) -> SampleBatch:
    """``k`` samples for each example's prompt (held-out evaluation, ``l3m generate``), by :func:`generate`."""
    check_sampler(sampler)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if seed is not None:
        torch.manual_seed(seed)
    eos = eos_token_ids(model, tokenizer)
    config = generation_config(max_new_tokens, temperature, eos, tokenizer.pad_token_id)
    ids_all, ends_all = [], []
    bar = tqdm(total=len(examples), desc="sampling", disable=not progress, leave=False)
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        ids = [prompt_ids(tokenizer, ex.prompt)[-max_prompt_length:] for ex in chunk]
        p = pad(ids, tokenizer.pad_token_id, "left")
        m = pad([[1] * len(x) for x in ids], 0, "left")
        comps = split_completions(generate(model, p, m, k, config, sampler), eos)
        ids_all += comps.ids
        ends_all += comps.end_ids
        bar.update(len(chunk))
    bar.close()
    return sample_batch(tokenizer, [ex.prompt_text for ex in examples], Completions(ids_all, ends_all), k)
