"""The engine on tiny random models: greedy losslessness for every method, acceptance counts equal
to a from-scratch re-run of each drafter, batch independence, seeds, input validation."""

from __future__ import annotations

import pytest
import torch

from dspark import ops
from dspark.config import EngineConfig, SamplingParams
from dspark.decode import Engine, collect, generate
from dspark.model.mtp import mtp_forward
from dspark.model.target import DeepseekV4
from tests.helpers.drafters import (NEW_TOKENS, accepted_against, greedy_ar, oracle_method, peaked_model,
                                    prompts, rounds_of)


def ngram_reference(context: list[int], gamma: int, max_n: int = 4, min_n: int = 1) -> list[int]:
    n_ctx = len(context)
    for n in range(max_n, min_n - 1, -1):
        if n_ctx < n + 1:
            continue
        for j in range(n_ctx - n - 1, -1, -1):  # the latest earlier occurrence
            if context[j:j + n] == context[n_ctx - n:]:
                return [context[min(j + n + i, n_ctx - 1)] for i in range(gamma)]
    return [context[-1]] * gamma


def mtp_reference(model: DeepseekV4, context: list[int], k: int) -> list[int]:
    """Dense, cache-free MTP chain at the anchor context[-1]: pairs (H_t, x_{t+1}) for every committed
    t, then (Y, draft) pairs fed back."""
    ids = torch.tensor([context[:-1]])
    with torch.no_grad():
        hidden = model.run(ids).streams[0]
        nxt = list(context[1:])
        drafts = []
        for _ in range(k):
            logits, y = mtp_forward(model, hidden[None], torch.tensor([nxt]))
            drafts.append(int(logits[0, -1].argmax()))
            hidden = torch.cat([hidden, y[0, -1:]])
            nxt.append(drafts[-1])
    return drafts


def run_method(method, gamma=None, seed=0, **kw):
    return generate(peaked_model(), [list(p) for p in prompts()], method=method, num_draft_tokens=gamma, max_new_tokens=NEW_TOKENS, max_seq_len=128, seed=seed, **kw)


@pytest.mark.parametrize("method,gamma", [("mtp", 1), ("mtp", 3), ("ngram", 4), ("ngram", 2)])
def test_greedy_equals_ar_and_acceptance_is_exact(method, gamma):
    """Every round's drafts (not only the accepted count) equal a cache-free re-run of the drafter
    at that anchor: this is what catches a wrong MTP input or a stale drafter cache."""
    model = peaked_model()
    results = run_method(method, gamma, token_bucket=8, record_proposals=True)
    total_accepted = 0
    for prompt, res, want in zip(prompts(), results, greedy_ar()):
        assert tuple(res.token_ids) == want
        transcript = list(prompt) + res.token_ids
        for (pos, ell, a), drafted in zip(rounds_of(len(prompt), res.stats), res.stats.proposals):
            context = transcript[:pos + 1]
            proposal = (mtp_reference(model, context, gamma) if method == "mtp"
                        else ngram_reference(context, gamma))
            assert drafted == proposal, f"drafts at anchor {pos}"
            assert a == accepted_against(proposal, transcript, pos, ell), f"round at {pos}"
            total_accepted += a
    assert total_accepted >= 10, "the test exercised too few acceptances"


