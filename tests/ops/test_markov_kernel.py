"""The Markov head's fused correction Ũ = U + W2·x (Triton, interpreter on CPU) against its reference;
the reference against the eager head; validation, registration, GPU bf16 and batch invariance. Then
`markov_sample` (correction + sampling in one launch with a last-block finish): its tokens equal the
sampling reference on the kernel's own Ũ exactly, its Ũ is markov_logits' bit for bit.

Tolerances: fp32 dots run at IEEE precision (only the summation order differs). fp16 rounds the
product to fp16 in both, so a last-bit difference in the fp32 accumulation can move the rounded
product by one fp16 ulp: atol 2^-10 · max|W2·x| on top of the fp32 table."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dspark.draft.heads import BlockHeads, MarkovHead
from dspark.ops import _launch, markov as markov_ops
from dspark.ops.markov import markov_logits, markov_logits_ref, markov_sample, markov_sample_ref
from dspark.ops.sampling import probs, probs_ref, sample, sample_ref
from tests.compare import assert_close
from tests.helpers.kernels import ALMOST_ONE, filter_params, logit_rows, poisoned_outputs
from tests.strategies import generator, seeds

needs_triton = pytest.mark.skipif(not _launch.HAS_TRITON, reason="needs triton")


def make_case(r, v, rank, dtype, seed, device="cpu"):
    g = generator(seed)
    logits = torch.randn(r, v, generator=g) * 3
    x = torch.randn(r, rank, generator=g).to(dtype)
    w2 = (torch.randn(v, rank, generator=g) / rank ** 0.5).to(dtype)
    return logits.to(device), x.to(device), w2.to(device)


def check_corrected(got, logits, x, w2):
    """Ũ from a kernel against the reference at the tolerances above (NaN never passes)."""
    assert got.dtype == torch.float32 and got.shape == logits.shape
    if x.dtype == torch.float32:
        assert_close(got, markov_logits_ref(logits, x, w2), atol=1e-5, rtol=1e-5, what="fp32 correction")
    else:  # 16-bit: the reference rounds the product to the same dtype; one ulp of it may differ
        product = torch.nn.functional.linear(x.float(), w2.float())
        ref = logits.float() + product.to(x.dtype).float()
        ulp = 2 ** -10 if x.dtype == torch.float16 else 2 ** -7
        assert_close(got, ref, atol=ulp * float(product.abs().max()) + 1e-5, rtol=1e-5, what=f"{x.dtype} correction")


def check(case, dtype):
    logits, x, w2 = case
    with poisoned_outputs():
        got = markov_logits(logits, x, w2, kernels="triton")
    assert got.dtype == torch.float32 and x.dtype == dtype and not got.isnan().any()
    check_corrected(got, logits, x, w2)


@needs_triton
@given(r=st.sampled_from([1, 3, 16, 17, 40]), v=st.sampled_from([1, 7, 130, 300]),
       rank=st.sampled_from([1, 6, 32, 33, 70]), seed=seeds())
def test_kernel_matches_reference(r, v, rank, seed):
    check(make_case(r, v, rank, torch.float32, seed), torch.float32)


@needs_triton
def test_fp16_matches_reference():
    check(make_case(5, 257, 32, torch.float16, 1), torch.float16)


def test_reference_is_the_eager_head():
    """`BlockHeads.markov_logits` (which dispatches here) equals the head's own linear plus U."""
    head = MarkovHead(50, 8, "gated", hidden_size=12)
    holder = BlockHeads()
    holder.markov_head = head
    g = generator(0)
    logits, prev, h = torch.randn(4, 50, generator=g), torch.randint(0, 50, (4,), generator=g), torch.randn(4, 12)
    with torch.no_grad():
        got, _ = holder.markov_logits(logits, prev, h)
        x, _ = head.step(prev, h, None)
        assert torch.equal(got, logits + head.markov_w2(x).float())


