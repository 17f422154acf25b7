"""End to end, sampled decoding follows the target's distribution exactly.

On a 6-token-vocabulary tiny model the joint distribution of new tokens 1–4 (the prefill sample and
at least one verify round, crossing the CSA and HCA boundaries at position 15) is known exactly
from full forwards over all 6³ prefixes. Many seeded requests are decoded with each method and a
G-test (cells with expected count < 5 pooled) must not reject: p > 1e-3.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from dspark import ops
from dspark.config import DraftConfig, DSparkFields, ModelConfig
from dspark.decode import generate
from dspark.draft.deepspec import DraftModel
from dspark.draft.v4 import V4DSparkDraft
from dspark.model.target import DeepseekV4
from tests.helpers.drafters import oracle_method, wrong_method

V, PROMPT_LEN, NEW = 6, 13, 4
FILTERS = {"plain": dict(temperature=1.0), "top_k": dict(temperature=0.8, top_k=3),
           "top_p": dict(temperature=1.2, top_p=0.8)}


@functools.lru_cache(maxsize=None)
def small_vocab_model() -> DeepseekV4:
    config = ModelConfig.tiny(vocab_size=V, dspark=DSparkFields(block_size=3, noise_token_id=V - 1,
                                                                target_layer_ids=(1, 2, 3), markov_rank=4))
    model = DeepseekV4.random(config, seed=4).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(3)  # sharper distributions: acceptance varies more across tokens
    return model


PROMPT = [3, 1, 4, 1, 5, 2, 0, 2, 5, 3, 5, 4, 2]


@functools.lru_cache(maxsize=None)
def exact_joint(filter_name: str) -> torch.Tensor:
    """P(t1..t4) [V, V, V, V] from one dense forward over every 3-token continuation."""
    f = FILTERS[filter_name]
    model = small_vocab_model()
    conts = torch.cartesian_prod(*[torch.arange(V)] * (NEW - 1))  # [V³, 3]
    ids = torch.cat([torch.tensor(PROMPT).expand(conts.shape[0], -1), conts], dim=1)
    with torch.no_grad():
        logits = model(ids)[:, PROMPT_LEN - 1:]  # [V³, 4, V]
    n = logits.shape[0] * NEW
    p = ops.probs(logits.reshape(n, V), torch.full((n,), f["temperature"]), torch.full((n,), f.get("top_k", 0)),
                  torch.full((n,), f.get("top_p", 1.0))).double().view(V, V, V, NEW, V)  # [t1, t2, t3, step, next]
    p1, p2, p3, p4 = p[0, 0, 0, 0], p[:, 0, 0, 1], p[:, :, 0, 2], p[:, :, :, 3]  # p(t_i | t_<i)
    return p1[:, None, None, None] * p2[:, :, None, None] * p3[:, :, :, None] * p4


def g_test(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of a G-test of `counts` against `probs`, pooling cells expected below 5."""
    n = counts.sum()
    expected = probs.flatten() * n
    counts = counts.flatten().double()
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    assert float(obs[exp == 0].sum()) == 0 if (exp == 0).any() else True
    g = 2 * float(torch.where(obs > 0, obs * torch.log(obs / exp), torch.zeros_like(obs)).sum())
    dof = int(keep.sum()) - 1
    return _chi2_sf(g, dof)


