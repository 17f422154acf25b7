"""Mutated tiny checkpoints: every outcome is a load or a one-line error that names the file, and
nothing is sized by a claim the tensors do not back (the process's peak memory stays within a bound) (config fields, header shapes, dtypes, shard
index entries, symlinks, the hub-cache layout)."""

from __future__ import annotations

import functools
import json
import os
import resource

import torch
from hypothesis import given, strategies as st

from dspark.checkpoint import config_to_dict, load_target
from dspark.checkpoint.v4 import to_upstream
from dspark.config import ModelConfig
from dspark.model.target import DeepseekV4
from tests.helpers.checkpoints import write

TINY = ModelConfig.tiny()
HOSTILE = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 10**5, 10**9, 10**10, 2**63]), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6), st.lists(st.integers(min_value=-2, max_value=9), max_size=5), st.just({}),
)
# A lying size must never be built before it is refused: the process's peak resident memory (kB on Linux) may
# grow by at most this much over the whole module (a tiny model needs a few MB; a claimed 10^9 positions, GBs).
PEAK_GROWTH_KB = 1 << 20
PEAK_AT_START_KB = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


@functools.lru_cache(maxsize=None)
def tensors() -> dict[str, torch.Tensor]:
    return to_upstream(DeepseekV4.random(TINY, seed=3).state_dict())


def outcome(path) -> str:
    """'loaded' or the error's message; anything but a one-line ValueError / TypeError / OSError that
    names the checkpoint fails the test."""
    try:
        model = load_target(path)
    except (ValueError, TypeError, OSError) as e:
        message = str(e)
        assert "\n" not in message, message
        assert str(path) in message or "config.json" in message, f"names no file: {message}"
        return message
    finally:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert peak - PEAK_AT_START_KB < PEAK_GROWTH_KB, "a load allocated GBs: sized by an unchecked claim?"
    assert isinstance(model, DeepseekV4)
    return "loaded"


@given(field=st.sampled_from(sorted(config_to_dict(TINY))), value=HOSTILE)
def test_mutated_config_fields(tmp_path_factory, field, value):
    config = dict(config_to_dict(TINY), **{field: value})
    outcome(write(tmp_path_factory.mktemp("ckpt"), tensors(), config))


@given(name=st.sampled_from(sorted(tensors())), change=st.sampled_from(["shape", "dtype", "drop", "extra"]))
def test_mutated_tensors(tmp_path_factory, name, change):
    state = dict(tensors())
    t = state[name]
    if change == "shape":
        state[name] = torch.zeros(*(s + 1 for s in t.shape), dtype=t.dtype)
    elif change == "dtype":
        state[name] = t.to(torch.int32) if t.is_floating_point() else t.float()
    elif change == "drop":
        del state[name]
    else:
        state[name + ".extra"] = t.clone()
    assert outcome(write(tmp_path_factory.mktemp("ckpt"), state, config_to_dict(TINY))) != "loaded"


@given(entry=st.one_of(st.text(max_size=12), st.sampled_from(["../x.safetensors", "/etc/passwd", "", ".", "..",
                                                                "model-00001-of-00002.safetensors/x"]),
                       st.integers(), st.none()))
def test_mutated_index_entries(tmp_path_factory, entry):
    path = write(tmp_path_factory.mktemp("ckpt"), tensors(), config_to_dict(TINY), shards=2)
    index = path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["embed.weight"] = entry
    index.write_text(json.dumps(data))
    outcome(path)


def test_symlinks_to_files_load_and_dangling_ones_are_refused(tmp_path):
    real = write(tmp_path / "real", tensors(), config_to_dict(TINY), shards=2)
    linked = tmp_path / "linked"
    linked.mkdir()
    for f in real.iterdir():
        (linked / f.name).symlink_to(os.path.relpath(f, linked))
    assert outcome(linked) == "loaded"
    (real / "model-00002-of-00002.safetensors").unlink()
    assert "missing" in outcome(linked)