@pytest.mark.parametrize("rho", [0.0, 0.3, 0.7])
def test_oracle_drafter_greedy_lossless_with_coverage(rho):
    gamma = 6
    truths = {p: list(p) + list(t) for p, t in zip(prompts(), greedy_ar())}
    results = run_method(oracle_method(truths, rho, gamma), seed=11)
    all_rounds = []
    for prompt, res, want in zip(prompts(), results, greedy_ar()):
        assert tuple(res.token_ids) == want
        transcript = list(prompt) + res.token_ids
        for i, (pos, ell, a) in enumerate(rounds_of(len(prompt), res.stats)):
            # From scratch: the oracle's choice at this anchor with this round's draft uniforms.
            seed = 11 + prompts().index(prompt)
            u = ops.uniforms(torch.tensor([seed]), torch.tensor([1 + i * (2 * gamma + 1)]), gamma)[0]
            true = [transcript[min(pos + 1 + j, len(transcript) - 1)] for j in range(gamma)]
            proposal = [int(min(u[j] / max(rho, 1e-12) * 509, 508)) if u[j] < rho else true[j] for j in range(gamma)]
            assert a == accepted_against(proposal, transcript, pos, ell)
            all_rounds.append((pos, ell, a))
    full = [r for r in all_rounds if r[1] == gamma]
    if rho == 0.0:
        assert all(a == ell for _, ell, a in all_rounds)
    else:
        assert sum(1 for _, _, a in full if 0 < a < gamma) >= 0.15 * len(full), "too few mid-block rejections"
    if rho < 0.5:
        assert sum(1 for _, _, a in full if a >= gamma // 2) >= 0.3 * len(full), "too few long acceptances"

    def crosses(step):  # an accepted run commits the first token of a new window of size `step`
        return any(pos // step != (pos + a) // step for pos, _, a in all_rounds if a > 0)

    assert crosses(4) and crosses(16), "accepted runs must cross CSA and HCA/window boundaries"


def test_batch_mates_do_not_change_a_request():
    model = peaked_model()
    alone = generate(model, [list(prompts()[1])], method="ngram", max_new_tokens=NEW_TOKENS, max_seq_len=128)
    crowd = run_method("ngram", token_bucket=4)
    assert alone[0].token_ids == crowd[1].token_ids


def test_sampled_runs_reproduce_with_a_seed():
    kw = dict(temperature=1.0, top_p=0.9)
    a = run_method("mtp", 2, seed=5, **kw)
    b = run_method("mtp", 2, seed=5, **kw)
    c = run_method("mtp", 2, seed=6, **kw)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.token_ids for r in a] != [r.token_ids for r in c]


def test_a_sampled_request_does_not_depend_on_its_batch_mates_filters():
    """Filters are skipped for a batch where no request uses them (a host-side choice); a request's
    tokens are the same whether or not a batch mate uses top-k / top-p, and the choice follows
    requests as they join and leave."""
    model, prompt = peaked_model(), list(prompts()[1])
    plain = SamplingParams(temperature=1.0, seed=3, max_tokens=12)
    alone = Engine(model, "mtp", config=EngineConfig(num_draft_tokens=2, max_batch=2, max_seq_len=128))
    alone.add_request(prompt, plain)
    want = []
    while alone.has_unfinished():
        want += [t for o in alone.step() for t in o.new_token_ids]
        assert alone.slots.sampling()[1:] == (None, None)
    mixed = Engine(model, "mtp", config=EngineConfig(num_draft_tokens=2, max_batch=2, max_seq_len=128))
    rid = mixed.add_request(prompt, plain)
    mixed.add_request(list(prompts()[0]), SamplingParams(temperature=0.8, top_k=5, top_p=0.9, seed=1, max_tokens=4))
    got, filtered = [], []
    while mixed.has_unfinished():
        outs = mixed.step()
        filtered.append(mixed.slots.sampling()[2] is not None)
        got += [t for o in outs if o.request_id == rid for t in o.new_token_ids]
    assert got == want
    assert filtered[0] and not filtered[-1], "the filters must switch off once the filtering request is done"


def test_stop_tokens_end_one_request_without_disturbing_others():
    """Greedy outputs of each prompt with an eos that only one of them emits early."""
    outputs = greedy_ar()
    eos = outputs[0][5]  # the 6th token of request 0
    res = run_method("ngram", 3, eos_token_id=eos)
    for out, want in zip(res, outputs):
        cut = want.index(eos) + 1 if eos in want else len(want)
        assert res and out.token_ids == list(want[:cut])
        assert out.finish_reason == ("stop" if eos in want else "length")


def test_bad_requests_are_refused():
    engine = Engine(peaked_model(), "ngram", config=EngineConfig(max_seq_len=64))
    cases = [([], {}, "empty prompt"),
             ([1] * 60, dict(max_tokens=8), "raise max_seq_len"),
             ([1, 2], dict(max_tokens=0), "max_tokens"),
             ([1, 2], dict(temperature=-0.1), "temperature"),
             ([1, 2], dict(top_p=0.0), "top_p"),
             ([1, 2], dict(top_p=1.5), "top_p"),
             ([1, 509], {}, "outside the vocabulary"),
             ([-1, 2], {}, "outside the vocabulary"),
             ([1, 2], dict(stop_token_ids=(600,)), "stop token")]
    for prompt, params, message in cases:  # sampling values are refused when built, the rest at add_request
        with pytest.raises(ValueError, match=message):
            engine.add_request(prompt, SamplingParams(**params))
    assert not engine.has_unfinished()


def test_abort_and_streaming():
    engine = Engine(peaked_model(), "mtp", config=EngineConfig(num_draft_tokens=2, max_seq_len=128))
    keep = engine.add_request(list(prompts()[0]), SamplingParams(max_tokens=20))
    drop = engine.add_request(list(prompts()[1]), SamplingParams(max_tokens=20))
    streamed = {keep: [], drop: []}
    reasons = {}
    steps = 0
    while engine.has_unfinished():
        for out in engine.step():
            streamed[out.request_id] += out.new_token_ids
            if out.finished:
                reasons[out.request_id] = out.finish_reason
        steps += 1
        if steps == 3:
            engine.abort(drop)
    assert reasons == {keep: "length", drop: "abort"}
    assert tuple(streamed[keep]) == greedy_ar()[0][:20]


def test_waiting_requests_are_admitted_when_pages_free_up():
    model = peaked_model()
    # Room for one request's pages at a time: the others wait, then run; results are unchanged.
    res = generate(model, [list(p) for p in prompts()], method="ngram", max_new_tokens=NEW_TOKENS, max_seq_len=128,
                   max_batch=3, page_size=64, memory_budget=None)
    assert [tuple(r.token_ids) for r in res] == list(greedy_ar())
    engine = Engine(model, "ar", config=EngineConfig(max_batch=1, max_seq_len=128))
    a = engine.add_request(list(prompts()[0]), SamplingParams(max_tokens=4))
    b = engine.add_request(list(prompts()[1]), SamplingParams(max_tokens=4))
    seen = []
    while engine.has_unfinished():
        seen += [o.request_id for o in engine.step() if o.new_token_ids]
    assert seen.index(b) > max(i for i, r in enumerate(seen) if r == a)


def test_sampling_parameters_no_slot_uses_are_none():
    """The host knows which parameters are in use: temperature None while every slot is greedy (the CPU
    reference then skips the integer weights), a filter None while no slot uses it; a released slot stops
    counting."""
    from dspark.decode.buffers import SlotState

    slots = SlotState.allocate(3, 1, "cpu")
    assert slots.sampling() == (None, None, None)
    slots.assign(1, SamplingParams(temperature=0.0, top_k=5), seed=0, stop_tokens=())
    t, k, p = slots.sampling()
    assert t is None and k is slots.top_k and p is None
    slots.assign(2, SamplingParams(temperature=0.7, top_p=0.9), seed=0, stop_tokens=())
    t, k, p = slots.sampling()
    assert t is slots.temperature and k is slots.top_k and p is slots.top_p
    slots.release(2)
    assert slots.sampling()[0] is None and slots.sampling()[2] is None


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
@pytest.mark.parametrize("method", ["ar", "mtp", "ngram"])
def test_non_finite_logits_end_only_that_request_with_an_error(monkeypatch, poison, method):
    """NaN policy: a request whose target logits turn NaN / +inf finishes with finish_reason "error"
    before the bad token; its batch mates decode exactly as without it."""
    model = peaked_model()
    forward, calls = model.forward_batch, [0]
    victim_slot = 1

    def poisoned(batch, cache, *a, **k):
        out = forward(batch, cache, *a, **k)
        calls[0] += 1
        if calls[0] > 3:  # after prefill and a few rounds: poison every logits row of one slot
            rows = batch.slot[batch.token_row[batch.logits_rows]] == victim_slot
            out.logits[rows, 7] = poison
        return out

    monkeypatch.setattr(model, "forward_batch", poisoned)
    res = run_method(method, None if method == "ar" else 2)
    monkeypatch.undo()
    want = greedy_ar()
    bad = res[victim_slot]
    assert bad.finish_reason == "error" and len(bad.token_ids) < NEW_TOKENS
    assert tuple(bad.token_ids) == want[victim_slot][:len(bad.token_ids)]  # nothing after the bad logits
    for i in (0, 2):
        assert tuple(res[i].token_ids) == want[i] and res[i].finish_reason == "length"


def test_an_error_output_names_the_problem(monkeypatch):
    model = peaked_model()
    forward = model.forward_batch

    def nan_everywhere(batch, cache, *a, **k):
        out = forward(batch, cache, *a, **k)
        out.logits[:] = float("nan")
        return out

    monkeypatch.setattr(model, "forward_batch", nan_everywhere)
    engine = Engine(model, "ar", config=EngineConfig(max_seq_len=64))
    rid = engine.add_request([1, 2, 3], SamplingParams(max_tokens=4))
    outs = engine.step()
    assert [(o.request_id, o.finish_reason, o.new_token_ids) for o in outs] == [(rid, "error", [])]
    assert "not finite" in outs[0].error
    assert not engine.has_unfinished() and len(engine._free_slots) == engine.max_batch


def test_values_beyond_the_slot_tensors_are_refused_when_built():
    """Issue: top_k / temperature / seed beyond int64 or fp32 used to pass add_request and fail inside
    step(), leaking the slot and hanging the engine."""
    for bad in (dict(top_k=2**63), dict(temperature=float("nan")),
                dict(temperature=float("inf")), dict(seed=2**63), dict(max_tokens=2**63), dict(top_k=True),
                dict(temperature="1"), dict(stop_token_ids=(1.5,))):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)
    # an integer temperature of 2**63 is a huge temperature (a float), which the slot tensors hold
    res = collect(Engine(peaked_model(), "ngram", config=EngineConfig(max_batch=1, max_seq_len=64)), [[1, 2, 3]],
                  [SamplingParams(temperature=2**63, top_k=2**63 - 1, seed=2**63 - 1, max_tokens=3)])
    assert len(res[0].token_ids) == 3 and res[0].finish_reason == "length"


def test_a_failing_admission_frees_its_slot_and_pages(monkeypatch):
    engine = Engine(peaked_model(), "ngram", config=EngineConfig(max_batch=1, max_seq_len=128))
    pages = engine.cache.free_pages
    monkeypatch.setattr(engine.drafter, "admit", lambda slot, prompt: (_ for _ in ()).throw(RuntimeError("boom")))
    rid = engine.add_request([1, 2, 3], SamplingParams(max_tokens=4))
    outs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outs] == [(rid, "error")] and "boom" in outs[0].error
    assert engine._free_slots == [0] and engine.cache.free_pages == pages and not engine.has_unfinished()
    monkeypatch.undo()
    res = collect(engine, [list(prompts()[0])], [SamplingParams(max_tokens=40)])
    assert tuple(res[0].token_ids) == greedy_ar()[0]  # the engine goes on serving
