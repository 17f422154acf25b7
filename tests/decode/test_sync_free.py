"""The step functions never read device values back: run whole generations with every
`prefill_step`, `decode_round`, `draft_and_schedule` and `verify_round` call under a dispatch mode
that raises on host syncs."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dspark.decode.engine as engine_module
from dspark.config import ModelConfig
from dspark.decode import generate
from dspark.model.target import DeepseekV4
from tests.helpers.drafters import TOY_SPS, tiny_dspark_draft, wrong_method
from tests.helpers.eagle3 import tiny_eagle3_draft

aten = torch.ops.aten
SYNCS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
         aten.nonzero_static.default, aten.unique_consecutive.default, aten._unique2.default}


class HostSyncError(AssertionError):
    pass


class RaiseOnHostSync(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNCS:
            raise HostSyncError(f"host sync inside a step: {func}")
        if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None):
                raise HostSyncError(f"boolean-mask indexing inside a step: {func}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_reads():
    real = torch.Tensor.tolist

    def tolist(self):
        raise HostSyncError("tolist() inside a step")

    torch.Tensor.tolist = tolist
    try:
        with RaiseOnHostSync():
            yield
    finally:
        torch.Tensor.tolist = real


def guarded(fn):
    def run(*args, **kwargs):
        with no_host_reads():
            return fn(*args, **kwargs)
    return run


def test_the_guard_catches_syncs():
    x = torch.arange(5.0)
    for bad in (lambda: x.sum().item(), lambda: x[x > 2], lambda: torch.nonzero(x), lambda: x.tolist(),
                lambda: bool(x.sum() > 0)):
        with pytest.raises(HostSyncError):
            with no_host_reads():
                bad()


@pytest.mark.parametrize("method", ["ar", "mtp", "ngram", "wrong", "dspark", "eagle3"])
def test_steps_have_no_host_syncs(method, monkeypatch):
    monkeypatch.setattr(engine_module, "prefill_step", guarded(engine_module.prefill_step))
    for step in ("decode_round", "draft_and_schedule", "verify_round"):
        monkeypatch.setattr(engine_module, step, guarded(getattr(engine_module, step)))
    config = ModelConfig.tiny()
    model = DeepseekV4.random(config, seed=1).eval()
    kind, draft, extra = method, None, {}
    if method == "wrong":
        kind = wrong_method(torch.randn(config.vocab_size), 3)
    elif method == "dspark":  # a DSpark draft with the hardware scheduler and online adaptation
        draft = tiny_dspark_draft(config.vocab_size)
        extra = dict(scheduler="hardware", sps=TOY_SPS, adapt=True)
    elif method == "eagle3":
        draft = tiny_eagle3_draft(model)
    res = generate(model, [[5, 6, 7], list(range(10, 40))], method=kind, draft=draft,
                   num_draft_tokens=None if method in ("ar", "wrong", "dspark", "eagle3") else 2,
                   max_new_tokens=12, max_seq_len=96, temperature=1.0, top_k=50, top_p=0.9, seed=3, max_batch=4,
                   prefill_chunk=16, token_bucket=4, **extra)
    assert all(len(r.token_ids) == 12 for r in res)
