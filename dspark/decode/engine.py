"""The Engine: requests in, streamed tokens out. The thin host loop around `step.py`.

Every `step()` admits waiting requests into free slots (pages are reserved at admission, so a
request that would not fit waits, and one that can never fit is refused up front), then runs one
forward: a prefill chunk for requests still reading their prompt, else one decode round for all
decoding requests. The only host reads are here, once per step, after the sync-free step
function returns: the tokens to stream and the counts that decide the next layout.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

import torch

from dspark.config import SamplingParams
from dspark.decode.adapt import AcceptanceTracker
from dspark.decode.buffers import SlotState
from dspark.decode.drafter import Drafter
from dspark.decode.graphs import CapturedRounds
from dspark.decode.mtp import MTPDrafter
from dspark.decode.ngram import NgramDrafter
from dspark.decode.stats import RequestStats
from dspark.decode import schedule as schedulers
from dspark.decode.step import (RoundPlan, decode_round, draft_and_schedule, prefill_layout, prefill_step,
                               verify_round)
from dspark.model.batch import context_bucket
from dspark.model.cache import CacheFullError, TargetCache

METHODS = ("ar", "mtp", "ngram")
DEFAULT_DRAFT_TOKENS = {"ar": 0, "mtp": 1, "ngram": 4}


@dataclass
class RequestOutput:
    request_id: int
    new_token_ids: list[int]
    new_logprobs: list[float]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    stats: RequestStats


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

    @property
    def committed(self) -> int:
        """Tokens in the target cache: the prompt and every output token but the anchor."""
        return self.prefilled + max(len(self.output) - 1, 0)


class Engine:
    def __init__(self, target, method: str = "ar", *, drafter: Drafter | None = None,
                 num_draft_tokens: int | None = None, max_batch: int = 8, max_seq_len: int | None = None,
                 prefill_chunk: int = 512, memory_budget: int | None = None, page_size: int | None = None,
                 token_bucket: int = 1, max_stop_tokens: int = 8, record_proposals: bool = False,
                 scheduler: str = "fixed", threshold: float = 0.0, sps=None, adapt: bool = False,
                 cuda_graphs: bool = False):
        if drafter is None and method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {METHODS} or a drafter object")
        if max_batch < 1 or prefill_chunk < 1 or token_bucket < 1:
            raise ValueError("max_batch, prefill_chunk and token_bucket must be >= 1")
        cfg = target.config
        self.target = target.eval()
        self.device = target.lm_head.weight.device
        self.max_batch, self.prefill_chunk, self.token_bucket = max_batch, prefill_chunk, token_bucket
        self.record_proposals = record_proposals  # read every round's drafts back (tests, acceptance studies)
        self.max_seq_len = max_seq_len or min(cfg.max_position_embeddings, 4096)
        gamma = drafter.num_draft_tokens if drafter is not None else (
            DEFAULT_DRAFT_TOKENS[method] if num_draft_tokens is None else num_draft_tokens)
        if drafter is not None and num_draft_tokens is not None and num_draft_tokens > gamma:
            raise ValueError(f"num_draft_tokens {num_draft_tokens} is larger than the drafter's block ({gamma})")
        # A drafter always drafts its full block; at most `max_verify` of it is verified per round.
        self.max_verify = gamma if num_draft_tokens is None or drafter is None else num_draft_tokens
        if method == "ar" and drafter is None and gamma != 0:
            raise ValueError("method 'ar' drafts nothing: num_draft_tokens must be 0 or None")
        if gamma < 0:
            raise ValueError(f"num_draft_tokens must be >= 0, got {gamma}")
        self.cache = TargetCache(cfg, max_batch=max_batch, max_seq_len=self.max_seq_len, max_provisional=gamma + 1,
                                 page_size=page_size, memory_budget=memory_budget, dtype=target.dtype,
                                 device=self.device, with_mtp=drafter is None and method == "mtp")
        if drafter is None:
            if method == "mtp":
                drafter = MTPDrafter(target, self.cache, gamma)
            elif method == "ngram":
                drafter = NgramDrafter(cfg.vocab_size, gamma, max_batch, self.max_seq_len, device=self.device)
            else:
                drafter = Drafter(cfg.vocab_size, 0)
        self.drafter, self.method = drafter, drafter.name
        self.num_draft_tokens = gamma
        self.slots = SlotState.allocate(max_batch, max_stop_tokens, self.device)
        self._schedule, self._capacities = self._scheduler(scheduler, threshold, sps), []
        # Online confidence correction from observed acceptances (only meaningful with a confidence head).
        self.tracker = AcceptanceTracker(max_batch, max(gamma, 1), device=self.device) if adapt else None
        self._k = torch.zeros((), dtype=torch.long, device=self.device)  # async capacity, updated in place
        # Decode rounds replayed from CUDA graphs (dspark/decode/graphs.py); prefill stays eager.
        self.graphs = CapturedRounds(max_batch, self.device) if cuda_graphs else None
        self._free_slots = list(range(max_batch - 1, -1, -1))
        self._waiting: deque[_Request] = deque()
        self._running: dict[int, _Request] = {}
        self._done: list[RequestOutput] = []
        self._next_id = 0

    # ---------------------------------------------------------------- requests
    def add_request(self, prompt_ids, params: SamplingParams | None = None) -> int:
        """Queue a request; bad input is refused here with a message naming the problem."""
        params = params or SamplingParams()
        cfg = self.target.config
        prompt = list(prompt_ids) if not isinstance(prompt_ids, torch.Tensor) else prompt_ids.flatten().tolist()
        if not prompt:
            raise ValueError("empty prompt: at least one token id is needed")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise ValueError("prompt token ids must be integers")
        bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} outside the vocabulary [0, {cfg.vocab_size})")
        params.validate(cfg.vocab_size)
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
            self.slots.assign(slot, req.params, req.seed, req.params.stop_token_ids)
            if self.tracker is not None:
                self.tracker.reset(slot, req.params.temperature)
            self.drafter.admit(slot, req.prompt)
            self._running[req.rid] = req

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
                             req.finish_reason, req.stats)

    def _scheduler(self, name: str, threshold: float, sps):
        """The verify-length rule as a device function (confidence, room, decoding) → ℓ [R]."""
        if name not in schedulers.SCHEDULERS:
            raise ValueError(f"unknown scheduler {name!r}; expected one of {schedulers.SCHEDULERS}")
        self.scheduler = name
        if name == "fixed":
            return lambda conf, room, active: schedulers.fixed(room.new_zeros(1, self.num_draft_tokens), room)
        if self.num_draft_tokens == 0:
            raise ValueError(f"scheduler {name!r} needs draft tokens; method {self.method!r} drafts none")
        if name.startswith("threshold"):
            if not 0 <= threshold <= 1:
                raise ValueError(f"threshold must be in [0, 1], got {threshold}")
            rule = schedulers.threshold_slot if name == "threshold-slot" else schedulers.threshold_survival
            return lambda conf, room, active: rule(self._need_confidence(conf), room, threshold)
        if isinstance(sps, str) and sps == "auto":  # profile this engine's own verify step (cached)
            from dspark.decode.sps import cached_profile, default_buckets, table

            top = self.max_batch * (self.num_draft_tokens + 1)
            sps = table(cached_profile(self.target, default_buckets(top), requests=self.max_batch), top)
        if sps is None or isinstance(sps, str) or len(sps) < 2:
            raise ValueError(f"scheduler {name!r} needs an SPS table (steps/s per verify batch size) or 'auto', "
                             f"got {sps!r}")
        self.sps = torch.as_tensor(sps, dtype=torch.float32, device=self.device)
        if not torch.isfinite(self.sps).all() or (self.sps[1:] <= 0).any():
            raise ValueError("the SPS table must hold positive, finite steps/s for every batch size >= 1")
        if name == "hardware":
            return lambda conf, room, active: schedulers.hardware(self._need_confidence(conf), room, active, self.sps)
        return lambda conf, room, active: schedulers.async_topk(self._need_confidence(conf), room, self._k)

    @staticmethod
    def _need_confidence(conf):
        if conf is None:
            raise ValueError("this scheduler needs a drafter with a confidence head (dspark)")
        return conf

    def _pad(self, n: int) -> int:
        return -(-n // self.token_bucket) * self.token_bucket

    # ---------------------------------------------------------------- one step
    def prefill_all(self) -> list[RequestOutput]:
        """Step until every request that fits is admitted and past its prompt (so the next step is a
        decode round); returns the outputs of those steps (benchmarks, profiles, tests)."""
        outputs = []
        while self._free_slots and self._waiting or any(r.prefilled < len(r.prompt) for r in self._running.values()):
            outputs += self.step()
        return outputs

    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        outputs, self._done = self._done, []
        self._admit()
        prefilling = [r for r in self._running.values() if r.prefilled < len(r.prompt)]
        if prefilling:
            outputs += self._prefill(prefilling)
        elif self._running:
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
            req.output.append(first[req.slot])
            req.logprobs.append(logprob[req.slot])
            if stopped[req.slot]:
                self._finish(req, "stop")
            elif len(req.output) >= req.params.max_tokens:
                self._finish(req, "length")
            outputs.append(self._output(req, 1))
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
        rows = sum(int(room[r.slot]) + 1 for r in reqs)
        if self.scheduler == "async":
            # Capacity from two rounds before: the bucket size is known before this round's drafts.
            k = self._capacities[-2] if len(self._capacities) >= 2 else rows - len(reqs)
            self._k.fill_(k)
            rows = min(rows, len(reqs) + k)
        g, bucket = self.graphs, self._pad(rows)
        if g is not None:
            plan = g.plan(committed, room, bucket, self._schedule, self.tracker)
        else:
            plan = RoundPlan(committed=committed.to(dev), room=room.to(dev), bucket=bucket, schedule=self._schedule,
                             tracker=self.tracker)
        # What the captured work depends on besides the bucket: the sampling parameters in use (greedy
        # only? filters?), the context bound.
        shape = (tuple(f is None for f in self.slots.sampling()), self.slots.context)
        target, cache, drafter, slots = self.target, self.cache, self.drafter, self.slots
        if self.scheduler in ("fixed", "async"):  # the bucket is known before drafting
            round_ = lambda: decode_round(target, cache, drafter, slots, plan)  # noqa: E731
            res = round_() if g is None else g.run(("round", bucket, shape), round_)
        else:
            # A synchronous adaptive scheduler: read what it chose (one scalar) and verify only that
            # many rows; a bucket sized for full blocks would cost as much as verifying them all.
            draft = lambda: draft_and_schedule(drafter, slots, plan)  # noqa: E731
            drafted = draft() if g is None else g.run(("draft", shape), draft)
            bucket = self._pad(int(drafted.rows))
            verify = lambda: verify_round(target, cache, drafter, slots, plan, drafted, bucket)  # noqa: E731
            if g is None:
                res = verify()
            elif g.is_static(("draft", shape), drafted):
                res = g.run(("verify", bucket, shape), verify)
            else:  # an eager draft's outputs are not at fixed addresses: a graph must not capture them
                res = verify()
        # Host read (the round's sync, besides an adaptive scheduler's row count): what to stream, and
        # the counts the next layout needs.
        tokens, num, accepted = res.tokens.tolist(), res.num_tokens.tolist(), res.accepted.tolist()
        logprobs, stopped, verified = res.logprobs.tolist(), res.stopped.tolist(), res.verify_len.tolist()
        proposals = res.proposal.tolist() if self.record_proposals else None
        conf = res.confidence_logits.tolist() if self.record_proposals and res.confidence_logits is not None else None
        if self.scheduler == "async":
            cap = schedulers.capacity(res.confidence, room.to(dev), decoding.to(dev), self.sps)
            self._capacities.append(int(cap))
        outputs = []
        for req in reqs:
            s = req.slot
            new = tokens[s][:num[s]]
            req.output += new
            req.logprobs += logprobs[s][:num[s]]
            req.stats.record(verified[s], accepted[s], num[s])
            if proposals is not None:
                req.stats.proposals.append(proposals[s])
            if conf is not None:
                req.stats.confidence_logits.append(conf[s])
            if stopped[s]:
                self._finish(req, "stop")
            elif len(req.output) >= req.params.max_tokens:
                self._finish(req, "length")
            outputs.append(self._output(req, len(new)))
        return outputs
