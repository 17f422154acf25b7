"""Triton chain rejection sampling against `chain_rejection_ref`: all four outputs bit-identical given the
same uniforms (the reference itself is checked statistically in test_rejection.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dspark.ops import _launch, rejection
from dspark.ops.rejection import chain_rejection, chain_rejection_ref, residual_has_mass
from dspark.ops.sampling import probs_ref, sample_ref
from tests.helpers.kernels import ALMOST_ONE, assert_equal, filter_params, logit_rows, poisoned_outputs
from tests.strategies import generator, seeds

needs_triton = pytest.mark.skipif(not _launch.HAS_TRITON, reason="needs triton")
OUTPUTS = ("accepted", "emitted", "num_emitted", "stopped")


@st.composite
def verify_batches(draw, vocab: int, requests=(1, 2, 3), gammas=(0, 1, 2, 3)):
    """A ragged verify batch as decode builds it: padding rows between requests, ℓ_r ∈ [0, γ], drafts
    sampled from q (or the target argmax, or any token, −1 past ℓ), draft logits equal to / near / far from
    the target rows, stop tokens that collide with drafts, uniforms sliced out of one [R, 2γ+1] tensor."""
    r, gamma = draw(st.sampled_from(requests)), draw(st.sampled_from(gammas))
    g = generator(draw(seeds()))
    verify_len = [draw(st.integers(0, gamma)) for _ in range(r)]
    start, rows = [], 0
    for ell in verify_len:
        rows += draw(st.integers(0, 1))  # padding row
        start.append(rows)
        rows += ell + 1
    rows += draw(st.integers(0, 2))
    target = draw(logit_rows(rows, vocab))
    t, k, p = draw(filter_params(r, vocab))

    draft = torch.empty(r, gamma, vocab)
    tokens = torch.empty(r, gamma, dtype=torch.long)
    for i in range(r):
        own = target[start[i]:start[i] + gamma]
        own = torch.cat([own, target[-1:].expand(gamma - own.shape[0], -1)]) if own.shape[0] < gamma else own
        kind = draw(st.sampled_from(["same", "near", "noisy", "other"]))
        if kind == "same":  # p = q: every verified draft is accepted
            draft[i] = own
        elif kind == "near":  # residual of ~1e-6 mass: exercises the 1e-8 residual threshold
            draft[i] = own + 1e-6 * torch.randn(gamma, vocab, generator=g)
        elif kind == "noisy":
            draft[i] = own + torch.randn(gamma, vocab, generator=g)
        else:
            draft[i] = draw(logit_rows(gamma, vocab)) if gamma else draft[i]
        if gamma == 0:
            continue
        q = probs_ref(draft[i], t[i].expand(gamma), k[i].expand(gamma), p[i].expand(gamma))
        how = draw(st.sampled_from(["sampled", "argmax", "any"]))
        if how == "sampled":
            tokens[i] = sample_ref(q, torch.rand(gamma, generator=g))
        elif how == "argmax":
            tokens[i] = own.argmax(-1)
        else:
            tokens[i] = torch.randint(0, vocab, (gamma,), generator=g)
        tokens[i, verify_len[i]:] = -1  # unverified slots may hold padding

    n_stop = draw(st.sampled_from([0, 1, 3]))
    stop = torch.randint(0, vocab, (r, n_stop), generator=g)
    if n_stop and gamma and draw(st.booleans()):
        stop[:, 0] = tokens[:, draw(st.integers(0, gamma - 1))].clamp(min=0)
    if n_stop > 1:
        stop[:, -1] = -1
    u = torch.rand(r, 2 * gamma + 1, generator=g)
    for _ in range(draw(st.integers(0, 3))):
        u[draw(st.integers(0, r - 1)), draw(st.integers(0, 2 * gamma))] = draw(st.sampled_from([0.0, ALMOST_ONE,
                                                                                                  0.5]))
    return (target, torch.tensor(start), torch.tensor(verify_len), draft, tokens, t, k, p, stop,
            u[:, gamma:2 * gamma], u[:, 2 * gamma])


def check_batch(batch):
    with poisoned_outputs():
        got = chain_rejection(*batch, kernels="triton")
    want = chain_rejection_ref(*batch)
    for name, a, b in zip(OUTPUTS, got, want):
        assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} vs {b.dtype}"
        assert_equal(a, b, name)
    return want


@needs_triton
@given(v=st.sampled_from([1, 7, 129]), dtypes=st.sampled_from([(torch.float32, torch.float32),
                                                               (torch.float16, torch.float16),
                                                               (torch.float32, torch.float16)]), data=st.data())
def test_chain_rejection_kernel_is_bit_identical(v, dtypes, data):
    batch = list(data.draw(verify_batches(v)))
    batch[0], batch[3] = batch[0].to(dtypes[0]), batch[3].to(dtypes[1])
    check_batch(batch)


@given(data=st.data())
def test_filters_passed_as_none_are_off_for_every_request(data):
    """top_k / top_p = None (no request filters) decide exactly as explicit off values, ref and kernel."""
    batch = list(data.draw(verify_batches(7)))
    r = batch[1].shape[0]
    batch[6], batch[7] = torch.zeros(r, dtype=torch.long), torch.ones(r)
    want = chain_rejection_ref(*batch)
    unfiltered = batch[:6] + [None, None] + batch[8:]
    impls = ["ref", "triton"] if _launch.HAS_TRITON else ["ref"]
    for kernels in impls:
        for name, a, b in zip(OUTPUTS, chain_rejection(*unfiltered, kernels=kernels), want):
            assert_equal(a, b, f"{kernels} {name}")


@given(data=st.data())
def test_temperature_none_is_greedy_for_every_request(data):
    """temperature = None (every request greedy) decides exactly as temperature 0, ref and kernel."""
    batch = list(data.draw(verify_batches(7)))
    batch[5] = torch.zeros(batch[1].shape[0])
    want = chain_rejection_ref(*batch)
    greedy = batch[:5] + [None] + batch[6:]
    impls = ["ref", "triton"] if _launch.HAS_TRITON else ["ref"]
    for kernels in impls:
        for name, a, b in zip(OUTPUTS, chain_rejection(*greedy, kernels=kernels), want):
            assert_equal(a, b, f"{kernels} {name}")


@needs_triton
def test_special_cases():
    """verify_len 0, all accepted (bonus from row ℓ), greedy correction, a stop among the drafts, a stop as
    the bonus, p = q, and an int32 index layout."""
    v = 6
    logits = torch.tensor([[0.0, 5.0, 1.0, 0.0, 0.0, 0.0],
                           [0.0, 0.0, 0.0, 4.0, 0.0, 0.0],
                           [2.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    target = torch.cat([logits, logits, logits])  # three requests, rows 0-2, 3-5, 6-8
    draft = torch.randn(3, 2, v, generator=torch.Generator().manual_seed(0))
    draft[2] = logits[:2]  # request 2: p = q
    tokens = torch.tensor([[1, 3], [1, 4], [1, 3]])
    start, verify_len = torch.tensor([0, 3, 6]), torch.tensor([2, 2, 0])
    stop = torch.tensor([[0, -1], [-1, -1], [1, -1]])
    u = torch.rand(3, 5, generator=torch.Generator().manual_seed(1))
    for t in (0.0, 1.0):
        for ell in (torch.tensor([2, 2, 0]), torch.tensor([0, 1, 2])):
            batch = (target, start, ell, draft, tokens, torch.full((3,), t), torch.zeros(3, dtype=torch.long),
                     torch.ones(3), stop, u[:, 2:4], u[:, 4])
            check_batch(batch)
            check_batch([x.to(torch.int32) if x.dtype == torch.long else x for x in batch])
    acc, emitted, num, stopped = check_batch((target, start, verify_len, draft, tokens, torch.zeros(3),
                                              torch.zeros(3, dtype=torch.long), torch.ones(3), stop, u[:, 2:4],
                                              u[:, 4]))
    assert acc.tolist() == [2, 1, 0] and emitted[0].tolist() == [1, 3, 0] and bool(stopped[0])


def test_residual_threshold_is_exact_fixed_point():
    tiny = torch.zeros(2, 5)
    tiny[0, 1] = 1e-8  # fp32(1e-8) exactly: not above the threshold
    tiny[1, 1] = torch.nextafter(torch.tensor(1e-8), torch.tensor(1.0))
    assert residual_has_mass(tiny).tolist() == [False, True]


@needs_triton
def test_launcher_validates_instead_of_copying():
    r, gamma, v = 2, 2, 7
    good = [torch.randn(6, v), torch.tensor([0, 3]), torch.tensor([2, 2]), torch.randn(r, gamma, v),
            torch.zeros(r, gamma, dtype=torch.long), torch.ones(r), torch.zeros(r, dtype=torch.long), torch.ones(r),
            torch.full((r, 1), -1), torch.rand(r, gamma), torch.rand(r)]
    chain_rejection(*good, kernels="triton")
    bad = {0: torch.randn(v, 6).t(), 3: torch.randn(r, gamma, v).double(),
           4: torch.zeros(r, gamma + 1, dtype=torch.long),
           5: torch.ones(r + 1), 9: torch.rand(r, gamma).double(), 8: torch.full((r + 1, 1), -1)}
    for i, value in bad.items():
        args = list(good)
        args[i] = value
        with pytest.raises(ValueError):
            chain_rejection(*args, kernels="triton")


def test_auto_on_cpu_runs_the_reference(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("kernel launched for CPU inputs with kernels='auto'")

    monkeypatch.setattr(rejection, "launch", boom)
    r, gamma, v = 2, 2, 7
    args = (torch.randn(6, v), torch.tensor([0, 3]), torch.tensor([2, 1]), torch.randn(r, gamma, v),
            torch.zeros(r, gamma, dtype=torch.long), torch.ones(r), torch.zeros(r, dtype=torch.long), torch.ones(r),
            torch.full((r, 1), -1), torch.rand(r, gamma), torch.rand(r))
    for a, b in zip(chain_rejection(*args), chain_rejection_ref(*args)):
        assert torch.equal(a, b)


@needs_triton
def test_opcheck():
    """Schema, autograd registration, fake tensors (test_aot_dispatch_dynamic needs a GPU: see _launch.launch)."""
    r, gamma, v = 2, 3, 11
    args = (torch.randn(9, v), torch.tensor([0, 4]), torch.tensor([3, 2]), torch.randn(r, gamma, v),
            torch.randint(0, v, (r, gamma)), torch.tensor([0.0, 0.8]), torch.tensor([0, 4]), torch.tensor([1.0, 0.9]),
            torch.tensor([[2, -1], [5, 7]]), torch.rand(r, gamma), torch.rand(r))
    torch.library.opcheck(torch.ops.dspark.chain_rejection, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.extended
@needs_triton
@settings(max_examples=40)
@given(v=st.sampled_from([7, 129, 1000]), data=st.data())
def test_chain_rejection_kernel_larger_batches(v, data):
    check_batch(data.draw(verify_batches(v, requests=(4, 5), gammas=(3, 5))))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_chain_rejection_v4_shapes(dtype):
    """R = 32 requests, γ = 7, V = 129 280 (bf16 logits as the model emits them), full opcheck."""
    g = torch.Generator(device="cuda").manual_seed(0)
    r, gamma, v = 32, 7, 129_280
    verify_len = torch.randint(0, gamma + 1, (r,), device="cuda", generator=g)
    start = torch.cat([torch.zeros(1, device="cuda", dtype=torch.long), (verify_len + 1).cumsum(0)[:-1]])
    target = (torch.randn(int((verify_len + 1).sum()), v, device="cuda", generator=g) * 3).to(dtype)
    draft = (target[start.clamp(max=target.shape[0] - 1)].unsqueeze(1).expand(r, gamma, v).float()
             + torch.randn(r, gamma, v, device="cuda", generator=g)).to(dtype)
    t = torch.tensor([0.0, 0.7, 1.0, 1.2] * (r // 4), device="cuda")
    k = torch.tensor([0, 50, 0, 1] * (r // 4), device="cuda")
    p = torch.tensor([1.0, 0.9, 0.8, 1.0] * (r // 4), device="cuda")
    q = probs_ref(draft.reshape(-1, v), t.repeat_interleave(gamma), k.repeat_interleave(gamma),
                  p.repeat_interleave(gamma))
    tokens = sample_ref(q, torch.rand(r * gamma, device="cuda", generator=g)).view(r, gamma)
    stop = torch.full((r, 2), -1, device="cuda")
    stop[::5, 0] = tokens[::5, 1]
    u = torch.rand(r, 2 * gamma + 1, device="cuda", generator=g)
    batch = (target, start, verify_len, draft, tokens, t, k, p, stop, u[:, gamma:2 * gamma], u[:, 2 * gamma])
    check_batch(batch)
    small = tuple(x[:4] if x.dim() and x.shape[0] == r else x for x in batch)
    torch.library.opcheck(torch.ops.dspark.chain_rejection, small)