@needs_triton
def test_bad_inputs_raise():
    logits, x, w2 = make_case(3, 20, 8, torch.float32, 0)
    with pytest.raises(ValueError, match="x: 2 rows"):
        markov_logits(logits, x[:2], w2, kernels="triton")
    with pytest.raises(ValueError, match="w2"):
        markov_logits(logits, x, w2[:, :4], kernels="triton")
    with pytest.raises(ValueError, match="w2"):
        markov_logits(logits, x, w2.half(), kernels="triton")


@needs_triton
def test_opcheck():
    logits, x, w2 = make_case(3, 20, 8, torch.float32, 0)
    torch.library.opcheck(torch.ops.dspark.markov_logits.default, (logits, x, w2),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_matches_reference_and_is_batch_invariant(dtype):
    logits, x, w2 = make_case(40, 129280, 256, dtype, 3, device="cuda")
    got = markov_logits(logits, x, w2)
    product = torch.nn.functional.linear(x.float(), w2.float())
    ref = logits + product.to(dtype).float()
    assert_close(got, ref, atol=2 ** -7 * float(product.abs().max()) + 1e-5, rtol=1e-5, what=f"{dtype} correction")
    alone = markov_logits(logits[7:8], x[7:8], w2)
    assert torch.equal(alone[0], got[7])


# ---------------------------------------------------------------------------------------------------
# markov_sample: the correction and the slot's draw in one launch (last-block finish).


@st.composite
def sample_cases(draw, r: int, v: int, rank: int, dtype: torch.dtype):
    """U rows from the sampling tests (ties, 1-ulp near-ties, −inf, wide ranges); rows with x = 0 keep Ũ = U,
    so their exact ties reach the filters; per-row filters, each sometimes None; uniforms at the edges."""
    logits = draw(logit_rows(r, v))
    g = generator(draw(seeds()))
    x = torch.randn(r, rank, generator=g)
    x[torch.tensor([draw(st.booleans()) for _ in range(r)])] = 0.0
    w2 = torch.randn(v, rank, generator=g) / rank ** 0.5
    t, k, p = draw(filter_params(r, v, logits))
    k = k if draw(st.booleans()) else None
    p = p if draw(st.booleans()) else None
    u = torch.tensor([draw(st.sampled_from([0.0, 0.3, 0.7, 0.123456, ALMOST_ONE, 1.0])) for _ in range(r)])
    return logits, x.to(dtype), w2.to(dtype), t, k, p, u


def fixed_sample_case(r, v, rank, dtype, seed, device="cpu"):
    """Deterministic case with every filter on: greedy, top-k and top-p rows mixed."""
    logits, x, w2 = make_case(r, v, rank, dtype, seed)
    t = torch.tensor([0.0, 0.7, 1.0, 1.3])[torch.arange(r) % 4]
    k = torch.tensor([0, 5, 0, v // 2 + 1, 1])[torch.arange(r) % 5]
    p = torch.tensor([1.0, 0.9, 0.5])[torch.arange(r) % 3]
    u = torch.rand(r, generator=generator(seed + 1))
    return tuple(a.to(device) for a in (logits, x, w2, t, k, p, u))


def check_sample(case):
    """One launch on poisoned outputs: Ũ close to the reference and equal to markov_logits' kernel; tokens
    exactly the sampling reference's on the kernel's own Ũ."""
    logits, x, w2, t, k, p, u = case
    with poisoned_outputs():
        corrected, tokens = markov_sample(logits, x, w2, t, k, p, u, kernels="triton")
    check_corrected(corrected, logits, x, w2)
    assert torch.equal(corrected, markov_logits(logits, x, w2, kernels="triton")), "Ũ differs from markov_logits'"
    want = sample_ref(probs_ref(corrected, t, k, p), u)
    assert tokens.dtype == torch.long and torch.equal(tokens, want), f"tokens {tokens.tolist()} != {want.tolist()}"
    return corrected, tokens


@needs_triton
@given(r=st.sampled_from([1, 2, 5, 17]), v=st.sampled_from([1, 7, 67, 131, 300]), rank=st.sampled_from([1, 6, 33]),
       dtype=st.sampled_from([torch.float32, torch.float16]), data=st.data())
def test_markov_sample_kernel_matches_reference(r, v, rank, dtype, data):
    """V from one token to several vocabulary tiles (64 fp32 / 128 fp16 per tile) and two finish chunks;
    R = 17 spans two request blocks, the second with one row."""
    check_sample(data.draw(sample_cases(r, v, rank, dtype)))


@needs_triton
def test_markov_sample_more_tiles_than_finish_lanes():
    """V = 16411 (257 fp32 tiles > 256 partial lanes in the finish): the max partials come in two chunks.
    Row 0: greedy with the max tied across the first and the last tile → the lower index; row 1: the max only
    in the last tile."""
    logits, x, w2 = make_case(2, 16411, 4, torch.float32, 4)
    x[0] = 0.0  # Ũ = U: the tie survives
    logits[0, [7, 16400]] = 50.0
    logits[1, 16405] = 50.0
    t, u = torch.tensor([0.0, 1.0]), torch.tensor([0.5, ALMOST_ONE])
    _, tokens = check_sample((logits, x, w2, t, None, None, u))
    assert int(tokens[0]) == 7


@needs_triton
def test_markov_sample_is_batch_invariant_and_repeatable():
    """A row alone and inside a 17-row batch (two request blocks): bit-identical Ũ and token; a second launch
    repeats the first exactly."""
    logits, x, w2, t, k, p, u = case = fixed_sample_case(17, 131, 6, torch.float32, 5)
    runs = [markov_sample(*case, kernels="triton") for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    for i in (0, 3, 16):
        alone = markov_sample(logits[i:i + 1], x[i:i + 1], w2, t[i:i + 1], k[i:i + 1], p[i:i + 1], u[i:i + 1],
                              kernels="triton")
        assert torch.equal(alone[0][0], runs[0][0][i]) and torch.equal(alone[1][0], runs[0][1][i]), f"row {i}"


@needs_triton
def test_markov_sample_auto_on_cpu_is_the_two_step_reference(monkeypatch):
    """kernels="auto" on CPU never launches, and equals markov_logits_ref then sample_ref(probs_ref(...)) — the
    composition BlockHeads.sample_block ran before the fusion — so CPU draft tokens are unchanged bit for bit."""
    def boom(*args, **kwargs):
        raise AssertionError("kernel launched for CPU inputs with kernels='auto'")

    monkeypatch.setattr(markov_ops, "launch", boom)
    logits, x, w2, t, k, p, u = fixed_sample_case(6, 37, 5, torch.float32, 6)
    for top_k, top_p in [(k, p), (None, p), (k, None), (None, None)]:
        corrected, tokens = markov_sample(logits, x, w2, t, top_k, top_p, u)
        assert torch.equal(corrected, markov_logits_ref(logits, x, w2))
        assert torch.equal(tokens, sample_ref(probs_ref(corrected, t, top_k, top_p), u))
        assert all(torch.equal(a, b) for a, b in zip((corrected, tokens),
                                                       markov_sample_ref(logits, x, w2, t, top_k, top_p, u)))


def test_markov_sample_temperature_none_is_greedy():
    """temperature None (every request greedy): the argmax of Ũ, reference and kernel, as temperature 0."""
    logits, x, w2, _, k, p, u = fixed_sample_case(6, 37, 5, torch.float32, 7)
    want = markov_sample_ref(logits, x, w2, torch.zeros(6), k, p, u)
    impls = ["ref", "triton"] if _launch.HAS_TRITON else ["ref"]
    for kernels in impls:
        corrected, tokens = markov_sample(logits, x, w2, None, k, p, u, kernels=kernels)
        assert torch.equal(tokens, want[1]) and torch.equal(tokens, corrected.argmax(-1)), kernels


def test_block_heads_markov_sample_is_the_two_step_slot():
    """`BlockHeads.markov_sample` (one op per slot) = `markov_logits` then `sample(probs(Ũ))`, state included."""
    head = MarkovHead(50, 8, "rnn", hidden_size=12)
    holder = BlockHeads()
    holder.markov_head = head
    g = generator(1)
    logits, prev = torch.randn(4, 50, generator=g), torch.randint(0, 50, (4,), generator=g)
    h, state = torch.randn(4, 12, generator=g), torch.randn(4, 8, generator=g)
    t, p, u = torch.tensor([0.0, 1.0, 0.7, 1.0]), torch.tensor([1.0, 0.9, 0.5, 1.0]), torch.rand(4, generator=g)
    with torch.no_grad():
        corrected, token, new_state = holder.markov_sample(logits, prev, h, t, None, p, u, state)
        want, want_state = holder.markov_logits(logits, prev, h, state)
    assert torch.equal(corrected, want) and torch.equal(new_state, want_state)
    assert torch.equal(token, sample_ref(probs_ref(want, t, None, p), u))


@needs_triton
def test_markov_sample_bad_inputs_raise():
    logits, x, w2, t, k, p, u = fixed_sample_case(3, 20, 8, torch.float32, 0)
    cases = {
        "x rows": (logits, x[:2], w2, t, k, p, u),
        "w2 rank": (logits, x, w2[:, :4], t, k, p, u),
        "w2 dtype": (logits, x, w2.half(), t, k, p, u),
        "column-major logits": (torch.randn(20, 3).t(), x, w2, t, k, p, u),
        "fp64 temperature": (logits, x, w2, t.double(), k, p, u),
        "float top_k": (logits, x, w2, t, k.float(), p, u),
        "short top_p": (logits, x, w2, t, k, p[:2], u),
        "short u": (logits, x, w2, t, k, p, u[:2]),
        "fp64 u": (logits, x, w2, t, k, p, u.double()),
    }
    for name, args in cases.items():
        try:
            markov_sample(*args, kernels="triton")
        except ValueError:
            continue
        pytest.fail(f"{name}: no ValueError")


@needs_triton
def test_markov_sample_opcheck():
    """Schema, autograd registration and fake-tensor propagation (graph tracing needs a GPU, see _launch.launch)."""
    args = fixed_sample_case(3, 20, 8, torch.float32, 0)
    torch.library.opcheck(torch.ops.dspark.markov_sample.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_markov_sample_v4_vocab(dtype):
    """V4's vocabulary and a 256 rank: tokens exact on the kernel's Ũ, Ũ = markov_logits', the two-kernel path
    agrees, a row alone equals its batch row, a relaunch repeats; tie blocks (x = 0 rows) cross the filters."""
    logits, x, w2, t, k, p, u = case = fixed_sample_case(40, 129280, 256, dtype, 3, device="cuda")
    x[::5] = 0
    logits[::5, 1000:6000] = logits[::5, 999:1000].clone()
    with poisoned_outputs():
        corrected, tokens = markov_sample(*case)
    check_corrected(corrected, logits, x, w2)
    assert torch.equal(corrected, markov_logits(logits, x, w2))
    assert torch.equal(tokens, sample_ref(probs_ref(corrected, t, k, p), u))
    assert torch.equal(tokens, sample(probs(corrected, t, k, p), u))
    again = markov_sample(*case)
    assert torch.equal(again[0], corrected) and torch.equal(again[1], tokens)
    for i in (0, 17, 39):
        alone = markov_sample(logits[i:i + 1], x[i:i + 1], w2, t[i:i + 1], k[i:i + 1], p[i:i + 1], u[i:i + 1])
        assert torch.equal(alone[0][0], corrected[i]) and torch.equal(alone[1][0], tokens[i]), f"row {i}"
    torch.library.opcheck(torch.ops.dspark.markov_sample.default, fixed_sample_case(3, 300, 8, dtype, 0, "cuda"))


@pytest.mark.extended
@needs_triton
@settings(max_examples=40)
@given(r=st.sampled_from([3, 16, 33]), v=st.sampled_from([1000, 4099]), rank=st.sampled_from([16, 70]),
       dtype=st.sampled_from([torch.float32, torch.float16]), data=st.data())
def test_markov_sample_kernel_large(r, v, rank, dtype, data):
    check_sample(data.draw(sample_cases(r, v, rank, dtype)))