def _chi2_sf(x: float, k: int) -> float:
    """Survival function of the chi-square distribution (regularised upper incomplete gamma)."""
    a, z = k / 2.0, x / 2.0
    if z < a + 1:  # series for the lower part
        term = total = 1.0 / a
        for n in range(1, 10000):
            term *= z / (a + n)
            total += term
            if term < total * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(-z + a * math.log(z) - math.lgamma(a)))
    # continued fraction for the upper part
    b, c, d = z + 1 - a, 1e300, 1.0 / (z + 1 - a)
    h = d
    for i in range(1, 10000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = 1.0 / d if abs(d) > 1e-300 else 1e300
        c = b + an / c if abs(c) > 1e-300 else 1e300
        h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return h * math.exp(-z + a * math.log(z) - math.lgamma(a))


@functools.lru_cache(maxsize=None)
def greedy_continuation() -> tuple[int, ...]:
    return tuple(generate(small_vocab_model(), [PROMPT], max_new_tokens=8, max_seq_len=64)[0].token_ids)


def method_and_draft(kind: str):
    """(method, draft) for a test case: registry methods by name, test drafters as `Method` objects."""
    if kind.startswith(("dspark", "dflash")):
        return "dspark", random_draft(kind)
    if kind == "wrong":
        return wrong_method(torch.tensor([3.0, 0.0, 0.0, 1.0, -2.0, 0.0]), 2), None
    if kind == "oracle":  # near-oracle: proposes the greedy continuation, 10 % noise
        return oracle_method({tuple(PROMPT): PROMPT + list(greedy_continuation())}, 0.1, 2, max_len=64), None
    return kind, None


@functools.lru_cache(maxsize=None)
def random_draft(kind: str):
    """Untrained drafts with genuinely soft, context-dependent q and confidences."""
    target = small_vocab_model()
    if kind == "dspark-v4":
        return V4DSparkDraft.random(target.config, 2, seed=5).eval().attach(target)
    head = kind.split("-")[1] if kind.startswith("dspark-") else "vanilla"
    rank = 0 if kind == "dflash" else 4
    cfg = DraftConfig.tiny(vocab_size=V, mask_token_id=V - 1, target_layer_ids=(1, 2), num_target_layers=4,
                           target_hidden_size=56, block_size=3, markov_rank=rank, markov_head_type=head,
                           has_confidence_head=rank > 0, confidence_with_markov=rank > 0)
    return DraftModel.random(cfg, seed=6).eval()


SPS = [0.0] + [1.0 / (1 + 0.002 * b) for b in range(1, 4000)]  # a made-up steps/s table for the schedulers


def sample_counts(method: str, gamma, filter_name: str, samples: int, batch: int = 256, **engine_kw) -> torch.Tensor:
    counts = torch.zeros([V] * NEW, dtype=torch.long)
    done = 0
    while done < samples:
        n = min(batch, samples - done)
        kind, draft = method_and_draft(method)
        res = generate(small_vocab_model(), [PROMPT] * n, method=kind, draft=draft, num_draft_tokens=gamma, max_new_tokens=NEW, max_seq_len=64, max_batch=n,
                       prefill_chunk=n * PROMPT_LEN, seed=[1_000_003 * (done + i) + 17 for i in range(n)],
                       **FILTERS[filter_name], **engine_kw)
        for r in res:
            counts[tuple(r.token_ids)] += 1
        done += n
    return counts


CASES = [("ar", None), ("mtp", 1), ("mtp", 2), ("ngram", 2), ("wrong", None), ("oracle", None),
         ("dspark-vanilla", None), ("dspark-gated", None), ("dspark-rnn", None), ("dflash", None), ("dspark-v4", None)]


@pytest.mark.parametrize("method,gamma,filter_name", [("ar", None, "plain"), ("mtp", 1, "top_p"),
                                                      ("ngram", 2, "top_k"), ("wrong", None, "plain"),
                                                      ("oracle", None, "top_p"), ("dspark-rnn", None, "plain"),
                                                      ("dspark-v4", None, "top_k")])
def test_joint_distribution_small(method, gamma, filter_name):
    counts = sample_counts(method, gamma, filter_name, samples=2048)
    assert g_test(counts, exact_joint(filter_name)) > 1e-3


@pytest.mark.parametrize("scheduler", ["hardware", "async", "threshold-survival"])
def test_joint_distribution_under_confidence_schedulers(scheduler):
    """Verify lengths chosen from the draft's confidences (calibrated or not) never bias the output."""
    counts = sample_counts("dspark-gated", None, "plain", samples=2048, scheduler=scheduler, sps=SPS, threshold=0.3,
                           adapt=scheduler != "async")
    assert g_test(counts, exact_joint("plain")) > 1e-3
    # coverage: the scheduler really chose different verify lengths across requests and rounds
    res = generate(small_vocab_model(), [PROMPT] * 64, method="dspark", draft=random_draft("dspark-gated"),
                   max_new_tokens=NEW,
                   max_seq_len=64, max_batch=64, seed=list(range(64)), temperature=1.0, scheduler=scheduler, sps=SPS,
                   threshold=0.3)
    lengths = {ell for r in res for ell in r.stats.proposal_lens}
    assert len(lengths) >= 2, lengths


@pytest.mark.extended
@pytest.mark.parametrize("filter_name", list(FILTERS))
@pytest.mark.parametrize("method,gamma", CASES)
def test_joint_distribution(method, gamma, filter_name):
    counts = sample_counts(method, gamma, filter_name, samples=100_000, batch=1024)
    assert g_test(counts, exact_joint(filter_name)) > 1e-3


@pytest.mark.extended
@pytest.mark.parametrize("scheduler", ["hardware", "async"])
def test_joint_distribution_under_schedulers_large(scheduler):
    counts = sample_counts("dspark-vanilla", None, "plain", samples=100_000, batch=1024, scheduler=scheduler, sps=SPS)
    assert g_test(counts, exact_joint("plain")) > 1e-3


def test_g_test_detects_a_biased_sampler():
    """The harness has power: a 3 % bias on one token is caught at the default sample size."""
    probs = exact_joint("plain")
    g = torch.Generator().manual_seed(0)
    flat = probs.flatten()
    biased = flat.clone()
    top = int(flat.argmax())
    biased[top] *= 1.5
    biased /= biased.sum()
    draws = torch.multinomial(biased.float(), 20_000, replacement=True, generator=g)
    counts = torch.bincount(draws, minlength=flat.numel())
    assert g_test(counts, probs) < 1e-3
    fair = torch.bincount(torch.multinomial(flat.float(), 20_000, replacement=True, generator=g), minlength=flat.numel())
    assert g_test(fair, probs) > 1e-3
