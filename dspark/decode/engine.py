"""The Engine: requests in, streamed tokens out. The thin host loop around `step.py`.

Every `step()` admits waiting requests into free slots (pages are reserved at admission, so a
request that would not fit waits, and one that can never fit is refused up front), then runs one
forward: a prefill chunk for requests still reading their prompt, else one decode round for all
decoding requests. The only host reads are here, once per step, after the sync-free step
function returns: the tokens to stream and the counts that decide the next layout.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field

import torch

from dspark.config import EngineConfig, SamplingParams
from dspark.decode import methods
from dspark.decode.adapt import AcceptanceTracker
from dspark.decode.buffers import SlotState
from dspark.decode.compiled import CompiledRounds, use_compiled_rounds
from dspark.decode.graphs import CapturedRounds
from dspark.decode.schedule import make_scheduler
from dspark.decode.stats import RequestStats
from dspark.decode.step import (RoundPlan, decode_round, draft_and_schedule, prefill_layout, prefill_step,
                               verify_round)
from dspark.model.batch import context_bucket
from dspark.model.cache import CacheFullError


@dataclass
class RequestOutput:
    """What one step added to one request (the engine's only result type)."""

    request_id: int
    new_token_ids: list[int]  # a stop token the request emitted is the last one, and kept
    new_logprobs: list[float]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error"
    stats: RequestStats
    stop_token: int | None = None  # the stop token that finished the request (finish_reason "stop")
    error: str | None = None  # what went wrong (finish_reason "error"); batch mates are unaffected


@dataclass
class _Request:
    rid: int
    prompt: list[int]
    params: SamplingParams
    seed: int
    slot: int | None = None
    prefilled: int = 0  # prompt tokens in the cache
    output: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    stats: RequestStats = field(default_factory=RequestStats)
    finish_reason: str | None = None
    stop_token: int | None = None
    error: str | None = None

    @property
    def committed(self) -> int:
        """Tokens in the target cache: the prompt and every output token but the anchor."""
        return self.prefilled + max(len(self.output) - 1, 0)


class Engine:
    """`Engine(target, method, draft=None, config=EngineConfig(...))`: the method's drafter (built
    here, with the engine's sizes, from dspark.decode.methods), its scheduler, the paged target
    cache and the slots. `draft` is the trained draft model of the block methods (dspark, dflash...)."""

    def __init__(self, target, method: str | methods.Method = "ar", draft=None, config: EngineConfig | None = None):
        config = EngineConfig() if config is None else config
        if not isinstance(config, EngineConfig):
            raise TypeError(f"config must be an EngineConfig, got {type(config).__name__}")
        spec = methods.get(method)
        if spec.needs_draft and draft is None:
            raise ValueError(f"method {method!r} needs a trained draft model (draft=...)")
        if draft is not None and not spec.needs_draft:
            raise ValueError(f"method {method!r} takes no draft model")
        gamma, self.max_verify = spec.draft_tokens(draft, config.num_draft_tokens)
        cfg = target.config
        self.target, self.config, self.method = target.eval(), config, spec.name
        self.device = target.lm_head.weight.device
        self.max_batch, self.prefill_chunk, self.token_bucket = config.max_batch, config.prefill_chunk, config.token_bucket
        self.max_seq_len = config.max_seq_len or min(cfg.max_position_embeddings, 4096)
        self.num_draft_tokens = gamma
        self.cache = target.new_cache(max_batch=self.max_batch, max_seq_len=self.max_seq_len, max_provisional=gamma + 1,
                                      page_size=config.page_size, memory_budget=config.memory_budget,
                                      with_mtp=spec.needs_mtp)
        self.drafter = spec.build(target, self.cache, draft, gamma, self.max_batch, self.max_seq_len)
        self.scheduler = make_scheduler(config.scheduler, gamma, has_confidence=self.drafter.has_confidence,
                                        threshold=config.threshold, sps=config.sps, device=self.device)
        self.slots = SlotState.allocate(self.max_batch, config.max_stop_tokens, self.device)
        # Online confidence correction from observed acceptances (only meaningful with a confidence head).
        self.tracker = AcceptanceTracker(self.max_batch, max(gamma, 1), device=self.device) if config.adapt else None
        # Decode rounds replayed from CUDA graphs (dspark/decode/graphs.py); prefill stays eager.
        self.graphs = CapturedRounds(self.max_batch, self.device) if config.cuda_graphs else None
        # Or compiled by inductor on CPU (dspark/decode/compiled.py), keyed like the graphs.
        compile_rounds = use_compiled_rounds(config.compile, self.device, getattr(cfg, "kernels", "auto"))
        self.compiled = CompiledRounds() if compile_rounds else None
        self.last_round_requests = 0  # requests in the last decode round; 0 after a prefill step (benchmarks)
        self._free_slots = list(range(self.max_batch - 1, -1, -1))
        self._waiting: deque[_Request] = deque()
        self._running: dict[int, _Request] = {}
        self._done: list[RequestOutput] = []
        self._next_id = 0

    # ---------------------------------------------------------------- requests
    def add_request(self, prompt_ids, params: SamplingParams | None = None) -> int:
        """Queue a request; bad input is refused here with a message naming the problem."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        cfg = self.target.config
        if isinstance(prompt_ids, torch.Tensor):
            if prompt_ids.dim() != 1:
                raise ValueError(f"a prompt tensor must be 1-D token ids, got shape {list(prompt_ids.shape)}")
            prompt_ids = prompt_ids.tolist()
        if isinstance(prompt_ids, (str, bytes)):
            raise TypeError("prompt_ids must be token ids, not text (dspark.LLM takes text)")
        try:
            prompt = list(prompt_ids)
        except TypeError:
            raise TypeError(f"prompt_ids must be a sequence of token ids, got {type(prompt_ids).__name__}") from None
        if not prompt:
            raise ValueError("empty prompt: at least one token id is needed")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise ValueError("prompt token ids must be integers")
        bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} outside the vocabulary [0, {cfg.vocab_size})")
        bad = [t for t in params.stop_token_ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"stop token ids {bad} outside the vocabulary [0, {cfg.vocab_size})")
        if len(params.stop_token_ids) > self.slots.stop_tokens.shape[1]:
            raise ValueError(f"at most {self.slots.stop_tokens.shape[1]} stop token ids per request")
        need = self._reserve(len(prompt), params)
        if need > self.max_seq_len:
            raise ValueError(f"prompt ({len(prompt)}) + max_tokens ({params.max_tokens}) needs {need} cache "
                             f"positions with {self.num_draft_tokens} draft tokens; this engine holds {self.max_seq_len} "
                             "(raise max_seq_len)")
        if self.cache.pages_for(need) > self.cache.num_pages - 1:
            raise ValueError(f"the request needs {self.cache.pages_for(need)} cache pages; the cache has "
                             f"{self.cache.num_pages - 1} in all")
        seed = params.seed if params.seed is not None else random.getrandbits(62)
        rid = self._next_id
        self._next_id += 1
        req = _Request(rid, prompt, params, seed)
        req.stats.prompt_tokens = len(prompt)
        self._waiting.append(req)
        return rid

    def abort(self, request_id: int) -> None:
        for req in list(self._waiting):
            if req.rid == request_id:
                self._waiting.remove(req)
                req.finish_reason = "abort"
                self._done.append(self._output(req, 0))
                return
        req = self._running.get(request_id)
        if req is not None:
            self._finish(req, "abort")
            self._done.append(self._output(req, 0))

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

    @property
    def num_running(self) -> int:
        """Requests in slots (prefilling or decoding)."""
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        """Requests queued for a slot or for KV pages."""
        return len(self._waiting)

    def take_finished(self, request_ids) -> list[RequestOutput]:
        """The outputs of these requests that ended between steps (aborts, failed admissions), now
        rather than at the next step, which would also run a forward; others stay for that step."""
        ids = set(request_ids)
        done = [o for o in self._done if o.request_id in ids]
        self._done = [o for o in self._done if o.request_id not in ids]
        return done

    def _reserve(self, prompt_len: int, params: SamplingParams) -> int:
        # Cache positions a request may touch: its prompt, its outputs, and the drafts of a round.
        return prompt_len + params.max_tokens + self.num_draft_tokens + 1

    def _admit(self) -> None:
        while self._waiting and self._free_slots:
            req = self._waiting[0]
            slot = self._free_slots[-1]
            try:
                self.cache.admit(slot, self._reserve(len(req.prompt), req.params))
            except CacheFullError:
                return  # first come, first served: wait until a running request frees pages
            self._free_slots.pop()
            self._waiting.popleft()
            req.slot = slot
            self._running[req.rid] = req
            try:  # all or nothing: a request that cannot be loaded into its slot leaves no trace there
                self.slots.assign(slot, req.params, req.seed, req.params.stop_token_ids)
                if self.tracker is not None:
                    self.tracker.reset(slot, req.params.temperature)
                self.drafter.admit(slot, req.prompt)
            except Exception as e:
                req.error = f"admission failed: {e}"
                self._finish(req, "error")
                self._done.append(self._output(req, 0))

    def _finish(self, req: _Request, reason: str) -> None:
        req.finish_reason = reason
        self._running.pop(req.rid, None)
        self.cache.release(req.slot)
        self.slots.release(req.slot)
        self.drafter.release(req.slot)
        self._free_slots.append(req.slot)

    def _output(self, req: _Request, new: int) -> RequestOutput:
        return RequestOutput(req.rid, req.output[len(req.output) - new:] if new else [],
                             req.logprobs[len(req.logprobs) - new:] if new else [], req.finish_reason is not None,
                             req.finish_reason, req.stats, req.stop_token, req.error)

    def _stop(self, req: _Request) -> None:
        """The request emitted a stop token (its last output token)."""
        req.stop_token = req.output[-1]
        self._finish(req, "stop")

    def _pad(self, n: int) -> int:
        return -(-n // self.token_bucket) * self.token_bucket

    # ---------------------------------------------------------------- one step
    def prefill_all(self) -> list[RequestOutput]:
        """Step until every request that fits is admitted and past its prompt (so the next step is a
        decode round); returns the outputs of those steps (benchmarks, profiles, tests)."""
        outputs = []
        while self.prefilling:
            outputs += self.step()
        return outputs

    @property
    def prefilling(self) -> bool:
        """Whether a request is waiting or still reading its prompt (the next step is not a pure decode round)."""
        return bool(self._free_slots and self._waiting) or any(
            r.prefilled < len(r.prompt) for r in self._running.values())

    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        self._admit()
        outputs, self._done = self._done, []  # aborts since the last step, and failed admissions
        self.last_round_requests = 0
        prefilling = [r for r in self._running.values() if r.prefilled < len(r.prompt)]
        if prefilling:
            outputs += self._prefill(prefilling)
        elif self._running:
            self.last_round_requests = len(self._running)
            outputs += self._decode(list(self._running.values()))
        return outputs

    def _prefill(self, reqs: list[_Request]) -> list[RequestOutput]:
        budget, chunks, taken = self.prefill_chunk, [], []
        for req in reqs:
            n = min(len(req.prompt) - req.prefilled, budget)
            if n <= 0:
                break
            p = req.prefilled
            chunks.append((req.slot, p, req.prompt[p:p + n], req.prompt[p + 1:p + n + 1], p + n == len(req.prompt)))
            taken.append((req, n))
            budget -= n
        real = sum(len(c[2]) for c in chunks)
        layout = prefill_layout(chunks, max_batch=self.max_batch, dummy_slot=self.cache.dummy_slot,
                                pad_to=self._pad(real), device=self.device)
        res = prefill_step(self.target, self.cache, self.drafter, self.slots, layout)
        # Host read (the step's only sync): first tokens of the requests whose prompt ended.
        first, logprob, stopped = res.tokens[:, 0].tolist(), res.logprobs[:, 0].tolist(), res.stopped.tolist()
        outputs = []
        for req, n in taken:
            req.prefilled += n
            req.stats.prefill_forwards += 1
            if req.prefilled < len(req.prompt):
                continue
            new = self._take(req, [first[req.slot]], [logprob[req.slot]])
            if req.finish_reason is not None:
                pass  # non-finite logits: finished with an error
            elif stopped[req.slot]:
                self._stop(req)
            elif len(req.output) >= req.params.max_tokens:
                self._finish(req, "length")
            outputs.append(self._output(req, new))
        return outputs

    def _decode(self, reqs: list[_Request]) -> list[RequestOutput]:
        dev = self.device
        decoding = torch.zeros(self.max_batch, dtype=torch.bool)
        committed = torch.zeros(self.max_batch, dtype=torch.long)
        room = torch.zeros(self.max_batch, dtype=torch.long)
        for r in reqs:
            decoding[r.slot] = True
            committed[r.slot] = r.committed
            room[r.slot] = min(self.max_verify, r.params.max_tokens - len(r.output) - 1)
        self.slots.decoding.copy_(decoding)
        self.slots.context = context_bucket(max(r.committed + int(room[r.slot]) + 1 for r in reqs))
        rows = self.scheduler.cap_rows(sum(int(room[r.slot]) + 1 for r in reqs), len(reqs))
        g, bucket = self.graphs, self._pad(rows)
        if g is not None:
            plan = g.plan(committed, room, bucket, self.scheduler, self.tracker)
        else:
            plan = RoundPlan(committed=committed.to(dev), room=room.to(dev), bucket=bucket, scheduler=self.scheduler,
                             tracker=self.tracker)
        # What the captured work depends on besides the bucket: the sampling parameters in use (greedy
        # only? filters?), the context bound.
        shape = (tuple(f is None for f in self.slots.sampling()), self.slots.context)
        target, cache, drafter, slots = self.target, self.cache, self.drafter, self.slots
        if self.scheduler.sized_before_drafting:
            res = self._run(("round", bucket, shape), decode_round, target, cache, drafter, slots, plan)
        else:
            # A synchronous adaptive scheduler: read what it chose (one scalar) and verify only that
            # many rows; a bucket sized for full blocks would cost as much as verifying them all.
            drafted = self._run(("draft", shape), draft_and_schedule, drafter, slots, plan)
            bucket = self._pad(int(drafted.rows))
            if g is None or g.is_static(("draft", shape), drafted):
                res = self._run(("verify", bucket, shape), verify_round, target, cache, drafter, slots, plan, drafted,
                                bucket)
            else:  # an eager draft's outputs are not at fixed addresses: a graph must not capture them
                res = verify_round(target, cache, drafter, slots, plan, drafted, bucket)
        # Host read (the round's sync, besides an adaptive scheduler's row count): what to stream, and
        # the counts the next layout needs.
        tokens, num, accepted = res.tokens.tolist(), res.num_tokens.tolist(), res.accepted.tolist()
        logprobs, stopped, verified = res.logprobs.tolist(), res.stopped.tolist(), res.verify_len.tolist()
        proposals = res.proposal.tolist() if self.config.record_proposals else None
        conf = res.confidence_logits.tolist() if self.config.record_proposals and res.confidence_logits is not None else None
        self.scheduler.observe(res.confidence, room.to(dev), decoding.to(dev))
        outputs = []
        for req in reqs:
            s = req.slot
            new = self._take(req, tokens[s][:num[s]], logprobs[s][:num[s]])
            req.stats.record(verified[s], accepted[s], num[s])
            if proposals is not None:
                req.stats.proposals.append(proposals[s])
            if conf is not None:
                req.stats.confidence_logits.append(conf[s])
            if req.finish_reason is not None:
                pass  # non-finite logits: finished with an error
            elif stopped[s]:
                self._stop(req)
            elif len(req.output) >= req.params.max_tokens:
                self._finish(req, "length")
            outputs.append(self._output(req, new))
        return outputs

    def _run(self, key, fn, *args):
        """fn(*args), one round or half of one: replayed from its CUDA graph, compiled, or eager."""
        if self.graphs is not None:
            return self.graphs.run(key, lambda: fn(*args))
        if self.compiled is not None:
            return self.compiled.run(key, fn, *args)
        return fn(*args)

    def _take(self, req: _Request, tokens: list[int], logprobs: list[float]) -> int:
        """Append a step's emitted tokens to the request; returns how many were taken.

        NaN policy: an emitted token's log-probability is finite whenever the target's logits row is
        (a sampled or accepted token has probability > 0), so a non-finite one means NaN or inf
        logits. The request then ends with finish_reason "error" before that token, and its batch
        mates go on. The check reads only values the host reads anyway: no extra sync."""
        good = next((i for i, lp in enumerate(logprobs) if not math.isfinite(lp)), len(tokens))
        req.output += tokens[:good]
        req.logprobs += logprobs[:good]
        if good < len(tokens):
            req.error = (f"the target's logits were not finite (NaN or inf) at output token {len(req.output)}; "
                         "the request was stopped there")
            self._finish(req, "error")
        return good
