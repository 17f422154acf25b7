"""Shared test setup: hypothesis profiles, the gpu marker, deterministic seeds."""

from __future__ import annotations

import os

import torch

# Kernel tests run Triton's interpreter where there is no GPU; it must be chosen before anything
# imports triton (triton reads the variable when a kernel is decorated).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (the default tier runs two workers) each worker takes one core: two workers with two
# torch threads each would fight over the two cores (everything 10-100x slower).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings

# Small profile for CI (2 cores, two workers: the whole default tier in ~7 minutes); larger ones for the
# extended tier and GPU runs. No deadlines: CPU timing on shared cores is noise.
settings.register_profile("ci", max_examples=12, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("extended", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
