"""Online confidence correction: it tracks observed acceptance, and a request whose acceptance
drops mid-run verifies less once it does — without changing any output token."""

from __future__ import annotations

import torch

from dspark.decode import generate
from dspark.decode.adapt import AcceptanceTracker
from dspark.decode.methods import Method
from tests.helpers.drafters import OracleDrafter, greedy_ar, peaked_model, prompts


def test_tracker_follows_observed_acceptance():
    t = AcceptanceTracker(2, 3, decay=0.8)
    conf = torch.full((2, 3), 0.9)
    active, temp = torch.tensor([True, True]), torch.zeros(2)
    for _ in range(30):  # request 0: slot 0 always rejected; request 1: everything accepted
        t.update(conf, torch.tensor([3, 3]), torch.tensor([0, 3]), active, temp)
    corrected = t.correct(conf)
    assert float(corrected[0, 0]) < 1e-3 and float(corrected[1, 0]) == 1.0
    assert torch.equal(corrected[0, 1:], conf[0, 1:])  # slots 1, 2 of request 0 were never reached
    for _ in range(30):  # request 0 drifts back: now always accepted
        t.update(conf, torch.tensor([3, 3]), torch.tensor([3, 3]), active, temp)
    assert float(t.correct(conf)[0, 0]) > 0.85
    # a fresh request of the same configuration starts from the configuration's average
    t.reset(0, 0.0)
    assert 0.5 < float(t.correct(conf)[0, 0]) <= 1.0


class DriftingOracle(OracleDrafter):
    """Right about the continuation before position `switch`, mostly wrong after it, with a
    confidence that never notices."""

    def __init__(self, *args, switch: int, **kw):
        super().__init__(*args, **kw)
        self.switch = switch

    def propose(self, slots, u):
        p = super().propose(slots, u)
        late = self.anchor_pos.unsqueeze(-1) + 1 + torch.arange(self.num_draft_tokens) >= self.switch
        wrong = (p.tokens + 1 + (u * 100).long()) % self.vocab_size
        tokens = torch.where(late & (u < 0.8), wrong, p.tokens)
        from dspark.decode.drafter import one_hot_logits

        return type(p)(tokens=tokens, logits=one_hot_logits(tokens, self.vocab_size),
                       confidence=torch.full(tokens.shape, 0.95))


def test_drifting_request_verifies_less_with_adaptation():
    gamma = 5
    truths = {p: list(p) + list(t) for p, t in zip(prompts(), greedy_ar())}
    late_lengths = {}
    for adapt in (False, True):
        drifting = Method("drifting", lambda target, cache, draft, g, max_batch, max_seq_len: DriftingOracle(
            509, g, max_batch=max_batch, truths=truths, rho=0.0, switch=50), False, False, gamma, "test")
        res = generate(peaked_model(), [list(p) for p in prompts()], method=drifting, max_new_tokens=40,
                       max_seq_len=128, scheduler="threshold-survival", threshold=0.5, adapt=adapt, seed=3)
        assert [tuple(r.token_ids) for r in res] == list(greedy_ar())  # lossless either way
        lengths = []
        for prompt, r in zip(prompts(), res):
            pos = len(prompt)
            for ell, n in zip(r.stats.proposal_lens, r.stats.emitted):
                if pos >= 60:
                    lengths.append(ell)
                pos += n
        late_lengths[adapt] = sum(lengths) / max(len(lengths), 1)
    assert late_lengths[True] < 0.6 * late_lengths[False], late_lengths
