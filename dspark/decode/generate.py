"""The one host loop around `Engine.step`, and `generate()` on top of it.

`run(engine, prompts, params)` admits the requests at once (bad input is refused there, before any
step), then yields each step's outputs for them until all have finished; closing it early aborts
what is left. Every caller that drives an engine goes through it: `generate` here, `dspark.LLM`
(text, stop strings, streaming), the acceptance harness (dspark.eval), the training recipe, the
profiler and the benchmarks (which time each `next()`). `Driver` is the loop's body (add, abort,
step, close): `run` drives a fixed set of requests through it, the HTTP server (dspark.serve)
requests that arrive while it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from dspark import checkpoint
from dspark.config import EngineConfig, SamplingParams
from dspark.decode.engine import Engine, RequestOutput
from dspark.decode.methods import Method
from dspark.decode.stats import RequestStats


@dataclass
class GenerationResult:
    """One prompt's whole result: what its RequestOutputs added up to."""

    token_ids: list[int]  # a stop token that ended the request is kept, last
    logprobs: list[float]
    finish_reason: str | None
    stats: RequestStats = field(default_factory=RequestStats)
    stop_token: int | None = None


class Driver:
    """The same loop for requests that arrive over time (the HTTP server's engine thread): `add` and
    `abort` between steps, `step()` for one step's outputs of the requests added here. Requests join
    and leave the running batch between rounds (continuous batching); `close()` aborts what is left."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.pending: set[int] = set()  # added here and not yet reported finished

    def add(self, prompt: Sequence[int], params: SamplingParams) -> int:
        """Queue one request (bad input raises here, naming the problem); returns its id."""
        rid = self.engine.add_request(prompt, params)
        self.pending.add(rid)
        return rid

    def abort(self, request_id: int) -> None:
        """End a request at the next step (its slot and pages are freed now); it reports finish_reason "abort"."""
        if request_id in self.pending:
            self.engine.abort(request_id)

    def step(self) -> list[RequestOutput]:
        """One engine step; its outputs for the pending requests (an aborted one reports its end here)."""
        outputs = self.engine.step()
        if not outputs and self.pending and not self.engine.has_unfinished():
            raise RuntimeError(f"the engine stopped without finishing requests {sorted(self.pending)}")
        mine = [o for o in outputs if o.request_id in self.pending]
        self.pending.difference_update(o.request_id for o in mine if o.finished)
        return mine

    def close(self) -> list[RequestOutput]:
        """Abort every pending request; returns their final outputs (finish_reason "abort"), which
        only aborts make: no forward runs for other requests sharing the engine."""
        for rid in list(self.pending):
            self.engine.abort(rid)
        done = self.engine.take_finished(self.pending)
        self.pending.clear()
        return done


class Run:
    """The requests of one `run` call: iterate for each step's outputs of them (a list per step,
    possibly empty) until all have finished; `close()` aborts the unfinished ones."""

    def __init__(self, driver: Driver, request_ids: list[int]):
        self.request_ids = request_ids  # in prompt order
        self._steps = _steps(driver)

    def __iter__(self) -> Iterator[list[RequestOutput]]:
        return self

    def __next__(self) -> list[RequestOutput]:
        return next(self._steps)

    def close(self) -> None:
        self._steps.close()


def run(engine: Engine, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> Run:
    """Add every request now (all or nothing: a bad one raises here and leaves none queued), then
    step the engine as the returned `Run` is iterated."""
    if len(prompts) != len(params):
        raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling parameters")
    driver = Driver(engine)
    try:
        ids = [driver.add(prompt, p) for prompt, p in zip(prompts, params)]
    except BaseException:
        driver.close()  # all or nothing: a bad request leaves nothing queued
        raise
    return Run(driver, ids)


def _steps(driver: Driver) -> Iterator[list[RequestOutput]]:
    try:
        while driver.pending:
            yield driver.step()
    finally:  # reached on errors and when the caller closes the iterator early
        driver.close()


def collect(engine: Engine, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]
            ) -> list[GenerationResult]:
    """`run` to the end: one GenerationResult per prompt, in order."""
    requests = run(engine, prompts, params)
    results = {rid: GenerationResult([], [], None) for rid in requests.request_ids}
    for outputs in requests:
        for out in outputs:
            res = results[out.request_id]
            res.token_ids += out.new_token_ids
            res.logprobs += out.new_logprobs
            res.stats, res.finish_reason, res.stop_token = out.stats, out.finish_reason, out.stop_token
    return [results[rid] for rid in requests.request_ids]


def _per_prompt(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} prompts")
        return list(value)
    return [value] * n


def generate(target, prompts: Sequence[Sequence[int]], *, method: str | Method = "ar", draft=None,
             num_draft_tokens: int | None = None, max_new_tokens=16, temperature=0.0, top_k=0, top_p=1.0,
             seed=None, eos_token_id=None, max_batch: int = 8, max_seq_len: int | None = None,
             **config_fields) -> list[GenerationResult]:
    """Generate for every prompt (lists of token ids) with a new engine; scalars broadcast, lists give
    per-prompt values. `draft` is the trained draft of a block method (dspark, dflash, ...): a model,
    or a checkpoint directory loaded with `dspark.checkpoint.load_draft(draft, target)` in the
    target's dtype, device and kernels.

    `seed` as an int gives prompt i the seed `seed + i`; `eos_token_id` (int or list) stops a request
    when emitted (the stop token is kept in `token_ids`). Other keywords are `EngineConfig` fields
    (scheduler, sps, token_bucket, record_proposals, ...).
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
    config = EngineConfig(max_batch=max_batch, max_seq_len=max_seq_len, num_draft_tokens=num_draft_tokens,
                          **config_fields)
    if isinstance(draft, (str, Path)):
        weight = next(target.parameters())
        draft = checkpoint.load_draft(draft, target, dtype=weight.dtype, device=weight.device,
                                      kernels=getattr(target.config, "kernels", "auto"))
    return collect(Engine(target, method, draft=draft, config=config), prompts, params)


__all__ = ["Driver", "GenerationResult", "Run", "collect", "generate", "run"]
