"""V4 attention's dense forward (dspark.model.attention) against a per-query loop written from the
definition: each query reads the window keys t−W < j ≤ t and, on compressed layers, the entries
whose window has closed (HCA: all of them; CSA: the indexer's top k), through a softmax whose
denominator also holds the head's sink; entries pool each window's raw rows with a per-channel
softmax over gate + position bias (CSA: the previous window's first half and this window's second
half), then kv_norm and rope at the window's first position. The cached ragged path is checked
against this dense forward in tests/model/test_cache.py."""

from __future__ import annotations

import functools

import pytest
import torch

from dspark.config import ModelConfig
from dspark.model.attention import Attention, Compressor
from dspark.model.layers import apply_rope
from dspark.model.target import DeepseekV4
from tests.compare import assert_close

LAYERS = {"sliding": 0, "csa": 1, "hca": 2}  # ModelConfig.tiny's layer types
SEQ = 40  # > the window (16); 10 CSA windows (rate 4, top-k 3), 2 HCA windows (rate 16)


@functools.lru_cache(maxsize=None)
def model() -> DeepseekV4:
    return DeepseekV4.random(ModelConfig.tiny(index_topk=3), seed=0).eval()


def layer(kind: str) -> Attention:
    attn = model().model.layers[LAYERS[kind]].self_attn
    assert attn.layer_type == kind
    return attn


def inputs(batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, SEQ, model().config.hidden_size, generator=g)


def naive_entries(comp: Compressor, x: torch.Tensor) -> torch.Tensor:
    """x [B, S, D] → entries [B, S // m, C], one window at a time."""
    m, c = comp.rate, comp.width
    kv, gate = comp.project(x)
    gate = gate.float() + comp.position_bias.repeat(x.shape[1] // m + 1, 1)[: x.shape[1]]  # slot bias
    out = []
    for w in range(x.shape[1] // m):
        cur = slice(w * m, (w + 1) * m)
        if comp.overlap:  # Ca of window w−1 (none for w = 0), then Cb of window w
            prev = slice(max(0, (w - 1) * m), w * m)
            slot_kv = torch.cat([kv[:, prev, :c], kv[:, cur, c:]], dim=1)
            slot_gate = torch.cat([gate[:, prev, :c], gate[:, cur, c:]], dim=1)
        else:
            slot_kv, slot_gate = kv[:, cur], gate[:, cur]
        pooled = (slot_gate.softmax(dim=1) * slot_kv.float()).sum(dim=1)  # per channel over the slots
        cos, sin = comp.rotary(torch.tensor([w * m]))
        out.append(apply_rope(comp.kv_norm(pooled.to(x.dtype)), cos, sin))
    return torch.stack(out, dim=1)


def naive_forward(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    b, s, _ = x.shape
    pos = torch.arange(s).expand(b, s)
    cos, sin = attn.rotary(pos)
    q, q_lat = attn.project_q(x, cos, sin)  # [B, S, H, hd]
    k = attn.project_kv(x, cos, sin)  # [B, S, hd]
    comp = attn.compressor
    if comp is not None:
        entries = naive_entries(comp, x)
    if attn.layer_type == "csa":
        indexer = comp.indexer
        index_keys = naive_entries(indexer, x)  # [B, n, di]
        iq = indexer.queries(q_lat, cos, sin)  # [B, S, Hi, di]
        iw = indexer.scorer(x)  # [B, S, Hi]
    o = torch.zeros_like(q)
    for bi in range(b):
        for t in range(s):
            keys = [k[bi, j] for j in range(max(0, t - attn.window + 1), t + 1)]
            if comp is not None:
                visible = list(range((t + 1) // comp.rate))
                if attn.layer_type == "csa" and len(visible) > attn.index_topk:
                    score = {w: float((torch.relu(iq[bi, t] @ index_keys[bi, w]) * iw[bi, t]).sum())
                             * indexer.width ** -0.5 for w in visible}
                    visible = sorted(visible, key=lambda w: -score[w])[: attn.index_topk]
                keys += [entries[bi, w] for w in visible]
            kv = torch.stack(keys)  # [n, hd]; K = V
            logits = q[bi, t] @ kv.T * attn.scale  # [H, n]
            p = torch.cat([logits, attn.sinks[:, None]], dim=-1).softmax(-1)[:, :-1]  # the sink takes mass
            o[bi, t] = p @ kv
    return attn.project_out(o, cos, sin)


@pytest.mark.parametrize("kind", ["hca", "csa"])
def test_entries_pool_each_window(kind):
    comp = layer(kind).compressor
    x = inputs()
    with torch.no_grad():
        assert_close(comp.dense_entries(x), naive_entries(comp, x))
        if kind == "csa":
            assert_close(comp.indexer.dense_entries(x), naive_entries(comp.indexer, x))


@pytest.mark.parametrize("kind", ["sliding", "csa", "hca"])
def test_dense_forward_equals_a_per_query_loop(kind):
    attn, x = layer(kind), inputs()
    with torch.no_grad():
        assert_close(attn(x), naive_forward(attn, x))


@pytest.mark.parametrize("kind", ["sliding", "csa", "hca"])
def test_dense_forward_is_causal_and_rows_independent(kind):
    attn, x = layer(kind), inputs()
    cut = 21  # mid CSA window, mid second HCA window
    changed = x.clone()
    changed[:, cut:] = torch.randn(changed[:, cut:].shape)
    changed[1] = inputs(1, seed=7)[0]
    with torch.no_grad():
        full, other, alone = attn(x), attn(changed), attn(x[:1])
    assert_close(other[0, :cut], full[0, :cut])  # later tokens never reach an earlier query
    assert_close(alone[0], full[0])  # nor does another row of the batch
    assert not torch.allclose(other[0, cut:], full[0, cut:])


def test_csa_chooses_min_k_visible_entries_per_query():
    attn, x = layer("csa"), inputs()
    pos = torch.arange(SEQ).expand(2, SEQ)
    with torch.no_grad():
        cos, sin = attn.rotary(pos)
        _, q_lat = attn.project_q(x, cos, sin)
        index_keys = attn.compressor.indexer.dense_entries(x)
        visible = (pos + 1) // attn.compressor.rate
        chosen = attn.select_entries(x, q_lat, cos, sin, index_keys, visible)  # [B, S, W] bool
    assert torch.equal(chosen.sum(-1), visible.clamp(max=attn.index_topk))
    assert not (chosen & (torch.arange(index_keys.shape[1]) >= visible.unsqueeze(-1))).any()
