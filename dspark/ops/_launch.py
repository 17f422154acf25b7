"""Tiny shared helpers for the Triton launchers: the "use Triton?" decision, input checks, the
registration and launch shims, cdiv / next_pow2, dtype sets, and the kernels' `dot` (selection
primitives such as the order key live in `_select.py`).

Triton is optional (it ships for Linux only): without it `HAS_TRITON` is False, `triton.jit` is an
identity decorator so the kernel modules still import, and every op runs its reference.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from dspark.config import KERNELS

try:
    import triton
    import triton.language as tl

    # torch.library.triton_op / wrap_triton arrived in torch 2.6.
    HAS_TRITON = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")
except ImportError:  # pragma: no cover - exercised only on machines without Triton
    HAS_TRITON = False

if not HAS_TRITON:  # pragma: no cover
    class _NoTriton:
        """Stands in for the `triton` module so `@triton.jit` bodies still define (and never run)."""

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

    triton = _NoTriton()
    tl = None

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Smallest power of two ≥ max(n, 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def use_triton(kernels: str, *tensors: torch.Tensor) -> bool:
    """kernels "ref" → False; "triton" → True (raises without Triton); "auto" → True iff Triton imports, every
    tensor is on CUDA and autograd is not recording through any of them (the kernels are forward-only, so
    training keeps the differentiable reference). CPU tensors with kernels="triton" need TRITON_INTERPRET=1
    set before Triton is first imported (the tests do this)."""
    if kernels == "ref":
        return False
    if kernels == "triton":
        if not HAS_TRITON:
            raise RuntimeError("kernels='triton' needs the `triton` package and torch >= 2.6")
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            raise ValueError("kernels='triton' kernels are forward-only; use kernels='ref' (or no_grad) for autograd")
        return True
    if kernels == "auto":
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        return HAS_TRITON and not grad and all(t.is_cuda for t in tensors)
    raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def check_tensor(name: str, t: torch.Tensor, *, shape: Iterable[int] | None = None, ndim: int | None = None,
                 dtypes: Iterable[torch.dtype] | None = None, device: torch.device | None = None,
                 unit_last: bool = False, contiguous: bool = False) -> None:
    """Raise ValueError unless `t` has the given shape / ndim / dtype / device and layout. Launchers never
    copy to fix a layout: `unit_last` asks for stride 1 on the last dim (other strides are passed to the
    kernel), `contiguous` for a fully contiguous tensor."""
    check(isinstance(t, torch.Tensor), f"{name}: expected a tensor, got {type(t).__name__}")
    if ndim is not None:
        check(t.dim() == ndim, f"{name}: expected {ndim} dims, got shape {tuple(t.shape)}")
    if shape is not None:
        shape = tuple(int(s) for s in shape)
        check(tuple(t.shape) == shape, f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        check(t.dtype in dtypes, f"{name}: dtype {t.dtype} not in {dtypes}")
    if device is not None:
        check(t.device == device, f"{name}: on {t.device}, expected {device}")
    if unit_last and t.dim() and t.shape[-1] > 1:
        check(t.stride(-1) == 1, f"{name}: last dim must have stride 1, got strides {t.stride()}")
    if contiguous:
        check(t.is_contiguous(), f"{name}: must be contiguous (strides {t.stride()}); no silent copies")


def register(name: str, mutates_args: Iterable[str] = ()) -> Callable:
    """`torch.library.triton_op("dspark::<name>")` when Triton is available, else the plain function."""
    if not HAS_TRITON:  # pragma: no cover
        return lambda fn: fn
    return torch.library.triton_op(f"dspark::{name}", mutates_args=tuple(mutates_args))


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake
    return t.device.type == "meta" or is_fake(t)


def launch(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    """`wrap_triton(kernel)[grid](*args, **kwargs)`, skipping empty grids.

    NOTE: under TRITON_INTERPRET=1 `wrap_triton` returns the interpreted kernel itself, which cannot run on
    fake tensors. Plain fake propagation (FakeTensorMode, opcheck's test_faketensor) only needs the outputs'
    metadata, so the launch is skipped there; graph tracing (torch.compile, export, opcheck's
    test_aot_dispatch_dynamic) would bake in unwritten outputs, so it raises instead: trace on a GPU.
    """
    if any(g == 0 for g in grid):
        return
    try:
        from triton.runtime.interpreter import InterpretedFunction
        interpreted = isinstance(kernel, InterpretedFunction)
    except ImportError:  # pragma: no cover
        interpreted = False
    if interpreted:
        tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        if any(_is_fake(t) for t in tensors):
            from torch.fx.experimental.proxy_tensor import get_proxy_mode
            if get_proxy_mode() is not None:
                raise RuntimeError("interpreted Triton kernels (TRITON_INTERPRET=1) cannot be traced into a graph; "
                                   "trace on a GPU or use kernels='ref'")
            return
    torch.library.wrap_triton(kernel)[grid](*args, **kwargs)


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    """a @ b with fp32 accumulation; IEEE: fp32 operands multiply exactly (no TF32 rounding)."""
    if IEEE:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c

