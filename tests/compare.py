"""The one tensor comparator and the per-dtype tolerance table (style.md §7).

Every numerical test compares through `assert_close`: inf/-inf/NaN must sit at identical
positions (NaN never passes against a finite value), the rest passes elementwise on absolute
OR relative error, and an optional cosine bound catches slow drift that per-element
tolerances let through.
"""

from __future__ import annotations

import torch

# Start from torch.testing defaults; widen only with a written reason next to the call.
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: dict(rtol=1e-7, atol=1e-7),
    torch.float32: dict(rtol=1.3e-6, atol=1e-5),
    torch.float16: dict(rtol=1e-3, atol=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),
}


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return dict(TOLERANCES[dtype])


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype: torch.dtype | None = None,
                 rtol: float | None = None, atol: float | None = None, min_cosine: float | None = None,
                 what: str = "tensor") -> None:
    """Compare `actual` with `expected` (both upcast to fp64).

    Tolerances default to the table entry of `dtype` (default: `actual.dtype`); explicit
    `rtol`/`atol` override it and should carry a reason at the call site.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    tol = tolerance(dtype or actual.dtype) if (dtype or actual.dtype) in TOLERANCES else tolerance(torch.float32)
    if rtol is not None:
        tol["rtol"] = rtol
    if atol is not None:
        tol["atol"] = atol
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)

    a_nan, e_nan = torch.isnan(a), torch.isnan(e)
    if not torch.equal(a_nan, e_nan):
        where = torch.nonzero(a_nan != e_nan)[:5].tolist()
        raise AssertionError(f"{what}: NaN positions differ (first at {where})")
    for sign in (1, -1):
        a_inf, e_inf = a == sign * torch.inf, e == sign * torch.inf
        if not torch.equal(a_inf, e_inf):
            where = torch.nonzero(a_inf != e_inf)[:5].tolist()
            raise AssertionError(f"{what}: {'+' if sign > 0 else '-'}inf positions differ (first at {where})")

    finite = torch.isfinite(e)
    a_f, e_f = a[finite], e[finite]
    err = (a_f - e_f).abs()
    bad = err > tol["atol"] + tol["rtol"] * e_f.abs()
    if bad.any():
        idx = int(err.argmax())
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements outside rtol={tol['rtol']:.2g} atol={tol['atol']:.2g}; "
            f"max abs err {float(err.max()):.3g} (actual {float(a_f[idx]):.6g} vs expected {float(e_f[idx]):.6g})")
    if min_cosine is not None and a_f.numel():
        cos = torch.nn.functional.cosine_similarity(a_f.flatten(), e_f.flatten(), dim=0, eps=1e-30)
        if float(cos) < min_cosine:
            raise AssertionError(f"{what}: cosine similarity {float(cos):.8f} < {min_cosine}")


def max_abs_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max |a-e| over finite entries, in fp64 (for error-ratio tests such as bf16 vs HF)."""
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    finite = torch.isfinite(a) & torch.isfinite(e)
    return float((a[finite] - e[finite]).abs().max()) if finite.any() else 0.0
