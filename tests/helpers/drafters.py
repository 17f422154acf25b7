"""Test-only drafters and engine fixtures: an oracle that knows the continuation, a deliberately wrong
one, an untrained DSpark draft for the tiny preset with a toy SPS table, the peaked tiny target with
its prompts and greedy `ar` transcripts, the DSpark-configured target with its drafts (both layouts),
and the per-round bookkeeping the engine tests check acceptances with."""

from __future__ import annotations

import functools

import torch

from dspark import ops
from dspark.config import DraftConfig, DSparkFields, ModelConfig
from dspark.decode import generate
from dspark.decode.drafter import Drafter, Proposal, one_hot_logits
from dspark.decode.methods import Method
from dspark.draft.deepspec import DraftModel
from dspark.draft.v4 import V4DSparkDraft
from dspark.model.target import DeepseekV4

# Steps/s per verify batch size that fall gently with B: every hardware / async decision stays live.
TOY_SPS = [0.0] + [1 / (1 + 0.01 * b) for b in range(1, 200)]


def tiny_dspark_draft(vocab_size: int) -> DraftModel:
    """An untrained DSpark draft over the tiny preset's layers 1 and 2 (hidden size 56)."""
    return DraftModel.random(DraftConfig.tiny(vocab_size=vocab_size, mask_token_id=500, target_layer_ids=(1, 2),
                                              target_hidden_size=56), seed=2).eval()


class _PositionTracking(Drafter):
    """Keeps each slot's anchor position (the committed length) from `observe`."""

    def __init__(self, vocab_size: int, num_draft_tokens: int, max_batch: int):
        super().__init__(vocab_size, num_draft_tokens)
        self.anchor_pos = torch.zeros(max_batch, dtype=torch.long)

    def observe(self, out, batch, next_ids, last_row, ready):
        self.anchor_pos = torch.where(ready, batch.positions[last_row] + 1, self.anchor_pos)


class OracleDrafter(_PositionTracking):
    has_confidence = True

    """Proposes the true continuation, each slot replaced by a uniform random token with
    probability rho. `truths` maps a prompt (tuple) to its full true sequence (prompt + continuation).
    The choice is deterministic given the draft uniforms, so it is reported as a one-hot."""

    def __init__(self, vocab_size: int, num_draft_tokens: int, max_batch: int, truths: dict, rho: float,
                 max_len: int = 512):
        super().__init__(vocab_size, num_draft_tokens, max_batch)
        self.truths, self.rho = truths, rho
        self.truth = torch.zeros(max_batch, max_len, dtype=torch.long)

    def admit(self, slot, prompt):
        seq = self.truths[tuple(prompt)]
        self.truth[slot] = 0
        self.truth[slot, : len(seq)] = torch.tensor(seq)

    def propose(self, slots, u):
        gamma = self.num_draft_tokens
        pos = (self.anchor_pos.unsqueeze(-1) + 1 + torch.arange(gamma)).clamp(max=self.truth.shape[1] - 1)
        true = self.truth.gather(1, pos)
        corrupt = u < self.rho
        noise = (u / max(self.rho, 1e-12) * self.vocab_size).long().clamp(max=self.vocab_size - 1)
        tokens = torch.where(corrupt, noise, true)
        return Proposal(tokens=tokens, logits=one_hot_logits(tokens, self.vocab_size),
                        confidence=torch.full(tokens.shape, 1 - self.rho))


class FixedDistributionDrafter(_PositionTracking):
    """Ignores the context: every slot is sampled from one fixed distribution (a wrong drafter with a
    genuinely soft q, so rejection must use the residual correctly)."""

    def __init__(self, vocab_size: int, num_draft_tokens: int, max_batch: int, logits: torch.Tensor):
        super().__init__(vocab_size, num_draft_tokens, max_batch)
        self.fixed = logits.float()

    def propose(self, slots, u):
        r, gamma = slots.anchor.shape[0], self.num_draft_tokens
        logits = self.fixed.expand(r, gamma, -1)
        q = ops.probs(logits.reshape(r * gamma, -1), *(p if p is None else p.repeat_interleave(gamma)
                                                             for p in slots.sampling()))
        tokens = ops.sample(q, u.reshape(-1)).view(r, gamma)
        return Proposal(tokens=tokens, logits=logits.clone())


