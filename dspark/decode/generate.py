"""`generate()`: token ids in, token ids out, through one Engine (continuous batching)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from dspark.config import SamplingParams
from dspark.decode.drafter import Drafter
from dspark.decode.engine import Engine
from dspark.decode.stats import RequestStats


@dataclass
class GenerationResult:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None
    stats: RequestStats = field(default_factory=RequestStats)


def _per_prompt(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} prompts")
        return list(value)
    return [value] * n


def generate(target, prompts: Sequence[Sequence[int]], *, method: str = "ar", drafter: Drafter | None = None,
             num_draft_tokens: int | None = None, max_new_tokens=16, temperature=0.0, top_k=0, top_p=1.0,
             seed=None, eos_token_id=None, max_batch: int = 8, max_seq_len: int | None = None,
             **engine_kw) -> list[GenerationResult]:
    """Generate for every prompt (lists of token ids); scalars broadcast, lists give per-prompt values.

    `seed` as an int gives prompt i the seed `seed + i`; `eos_token_id` (int or list) stops a request
    when emitted (the stop token is kept in `token_ids`).
    """
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise ValueError("prompts must be a list of token-id lists")
    n = len(prompts)
    if isinstance(seed, int) or seed is None:
        seeds = [None if seed is None else seed + i for i in range(n)]
    else:
        seeds = _per_prompt(seed, n, "seed")
    stops = tuple([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or ()))
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, seed=s, stop_token_ids=stops, max_tokens=m)
              for t, k, p, s, m in zip(_per_prompt(temperature, n, "temperature"), _per_prompt(top_k, n, "top_k"),
                                       _per_prompt(top_p, n, "top_p"), seeds,
                                       _per_prompt(max_new_tokens, n, "max_new_tokens"))]
    engine = Engine(target, method, drafter=drafter, num_draft_tokens=num_draft_tokens, max_batch=max_batch,
                    max_seq_len=max_seq_len, **engine_kw)
    ids = [engine.add_request(list(p), sp) for p, sp in zip(prompts, params)]
    results = {rid: GenerationResult([], [], None) for rid in ids}
    while engine.has_unfinished():
        for out in engine.step():
            res = results[out.request_id]
            res.token_ids += out.new_token_ids
            res.logprobs += out.new_logprobs
            res.stats = out.stats
            res.finish_reason = out.finish_reason
    return [results[rid] for rid in ids]


__all__ = ["generate", "GenerationResult"]
