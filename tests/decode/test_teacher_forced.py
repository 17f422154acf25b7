"""Teacher forcing on the Drafter protocol (`teacher_forced(view)`): at every anchor where the engine
drafted a full block, a file made of the engine's own transcript and drafts gives back the engine's
block — tokens and logits — for every drafter (block drafts in both layouts with their Markov heads
and context windows, the MTP chain with its window ring, prompt lookup); block drafts equal the
training forward; prompt lookup equals the live lookup over a history of the true prefix; ar drafts
nothing. Models: a smoke nano run (tests/helpers/nano_run.py)."""

from __future__ import annotations

import pytest
import torch

from dspark import checkpoint
from dspark.config import EngineConfig, SamplingParams
from dspark.data.tokenizer import tokenize_corpus
from dspark.decode import Engine, collect, methods
from dspark.decode.buffers import SlotState
from dspark.decode.drafter import Drafter, target_view
from dspark.decode.ngram import NgramDrafter
from tests.helpers.nano_run import smoke_run

DRAFTED = ("ngram", "mtp") + methods.draft_methods()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = smoke_run(tmp_path_factory)
    target = checkpoint.load_target(out / "target" / "final").eval()
    drafts = {m: checkpoint.load_draft(out / "drafts" / m / "draft", target).eval() for m in methods.draft_methods()}
    k = drafts["dspark"].block_size
    docs = tokenize_corpus(out / "corpus", out / "tokenizer", "heldout", "code")
    text = next(ids.long() for _, ids in docs if len(ids) >= 64)[:64]
    return target, drafts, k, text


def engine_for(smoke, method: str, max_seq_len: int = 96) -> Engine:
    target, drafts, k, _ = smoke
    gamma = None if methods.get(method).needs_draft else k
    config = EngineConfig(max_batch=1, max_seq_len=max_seq_len, record_proposals=True, scheduler="fixed",
                          num_draft_tokens=gamma)
    return Engine(target, method, draft=drafts.get(method), config=config)


@pytest.mark.parametrize("method", DRAFTED)
def test_teacher_forced_blocks_are_the_engines_own(smoke, method):
    target, _, _, text = smoke
    engine = engine_for(smoke, method)
    drafter, proposed = engine.drafter, []
    live = drafter.propose

    def recording(slots, u):  # the logits of every round's proposal, in round order
        proposal = live(slots, u)
        proposed.append(proposal.logits[0].clone())
        return proposal

    drafter.propose = recording
    prompt = text[:40].tolist()
    (result,) = collect(engine, [prompt], [SamplingParams(max_tokens=12)])
    stats = result.stats
    assert len(proposed) == stats.rounds
    transcript, pos, checked = prompt + result.token_ids, len(prompt), 0
    for drafted, ell, emitted, logits in zip(stats.proposals, stats.proposal_lens, stats.emitted, proposed):
        if ell == len(drafted):
            view = target_view(target, torch.tensor(transcript[:pos + 1] + drafted), drafter.tap_layers)
            tf = drafter.teacher_forced(view)(torch.tensor([pos]))[0]  # [γ, V]
            assert tf.argmax(-1).tolist() == drafted, f"{method} at anchor {pos}"
            # The engine drafts from cached target features (chunked prefill, verify rounds), teacher forcing
            # from one dense forward: equal up to fp32 summation order.
            torch.testing.assert_close(tf, logits, rtol=1e-4, atol=1e-4, msg=f"{method} at anchor {pos}")
            checked += 1
        pos += emitted
    assert checked >= 3, method


@pytest.mark.parametrize("method", methods.draft_methods())
def test_teacher_forced_blocks_match_the_training_forward(smoke, method):
    """The inference-path blocks equal `forward_train`'s teacher-forced logits (an independent path)."""
    target, drafts, _, text = smoke
    draft, drafter = drafts[method], engine_for(smoke, method).drafter
    view = target_view(target, text, draft.tap_layers)
    anchors = torch.arange(16, len(text) - draft.block_size)
    features = torch.cat([view.taps[layer] for layer in draft.tap_layers], dim=-1)
    with torch.no_grad():
        want = draft.forward_train(view.ids[None], features[None], anchors[None],
                                   torch.ones(1, len(anchors), dtype=torch.bool)).draft_logits[0]
    got = drafter.teacher_forced(view)(anchors)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_teacher_forced_lookup_is_the_live_lookup_over_the_true_prefix(smoke):
    """Every anchor at once against the live `propose` over a history holding the file up to the anchor."""
    target, _, k, text = smoke
    text = torch.cat([text, text[5:30]])  # repeats: the second copy's anchors find a match
    drafter = engine_for(smoke, "ngram").drafter
    anchors = torch.arange(1, len(text) - k)
    got = drafter.teacher_forced(target_view(target, text, ()))(anchors)
    live = NgramDrafter(target.config.vocab_size, k, len(anchors), len(text))
    live.history[:len(anchors), :len(text)] = text
    live.length[:len(anchors)] = anchors + 1  # the anchor is the last known token
    slots = SlotState.allocate(len(anchors), 1, text.device)
    slots.anchor = text[anchors]
    want = live.propose(slots, torch.zeros(len(anchors), k))
    assert torch.equal(got, want.logits)
    found = want.confidence[:, 0].bool()
    assert found[-15:].all() and not found.all()  # both a continuation and the anchor repeated


def test_target_view_and_ar(smoke):
    target, drafts, _, text = smoke
    taps = drafts["dspark"].tap_layers
    view = target_view(target, text, tuple(taps) + tuple(taps))
    assert sorted(view.taps) == sorted(set(taps))
    assert view.logits.shape == (len(text), target.config.vocab_size) and view.streams.shape[0] == len(text)
    assert torch.equal(view.ids, text)
    with pytest.raises(ValueError, match="drafts nothing"):
        Drafter(target.config.vocab_size).teacher_forced(view)
