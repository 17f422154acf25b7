"""DSpark / DFlash drafters in the engine, both layouts: greedy output equals `ar`, and every round's
drafts equal a cache-free re-run of the draft at that anchor (dense target features, no ring)."""

from __future__ import annotations

import functools

import pytest
import torch

from dspark.decode import generate
from dspark.draft.v4 import V4DSparkDraft
from dspark.model.target import DeepseekV4
from tests.helpers.drafters import accepted_against, dspark_target as target, make_draft, qwen_draft, rounds_of

PROMPTS = ([7, 8, 9], list(range(20, 34)), list(range(100, 133)))
NEW = 36


def reference_proposal(draft, context: list[int]) -> list[int]:
    """Cache-free: dense target features of the committed tokens, all (or the last window of) context
    rows, one block at the anchor context[-1], greedy."""
    t = target()
    anchor_pos = len(context) - 1
    with torch.no_grad():
        out = t.run(torch.tensor([context[:-1]]), tap_layers=draft.tap_layers)
        features = torch.cat([out.taps[layer][0] for layer in draft.tap_layers], dim=-1)
        rows = draft.context_rows(draft.project_context(features), torch.arange(anchor_pos))
        window = draft.context_window or anchor_pos
        keep = slice(max(0, anchor_pos - window), anchor_pos)
        rows = [tuple(r[keep].unsqueeze(0) for r in layer) for layer in rows]
        n = rows[0][0].shape[1]
        gamma = draft.block_size
        ids = torch.tensor([[context[-1]] + [draft.block_input_token] * (gamma - 1)])
        pos = anchor_pos + torch.arange(gamma).unsqueeze(0)
        tokens, _, _ = draft.draft_block(ids, pos, rows, torch.ones(1, n, dtype=torch.bool), ids[:, 0],
                                         torch.zeros(1), torch.zeros(1, dtype=torch.long), torch.ones(1),
                                         torch.zeros(1, gamma))
    return tokens[0].tolist()


@functools.lru_cache(maxsize=None)
def greedy_ar():
    return tuple(tuple(r.token_ids) for r in generate(target(), [list(p) for p in PROMPTS], max_new_tokens=NEW,
                                                       max_seq_len=128))


@pytest.mark.parametrize("kind", ["vanilla", "gated", "rnn", "dflash", "v4"])
def test_greedy_lossless_and_drafts_match_a_cache_free_rerun(kind):
    draft = make_draft(kind)
    results = generate(target(), [list(p) for p in PROMPTS], method="dspark", draft=draft, max_new_tokens=NEW,
                       max_seq_len=128,
                       max_batch=4, token_bucket=4, record_proposals=True)
    accepted = 0
    for prompt, res, want in zip(PROMPTS, results, greedy_ar()):
        assert tuple(res.token_ids) == want
        transcript = list(prompt) + res.token_ids
        for (pos, ell, a), drafted in zip(rounds_of(len(prompt), res.stats), res.stats.proposals):
            proposal = reference_proposal(draft, transcript[:pos + 1])
            assert drafted == proposal, f"{kind}: drafts at anchor {pos}"
            assert a == accepted_against(proposal, transcript, pos, ell)
            accepted += a
    assert accepted >= 5, f"{kind}: too few acceptances to exercise the drafter"


def test_confidence_reaches_the_scheduler():
    results = generate(target(), [list(p) for p in PROMPTS], method="dspark", draft=make_draft("vanilla"),
                       max_new_tokens=NEW, max_seq_len=128,
                       max_batch=4, scheduler="threshold-survival", threshold=0.5)
    assert [tuple(r.token_ids) for r in results] == list(greedy_ar())
    lens = [ell for r in results for ell in r.stats.proposal_lens]
    assert min(lens) < max(lens), "a confidence threshold should truncate some blocks and not others"


def test_an_adaptive_scheduler_verifies_only_what_it_chose(monkeypatch):
    """With a synchronous adaptive scheduler each verify forward is sized to the chosen lengths (padded
    to the token bucket), not to full blocks: otherwise a shorter verify would cost as much."""
    t, want = target(), greedy_ar()
    sizes, forward = [], t.forward_batch

    def recording(batch, *a, **k):
        sizes.append((int(batch.input_ids.shape[0]), int(batch.valid.sum())))
        return forward(batch, *a, **k)

    monkeypatch.setattr(t, "forward_batch", recording)
    draft = make_draft("vanilla")
    results = generate(t, [list(p) for p in PROMPTS], method="dspark", draft=draft, max_new_tokens=NEW, max_seq_len=128,
                       max_batch=4, token_bucket=4, scheduler="threshold-survival", threshold=0.5)
    assert [tuple(r.token_ids) for r in results] == list(want)
    # Every forward (prefill chunks and verifies) holds its real rows padded up to the bucket of 4 ...
    assert all(n == -(-real // 4) * 4 for n, real in sizes), [s for s in sizes if s[0] != -(-s[1] // 4) * 4]
    # ... and the scheduler did cut blocks short (else the check above proves nothing about it).
    assert min(ell for r in results for ell in r.stats.proposal_lens) < draft.block_size


@pytest.mark.parametrize("kind", ["gated", "rnn", "v4"])
def test_drafts_run_in_bf16(kind):
    """bf16 target and draft (the heads get fp32 and bf16 inputs mixed): lossless, drafts accepted."""
    t = DeepseekV4.random(target().config, seed=0, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        t.lm_head.weight[2:5] *= 12
    if kind == "v4":
        draft = V4DSparkDraft.random(t.config, 3, seed=2, dtype=torch.bfloat16).eval().attach(t)
    else:
        draft = qwen_draft(kind).to(torch.bfloat16)
    prompts = [list(p) for p in PROMPTS[1:]]
    got = generate(t, prompts, method="dspark", draft=draft, max_new_tokens=16,
                   max_seq_len=96, max_batch=2)
    want = generate(t, prompts, max_new_tokens=16, max_seq_len=96, max_batch=2)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert sum(a for r in got for a in r.stats.accepted) >= 2, "no drafts accepted: bf16 drafting was not exercised"
