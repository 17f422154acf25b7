"""GQA attention over a paged KV cache: `paged_attention` (Triton) against its reference, the reference against
a dense causal attention of one request written by hand (and torch's SDPA), split-key and fused paths bit for
bit, batch invariance, NaN-poisoned unreachable pages and rows past each token's position, validation and the
`dspark::paged_attention` registration.

Cases hold several slots of different lengths whose pages come from a shuffled pool (the block table is never
the identity), with block-table entries past a slot's pages naming random pages (other slots', NaN ones), rows
past a slot's length and every page no slot owns set to NaN, and padding tokens on a dummy slot whose row is all
page 0 at pos 0 (page 0 is the engine's scratch page: finite, owned by nobody). Outputs are poisoned with NaN
before launch. Tests shrink the chunk (`_CHUNK`, the split path's unit) to 128 positions so that short contexts
cross chunk boundaries in the interpreter.

Tolerances: fp32 uses the table's defaults. fp16 outputs are widened by atol = 2u·max|v| (u the unit roundoff):
the kernel rounds p to the value dtype before the p·V dot (as HF's eager attention casts probabilities to the
value dtype), which moves out by at most u·Σ_j p_j·|v_j| ≤ u·max|v| before the final rounding.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from dspark.ops import _launch
from dspark.ops.paged_attention import paged_attention, paged_attention_ref
from tests.compare import assert_close
from tests.helpers.kernels import poisoned_outputs
from tests.strategies import generator, seeds

# NOTE: the package attribute dspark.ops.paged_attention is the op (the function), not the module.
paged_module = importlib.import_module("dspark.ops.paged_attention")
needs_triton = pytest.mark.skipif(not _launch.HAS_TRITON, reason="needs triton")
SMALL_CHUNK = 128  # a multiple of every BLOCK_N (64 for D ≤ 128, 32 above)


@pytest.fixture(autouse=True)
def small_chunk(monkeypatch):
    monkeypatch.setattr(paged_module, "_CHUNK", SMALL_CHUNK)


def make_case(lengths, queries, hq, hkv, d, page, dtype, seed, *, window=None, softcap=None, padding=0,
              q_scale=1.0, scale=None, device="cpu"):
    """One flat batch over len(lengths) slots (+ a dummy slot when padding > 0) → the op's positional arguments
    and keywords. Slot s holds lengths[s] positions; `queries[s]` lists the positions it queries."""
    g = generator(seed)
    owned = [math.ceil(n / page) for n in lengths]
    per_slot = max(owned)
    n_pages = 1 + sum(owned) + 2  # page 0 (scratch), the slots' pages, two pages nobody owns
    perm = (torch.randperm(n_pages - 1, generator=g) + 1).tolist()  # shuffled pages 1 … P−1
    k = torch.full((n_pages, page, hkv, d), float("nan"))
    v = torch.full((n_pages, page, hkv, d), float("nan"))
    k[0], v[0] = torch.randn(page, hkv, d, generator=g), torch.randn(page, hkv, d, generator=g)
    table = torch.randint(0, n_pages, (len(lengths) + (padding > 0), per_slot), generator=g)  # stray entries
    for s, n in enumerate(lengths):
        pages = [perm.pop() for _ in range(owned[s])]
        table[s, :owned[s]] = torch.tensor(pages)
        for j in range(n):  # only rows of positions < n are finite
            k[pages[j // page], j % page] = torch.randn(hkv, d, generator=g)
            v[pages[j // page], j % page] = torch.randn(hkv, d, generator=g)
    slot = [s for s, ps in enumerate(queries) for _ in ps]
    pos = [p for ps in queries for p in ps]
    if padding:
        table[-1] = 0
        slot += [len(lengths)] * padding
        pos += [0] * padding
    order = torch.randperm(len(slot), generator=g)  # tokens of different slots interleaved
    slot, pos = torch.tensor(slot, dtype=torch.long)[order], torch.tensor(pos, dtype=torch.long)[order]
    q = torch.randn(len(slot), hq, d, generator=g) * q_scale
    move = lambda x: x.to(device)  # noqa: E731
    args = (move(q.to(dtype)), move(k.to(dtype)), move(v.to(dtype)), move(table), move(slot), move(pos),
            d ** -0.5 if scale is None else scale)
    return args, dict(window=window, softcap=softcap)


@st.composite
def paged_cases(draw, dtypes=(torch.float32, torch.float16), max_len=100, max_queries=3, ds=(16, 64, 80, 128)):
    hkv = draw(st.sampled_from([1, 2, 3]))
    group = draw(st.sampled_from([1, 2, 4, 8]))
    d = draw(st.sampled_from(ds))
    page = draw(st.sampled_from([1, 3, 4, 16]))
    lengths = draw(st.lists(st.integers(1, max_len), min_size=1, max_size=3))
    queries = []
    for n in lengths:  # a verify block at the end, or scattered positions
        k = draw(st.integers(1, min(max_queries, n)))
        if draw(st.booleans()):
            queries.append(list(range(n - k, n)))
        else:
            queries.append(draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=k)))
    return make_case(lengths, queries, group * hkv, hkv, d, page, draw(st.sampled_from(dtypes)), draw(seeds()),
                     window=draw(st.sampled_from([None, 1, 7, 70])), softcap=draw(st.sampled_from([None, 0.7, 20.0])),
                     padding=draw(st.sampled_from([0, 0, 2])), q_scale=draw(st.sampled_from([0.1, 1.0, 4.0])),
                     scale=draw(st.sampled_from([None, 1.0])))


def tolerance(args) -> dict:
    """The dtype's table entry; for fp16 / bf16 atol = 2u·max|v| over the finite values (module docstring)."""
    q, v = args[0], args[2]
    if q.dtype == torch.float32:
        return {}
    finite = v[torch.isfinite(v)]
    return dict(atol=max(1e-5, torch.finfo(q.dtype).eps * float(finite.abs().max())))


