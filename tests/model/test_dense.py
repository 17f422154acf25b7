"""Dense HF targets (Qwen3 tied and untied, Llama-3 with llama3 rope scaling, Gemma 4 text with sliding and
global layers and soft-capped logits) against transformers' own classes on identical weights: the dense
forward and its taps, the cached ragged forward across chunked prefill, verify and rollback, and greedy
generation through the engine."""

from __future__ import annotations

import warnings

import pytest
import torch

import dspark
from dspark.config import DenseConfig, DenseRope
from dspark.decode import generate
from dspark.model import DenseTarget, Target
from dspark.model.batch import Batch
from dspark.model.cache import DenseCache, PagedCache
from dspark.model.dense import dense_inv_freq
from tests.helpers.hf import DENSE_FAMILIES, dense_hf_config, save_dense_hf

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=DENSE_FAMILIES)
def pair(request, tmp_path_factory):
    """(family, HF fp32 model, the dspark target loaded from its saved snapshot)."""
    path = tmp_path_factory.mktemp(request.param)
    hf = save_dense_hf(request.param, path)
    return request.param, hf, dspark.load_target(path).eval()


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 97, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def test_logits_and_taps_match_hf(pair):
    family, hf, target = pair
    ids = torch.tensor([_ids(23, 1), _ids(23, 2)])
    out = target.run(ids, tap_layers=tuple(range(-1, target.config.num_layers - 1)))
    ref = hf(input_ids=ids, use_cache=False, output_hidden_states=True)
    torch.testing.assert_close(out.logits, ref.logits.float(), rtol=0, atol=1e-4)
    # HF's hidden_states[j + 1] is layer j's raw output (the last entry is replaced by the normed state);
    # [0] is the embedding output (tap −1).
    for j, tap in out.taps.items():
        torch.testing.assert_close(tap, ref.hidden_states[j + 1], rtol=0, atol=1e-4)
    assert out.streams.shape == (2, 23, 1, target.config.hidden_size)


@torch.no_grad()
def test_cached_ragged_forward_equals_dense_across_prefill_verify_rollback(pair):
    _, _, target = pair
    cache = target.new_cache(max_batch=3, max_seq_len=48, page_size=8)
    a, b = _ids(40, 3), _ids(40, 4)
    slot_a, slot_b = 2, 0  # out of order, with an idle slot between
    cache.admit(slot_a, 48)
    cache.admit(slot_b, 48)
    taps = (-1, 1)

    def step(reqs, pad_to=None):
        """reqs: [(slot, committed, tokens)] → per request (logits [n, V], taps −1 and 1 [n, D]) of its new tokens."""
        batch = Batch.build(reqs, dummy_slot=cache.dummy_slot, pad_to=pad_to, logits="all")
        out = target.forward_batch(batch, cache, tap_layers=taps)
        res, start = [], 0
        for _, _, toks in reqs:
            rows = slice(start, start + len(toks))
            res.append((out.logits[rows], out.taps[-1][rows], out.taps[1][rows]))
            start += len(toks)
        return res

    def check(got, seq, start):
        ref = target.run(torch.tensor([seq]), tap_layers=taps)
        for mine, theirs in zip(got, (ref.logits, ref.taps[-1], ref.taps[1])):
            torch.testing.assert_close(mine, theirs[0, start:], rtol=0, atol=1e-4)

    # chunked prefill of two requests of different lengths (a chunk crossing pages, padding to a bucket)
    got = step([(slot_a, 0, a[:11]), (slot_b, 0, b[:5])], pad_to=20)
    check(got[0], a[:11], 0), check(got[1], b[:5], 0)
    got = step([(slot_a, 11, a[11:17]), (slot_b, 5, b[5:14])])
    check(got[0], a[:17], 11), check(got[1], b[:14], 5)
    # a verify step of 5 tokens each; request a keeps 2 of them, request b keeps none
    got = step([(slot_a, 17, a[17:22]), (slot_b, 14, b[14:19])], pad_to=16)
    check(got[0], a[:22], 17), check(got[1], b[:19], 14)
    cache.poison_uncommitted(slot_a, 19)
    cache.poison_uncommitted(slot_b, 14)
    # after the rollback the next round writes other tokens at the rolled-back positions
    a2, b2 = a[:19] + _ids(6, 5), b[:14] + _ids(3, 6)
    got = step([(slot_a, 19, a2[19:]), (slot_b, 14, b2[14:])])
    check(got[0], a2, 19), check(got[1], b2, 14)
    assert all(torch.isfinite(layer.k[cache.block_table[slot_a, 0]]).all() for layer in cache.layers)


