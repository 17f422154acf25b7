"""End to end, sampled decoding follows the target's distribution exactly.

On a 6-token-vocabulary tiny model the joint distribution of new tokens 1–4 (the prefill sample and
at least one verify round, crossing the CSA and HCA boundaries at position 15) is known exactly
from full forwards over all 6³ prefixes. Many seeded requests are decoded with each method and a
G-test (cells with expected count < 5 pooled) must not reject: p > 1e-3.
"""

from __future__ import annotations

import functools

import pytest
import torch

from dspark.config import DraftConfig, DSparkFields, ModelConfig
from dspark.decode import generate
from dspark.draft.deepspec import DraftModel
from dspark.draft.v4 import V4DSparkDraft
from dspark.model.target import DeepseekV4
from tests.helpers.drafters import oracle_method, wrong_method
from tests.helpers.joint import exact_joint, g_test

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
def joint(filter_name: str) -> torch.Tensor:
    """P(t1..t4) [V, V, V, V] of the small model after PROMPT under the filter."""
    return exact_joint(small_vocab_model(), PROMPT, FILTERS[filter_name])


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
    assert g_test(counts, joint(filter_name)) > 1e-3


@pytest.mark.parametrize("scheduler", ["hardware", "async", "threshold-survival"])
def test_joint_distribution_under_confidence_schedulers(scheduler):
    """Verify lengths chosen from the draft's confidences (calibrated or not) never bias the output."""
    counts = sample_counts("dspark-gated", None, "plain", samples=2048, scheduler=scheduler, sps=SPS, threshold=0.3,
                           adapt=scheduler != "async")
    assert g_test(counts, joint("plain")) > 1e-3
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
    assert g_test(counts, joint(filter_name)) > 1e-3


@pytest.mark.extended
@pytest.mark.parametrize("scheduler", ["hardware", "async"])
def test_joint_distribution_under_schedulers_large(scheduler):
    counts = sample_counts("dspark-vanilla", None, "plain", samples=100_000, batch=1024, scheduler=scheduler, sps=SPS)
    assert g_test(counts, joint("plain")) > 1e-3


def test_g_test_detects_a_biased_sampler():
    """The harness has power: a 3 % bias on one token is caught at the default sample size."""
    probs = joint("plain")
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