def run_kernel(args, kw, split=None):
    with poisoned_outputs():  # the split path's workspace is poisoned too
        return paged_attention(*args, **kw, kernels="triton", split=split)


def dense_attention(q, k, v, scale, window=None, softcap=None) -> torch.Tensor:
    """One request's causal attention written by hand in fp64: q [L, Hq, D], k / v [L, Hkv, D] → [L, Hq, D]."""
    n, hq, _ = q.shape
    group = hq // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = torch.einsum("ihd,jhd->hij", q.double(), k) * scale  # [Hq, L, L]
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    allowed = (j <= i) & ((i - j < window) if window is not None else True)
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.einsum("hij,jhd->ihd", probs, v)


@pytest.mark.parametrize("window,softcap", [(None, None), (5, None), (None, 3.0), (9, 1.5)])
@pytest.mark.parametrize("page", [1, 4, 7])
def test_reference_equals_dense_causal_attention(window, softcap, page):
    """One request of 23 positions, every position queried: the reference equals the dense causal attention
    by hand (and torch's SDPA with a causal or banded mask where there is no softcap)."""
    n, hq, hkv, d = 23, 6, 2, 16
    args, kw = make_case([n], [list(range(n))], hq, hkv, d, page, torch.float32, 7 + page, window=window,
                         softcap=softcap)
    q, k_pages, v_pages, table, slot, pos, scale = args
    order = torch.argsort(pos)  # tokens back in position order
    j = torch.arange(n)
    k = k_pages[table[0, j // page], j % page]  # [L, Hkv, D], gathered by hand
    v = v_pages[table[0, j // page], j % page]
    want = dense_attention(q[order], k, v, scale, window, softcap)
    got = paged_attention_ref(*args, **kw)[order]
    assert_close(got, want.float(), what="reference vs dense")
    if softcap is None:
        allowed = (j[None, :] <= j[:, None]) & ((j[:, None] - j[None, :] < window) if window else True)
        sdpa = F.scaled_dot_product_attention(q[order].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                              attn_mask=allowed, scale=scale, enable_gqa=True).transpose(0, 1)
        assert_close(got, sdpa, what="reference vs SDPA")


@needs_triton
@given(case=paged_cases())
def test_kernel_matches_reference(case):
    args, kw = case
    got = run_kernel(args, kw)
    want = paged_attention_ref(*args, **kw)
    assert got.dtype == args[0].dtype and got.shape == args[0].shape and got.is_contiguous()
    assert torch.isfinite(got).all(), "NaN / inf from an unreachable page or a row past pos"
    assert_close(got, want, **tolerance(args), what="kernel")


@needs_triton
@settings(max_examples=6)  # two launches of a few hundred positions per example
@given(case=paged_cases(max_len=300, max_queries=2, ds=(16, 80)))
def test_split_equals_fused_bit_for_bit(case):
    """Positions up to 300 cross 128-position chunks: the split path (a program per chunk, then the in-order
    combine) gives the fused kernel's bits, and both match the reference."""
    args, kw = case
    split, fused = run_kernel(args, kw, split=True), run_kernel(args, kw, split=False)
    assert torch.equal(split, fused), "split-key and fused paths differ"
    assert_close(split, paged_attention_ref(*args, **kw), **tolerance(args), what="split kernel")


@needs_triton
@settings(max_examples=2)
@given(seed=seeds(), dtype=st.sampled_from([torch.float32, torch.float16]))
def test_batch_invariance(seed, dtype):
    """A token's output is bit-identical alone or in any subset or order of tokens, and through either path (the
    automatic choice depends on T). (Garbage in the rows it may not read: test_unreachable_rows_….)"""
    args, kw = make_case([170, 9, 140], [[169, 120, 3], [8, 0], [139]], 4, 2, 16, 4, dtype, seed, window=130)
    q, k, v, table, slot, pos, scale = args
    full = run_kernel(args, kw, split=False)
    for rows in ([0], [5], [4, 1, 3]):
        rows = torch.tensor(rows)
        alone = (q[rows], k, v, table, slot[rows], pos[rows], scale)
        assert torch.equal(run_kernel(alone, kw, split=True), full[rows]), f"rows {rows.tolist()}"


def test_split_runs_while_the_fused_grid_leaves_sms_idle():
    cpu = torch.device("cpu")  # 132 SMs assumed: split while T × Hkv < 132
    assert paged_module.split_chunks(1, 8, 32, cpu) and paged_module.split_chunks(16, 8, 32, cpu)
    assert not paged_module.split_chunks(17, 8, 32, cpu), "Qwen3-8B: fused from T = 17"
    assert not paged_module.split_chunks(1, 8, 1, cpu), "one chunk: nothing to split"


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_unreachable_rows_never_reach_the_output(dtype):
    """Rows past each token's position (inside its own pages), rows before its window and pages of other slots
    hold NaN, +inf or -inf (each token alone, through either path): its output is the bits it has on clean
    data."""
    args, kw = make_case([70, 30], [[20, 69], [0, 29]], 4, 2, 16, 8, dtype, 3, window=33)
    q, k, v, table, slot, pos, scale = args
    want = run_kernel(args, kw)
    assert torch.isfinite(want).all()
    for t in range(q.shape[0]):  # token t alone; everything it may not read poisoned
        bad = (float("nan"), float("inf"), float("-inf"))[t % 3]
        s, p = int(slot[t]), int(pos[t])
        lo = max(0, p - kw["window"] + 1)
        keep_k, keep_v = torch.full_like(k, bad), torch.full_like(v, bad)
        j = torch.arange(lo, p + 1)
        rows = (table[s, j // 8], j % 8)
        keep_k[rows], keep_v[rows] = k[rows], v[rows]
        one = (q[t:t + 1], keep_k, keep_v, table, slot[t:t + 1], pos[t:t + 1], scale)
        assert torch.equal(run_kernel(one, kw, split=t % 2 == 0), want[t:t + 1]), (bad, t)


@needs_triton
def test_layouts_and_validation():
    args, kw = make_case([20, 5], [[19, 4], [4]], 4, 2, 16, 4, torch.float32, 0)
    q, k, v, table, slot, pos, scale = args
    want = paged_attention_ref(*args)
    # Strided views with unit last stride are read in place (a q slice of a fused QKV, pages inside a K|V pool).
    qs = torch.randn(3, 8, 16)[:, ::2].copy_(q)
    kv = torch.randn(k.shape[0], 4, 2, 2, 16)
    kv[:, :, :, 0], kv[:, :, :, 1] = k, v
    for kernels in ("triton", "ref"):
        assert_close(paged_attention(qs, kv[:, :, :, 0], kv[:, :, :, 1], table.int(), slot.int(), pos.int(), scale,
                                     kernels=kernels), want, what=kernels)
    bad = {
        "q": (q.double(), k, v, table, slot, pos),
        "k_pages": (q, k.half(), v, table, slot, pos),
        "v_pages": (q, k, v[:, :2], table, slot, pos),
        "block_table": (q, k, v, table.float(), slot, pos),
        "slot": (q, k, v, table, slot[:2], pos),
        "pos": (q, k, v, table, slot, pos.float()),
    }
    bad_layout = {
        "q": (q.transpose(0, 2).contiguous().transpose(0, 2), k, v, table, slot, pos),
        "k_pages": (q, k.transpose(1, 3).contiguous().transpose(1, 3), v, table, slot, pos),
        "q heads": (q[:, :3], k, v, table, slot, pos),
        "q head dim": (q[..., :8], k, v, table, slot, pos),
        "pos": (q, k, v, table, slot, torch.stack([pos, pos], 1)[:, 0]),
    }
    for what, call in {**bad, **bad_layout}.items():
        with pytest.raises(ValueError, match=what.split()[0]):
            paged_attention(*call, scale, kernels="triton")
    for key, value in (("window", 0), ("softcap", 0.0), ("softcap", -1.0)):
        with pytest.raises(ValueError, match=key):
            paged_attention(*args, **{key: value}, kernels="triton")
        with pytest.raises(ValueError, match=key):
            paged_attention_ref(*args, **{key: value})
    with pytest.raises(ValueError, match="scale"):
        paged_attention(*args[:-1], float("nan"), kernels="triton")
    assert paged_attention(q[:0], k, v, table, slot[:0], pos[:0], scale, kernels="triton").shape == (0, 4, 16)


def test_auto_uses_the_reference_on_cpu_and_under_autograd(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("kernel launched")

    monkeypatch.setattr(paged_module, "launch", boom)
    args, kw = make_case([12, 3], [[11, 2], [2]], 4, 2, 16, 4, torch.float32, 1, window=5, softcap=2.0)
    assert torch.equal(paged_attention(*args, **kw), paged_attention_ref(*args, **kw))
    q = args[0].clone().requires_grad_(True)
    paged_attention(q, *args[1:], **kw).sum().backward()  # the reference is differentiable; NaN rows stay out
    assert torch.isfinite(q.grad).all()
    if _launch.HAS_TRITON:
        with pytest.raises(ValueError, match="forward-only"):
            paged_attention(q, *args[1:], **kw, kernels="triton")


@needs_triton
def test_opcheck():
    """Schema, autograd registration, fake tensors (test_aot_dispatch_dynamic needs a GPU: see _launch.launch)."""
    args, kw = make_case([12, 3], [[11, 2], [2]], 4, 2, 16, 4, torch.float32, 2)
    torch.library.opcheck(torch.ops.dspark.paged_attention, (*args, 5, 2.0, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.extended
@needs_triton
@settings(max_examples=200)
@given(case=paged_cases(max_len=400, max_queries=4, ds=(1, 7, 16, 33, 64, 80, 128, 256)),
       split=st.sampled_from([None, True, False]))
def test_kernel_matches_reference_extended(case, split):
    args, kw = case
    assert_close(run_kernel(args, kw, split), paged_attention_ref(*args, **kw), **tolerance(args))


@pytest.mark.extended
@needs_triton
def test_long_context_at_the_real_chunk(monkeypatch):
    """The shipped chunk size (1024 positions): a decode token at position 2500 crosses three chunks."""
    monkeypatch.undo()
    args, kw = make_case([2501, 40], [[2500, 1800], [39]], 8, 2, 16, 16, torch.float32, 4)
    split, fused = run_kernel(args, kw, split=True), run_kernel(args, kw, split=False)
    assert torch.equal(split, fused)
    assert_close(split, paged_attention_ref(*args, **kw))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv,d,window,softcap", [(32, 8, 128, None, None), (8, 4, 256, 1024, 50.0),
                                                      (16, 8, 256, None, None)])
def test_gpu_dense_target_shapes(dtype, hq, hkv, d, window, softcap, monkeypatch):
    """Qwen3-8B (Hq 32, Hkv 8, D 128) and Gemma-style (D 256, sliding window, softcap) on the GPU at the shipped
    chunk size: a decode batch and a verify block over contexts up to 3000; split vs fused bit for bit; full
    opcheck."""
    monkeypatch.undo()
    lengths = [3000, 1, 777, 1500]
    queries = [[2999], [0], list(range(760, 777)), [1499, 1024, 1023]]
    args, kw = make_case(lengths, queries, hq, hkv, d, 16, dtype, 0, window=window, softcap=softcap, padding=3,
                         device="cuda")
    got = run_kernel(args, kw)
    want = paged_attention_ref(*args, **kw)
    assert_close(got, want, **tolerance(args), min_cosine=0.9999, what="kernel")
    assert torch.equal(run_kernel(args, kw, split=True), run_kernel(args, kw, split=False)), "split vs fused"
    torch.library.opcheck(torch.ops.dspark.paged_attention, (*args, window, softcap, None))