@pytest.mark.parametrize("family", ["qwen3", "gemma4"])
@torch.no_grad()
def test_cached_forward_through_the_triton_kernel(family, tmp_path):
    """The same ragged path with the paged-attention Triton kernel (interpreted on CPU): GQA, Gemma's
    window and scale 1, a poisoned rollback."""
    save_dense_hf(family, tmp_path)
    target = dspark.load_target(tmp_path, kernels="triton").eval()
    cache = target.new_cache(max_batch=2, max_seq_len=24, page_size=4)
    cache.admit(0, 24)
    cache.admit(1, 24)
    a, b = _ids(14, 13), _ids(9, 14)
    batch = Batch.build([(0, 0, a[:10]), (1, 0, b[:6])], dummy_slot=cache.dummy_slot, pad_to=18, logits="all")
    target.forward_batch(batch, cache)
    cache.poison_uncommitted(0, 10)
    cache.poison_uncommitted(1, 6)
    batch = Batch.build([(0, 10, a[10:]), (1, 6, b[6:])], dummy_slot=cache.dummy_slot, logits="all")
    got = target.forward_batch(batch, cache).logits
    want = torch.cat([target(torch.tensor([a]))[0, 10:], target(torch.tensor([b]))[0, 6:]])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_is_a_target_with_a_paged_cache(pair):
    family, _, target = pair
    assert isinstance(target, Target) and not target.has_mtp and target.dtype == torch.float32
    cache = target.new_cache(max_batch=2, max_seq_len=40, page_size=8)
    assert isinstance(cache, DenseCache) and isinstance(cache, PagedCache) and cache.mtp == []
    assert cache.num_pages == 2 * 5 + 1 and cache.free_pages == 10
    cache.admit(0, 17)
    assert cache.free_pages == 7 and cache.block_table[0, :3].tolist() == [1, 2, 3]
    cache.release(0)
    assert cache.free_pages == 10
    with pytest.raises(ValueError, match="no MTP"):
        target.new_cache(max_batch=1, max_seq_len=8, with_mtp=True)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        target.check_input_ids(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match="tap layer"):
        target.run(torch.tensor([[1, 2]]), tap_layers=(target.config.num_layers,))


@torch.no_grad()
def test_greedy_generation_matches_hf_generate(pair):
    family, hf, target = pair
    # Repeated spans so that prompt lookup (ngram) proposes drafts that are sometimes right.
    prompts = [_ids(9, 7) * 2 + _ids(3, 8), _ids(5, 9) * 3]
    eos = list(target.config.eos_token_ids)
    want = []
    for p in prompts:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            seq = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=14, eos_token_id=eos,
                              pad_token_id=0)[0, len(p):].tolist()
        want.append(seq[:seq.index(eos[0]) + 1] if eos[0] in seq else seq)
    for method in ("ar", "ngram"):
        got = generate(target, prompts, method=method, max_new_tokens=14, eos_token_id=eos, max_seq_len=64)
        assert [r.token_ids for r in got] == want, method