def oracle_method(truths: dict, rho: float, gamma: int, max_len: int = 512) -> Method:
    """A method whose drafter is an `OracleDrafter` (built by the engine with its sizes)."""
    return Method("oracle", lambda target, cache, draft, g, max_batch, max_seq_len: OracleDrafter(
        target.config.vocab_size, g, max_batch, truths, rho, max_len), False, False, gamma, "test oracle")


def wrong_method(logits: torch.Tensor, gamma: int) -> Method:
    """A method whose drafter samples every slot from one fixed distribution."""
    return Method("wrong", lambda target, cache, draft, g, max_batch, max_seq_len: FixedDistributionDrafter(
        target.config.vocab_size, g, max_batch, logits), False, False, gamma, "test: a wrong drafter")


# The peaked tiny target of the engine tests.

PROMPT_LENGTHS = (3, 14, 33)  # below the window (16), across CSA (4) and HCA (16) boundaries
NEW_TOKENS = 40


@functools.lru_cache(maxsize=None)
def peaked_model(seed: int = 0) -> DeepseekV4:
    """A random tiny model whose LM head favours a few tokens, so the target repeats itself and the
    (shared-head) MTP and n-gram drafters get real acceptances."""
    model = DeepseekV4.random(ModelConfig.tiny(), seed=seed).eval()
    with torch.no_grad():
        model.lm_head.weight[2:5] *= 12
    return model


@functools.lru_cache(maxsize=None)
def prompts(seed: int = 0) -> tuple[tuple[int, ...], ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(tuple(torch.randint(2, 500, (n,), generator=g).tolist()) for n in PROMPT_LENGTHS)


@functools.lru_cache(maxsize=None)
def greedy_ar() -> tuple[tuple[int, ...], ...]:
    res = generate(peaked_model(), [list(p) for p in prompts()], max_new_tokens=NEW_TOKENS, max_seq_len=128)
    return tuple(tuple(r.token_ids) for r in res)


def rounds_of(prompt_len: int, stats) -> list[tuple[int, int, int]]:
    """(anchor position L, verify length ℓ, accepted a) per decode round."""
    out, pos = [], prompt_len
    for ell, a, n in zip(stats.proposal_lens, stats.accepted, stats.emitted):
        out.append((pos, ell, a))
        pos += n
    return out


def accepted_against(proposal: list[int], transcript: list[int], pos: int, ell: int) -> int:
    a = 0
    while a < ell and proposal[a] == transcript[pos + 1 + a]:
        a += 1
    return a


# The DSpark-configured tiny target and its drafts (the DSpark drafter and compile tests).

DSPARK_NOISE = 500


@functools.lru_cache(maxsize=None)
def dspark_target() -> DeepseekV4:
    cfg = ModelConfig.tiny(dspark=DSparkFields(block_size=5, noise_token_id=DSPARK_NOISE, target_layer_ids=(1, 2, 3),
                                               markov_rank=6))
    model = DeepseekV4.random(cfg, seed=0).eval()
    with torch.no_grad():
        model.lm_head.weight[2:5] *= 12  # a repetitive target, so drafts get accepted sometimes
    return model


def qwen_draft(kind: str) -> DraftModel:
    t = dspark_target()
    rank = 0 if kind == "dflash" else 6
    cfg = DraftConfig.tiny(vocab_size=t.config.vocab_size, mask_token_id=DSPARK_NOISE, target_layer_ids=(1, 2),
                           num_target_layers=t.config.num_layers, target_hidden_size=t.config.hidden_size,
                           markov_rank=rank, markov_head_type="vanilla" if rank == 0 else kind,
                           has_confidence_head=rank > 0, confidence_with_markov=rank > 0, block_size=4)
    draft = DraftModel.random(cfg, seed=1).eval()
    with torch.no_grad():  # favour the tokens the peaked target repeats, so some drafts are accepted
        draft.lm_head.weight[2:5] *= 20
    return draft


def v4_draft() -> V4DSparkDraft:
    return V4DSparkDraft.random(dspark_target().config, 3, seed=2).eval().attach(dspark_target())


def make_draft(kind):
    return v4_draft() if kind == "v4" else qwen_draft(kind)