def test_inv_freq_matches_hf_rope_functions():
    """llama3's three frequency bands and Gemma's proportional partial rotary, against HF's own init functions."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    llama = dense_hf_config("llama")
    ours = dense_inv_freq(DenseRope(theta=500000.0, kind="llama3", factor=8.0, low_freq_factor=1.0,
                                    high_freq_factor=4.0, original_max_position=16), 10)
    torch.testing.assert_close(ours, ROPE_INIT_FUNCTIONS["llama3"](llama)[0], rtol=0, atol=0)
    gemma = dense_hf_config("gemma4")
    hf = ROPE_INIT_FUNCTIONS["proportional"](gemma.per_layer_config["full_attention"], layer_type="full_attention")[0]
    ours = dense_inv_freq(DenseRope(theta=1000000.0, kind="proportional", partial_rotary_factor=0.5), 16)
    torch.testing.assert_close(ours, hf, rtol=0, atol=0)
    assert (ours[4:] == 0).all() and (ours[:4] > 0).all()


def test_config_refuses_bad_fields():
    base = dict(family="qwen3", vocab_size=11, hidden_size=8, intermediate_size=8, num_layers=2, num_heads=2,
                num_kv_heads=1, head_dim=4, layer_types=("full", "full"), rope=DenseRope(theta=1e4),
                max_position_embeddings=32)
    DenseConfig(**base)
    for change, field in ((dict(family="gpt2"), "family"), (dict(num_kv_heads=3), "kv heads"),
                          (dict(layer_types=("full", "sliding")), "sliding_window"),
                          (dict(hidden_act="relu"), "hidden_act"), (dict(eos_token_ids=(11,)), "eos token"),
                          (dict(final_logit_softcapping=0.0), "final_logit_softcapping"),
                          (dict(layer_types=("full",)), "layer_types")):
        with pytest.raises(ValueError, match=field):
            DenseConfig(**{**base, **change})
    with pytest.raises(ValueError, match="proportional"):
        DenseRope(theta=1e4, partial_rotary_factor=0.5)


def test_random_target_runs_the_cached_forward():
    """`DenseTarget.random` (every weight non-trivial) through `new_cache` / `forward_batch`, no HF involved."""
    config = DenseConfig(family="gemma4", vocab_size=53, hidden_size=24, intermediate_size=20, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=6, layer_types=("sliding", "full"), sliding_window=3,
                         rope=DenseRope(theta=1e6, kind="proportional", partial_rotary_factor=0.5),
                         sliding_rope=DenseRope(theta=1e4), global_head_dim=8, global_num_kv_heads=1,
                         attention_k_eq_v=True, attention_scale=1.0, qk_norm=True, v_norm=True, sandwich_norms=True,
                         embed_scale=24 ** 0.5, final_logit_softcapping=5.0, tie_word_embeddings=True,
                         max_position_embeddings=64)
    model = DenseTarget.random(config, seed=1).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.layers[1].self_attn.v_proj is None and model.model.layers[0].self_attn.v_proj is not None
    ids = _ids(13, 10)
    ids = [i % 53 for i in ids]
    cache = model.new_cache(max_batch=1, max_seq_len=16, page_size=4)
    cache.admit(0, 16)
    with torch.no_grad():
        out = model.forward_batch(Batch.build([(0, 0, ids)], dummy_slot=cache.dummy_slot, logits="all"), cache)
        torch.testing.assert_close(out.logits, model(torch.tensor([ids]))[0], rtol=0, atol=1e-4)
    assert out.logits.abs().max() <= 5.0


@pytest.mark.extended
@torch.no_grad()
def test_bf16_error_within_hf_bf16_error(pair, tmp_path):
    """bf16 logits' error against fp32 stays within 1.5× HF's own bf16 error (fp32 islands kept)."""
    family, hf, target = pair
    path = tmp_path / "bf16"
    save_dense_hf(family, path)
    ours = dspark.load_target(path, dtype=torch.bfloat16).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf16 = type(hf).from_pretrained(path, dtype=torch.bfloat16).eval()
    ids = torch.tensor([_ids(40, 11), _ids(40, 12)])
    exact = target(ids)
    ours_err = (ours(ids) - exact).abs().max()
    hf_err = (hf16(input_ids=ids, use_cache=False).logits.float() - exact).abs().max()
    assert ours_err <= 1.5 * hf_err, (family, float(ours_err), float(hf_err))
