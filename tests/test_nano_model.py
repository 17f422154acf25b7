"""The embedded nano model (dspark/assets/nano): it ships, it is the default, its files match their
recorded hashes, and every drafting method reproduces the target's greedy text while actually
getting drafts accepted (a draft that never lands would hide behind the losslessness check)."""

from __future__ import annotations

import functools
import hashlib
import json
import re

import pytest

import dspark
from dspark.decode.methods import draft_methods
from dspark.llm import LLM, PACKAGED, default_model

DRAFT_METHODS = draft_methods()

NANO = PACKAGED["nano"]
PROMPTS = ["import os\nimport sys\n\n\ndef main(", "The following options are available:\n"]


@functools.lru_cache(maxsize=None)
def greedy(method: str):
    llm = LLM(method=method, max_batch=2)
    assert not llm.random_weights
    return llm.generate(PROMPTS, max_tokens=40)


def test_nano_ships_and_is_the_default():
    assert (NANO / "target" / "config.json").exists(), "the embedded model is missing from the package"
    assert default_model() == "nano"
    assert dspark.LLM is LLM  # `dspark.LLM("nano")`, as the README shows
    for method in DRAFT_METHODS:
        assert (NANO / "drafts" / method / "config.json").exists(), method


def test_shipped_target_matches_its_recorded_hash():
    digest = hashlib.sha256((NANO / "target" / "model.safetensors").read_bytes()).hexdigest()
    assert re.search(r"sha256 ([0-9a-f]{64})", (NANO / "README.txt").read_text()).group(1) == digest
    recipe = json.loads((NANO / "recipe.json").read_text())
    config = json.loads((NANO / "target" / "config.json").read_text())
    assert config["vocab_size"] == recipe["vocab_size"] and config["hidden_size"] == recipe["hidden_size"]


def test_greedy_text_is_not_noise():
    # A trained model continues Python with Python-looking text: mostly printable ASCII.
    text = greedy("ar")[0].text
    assert len(text) > 20 and sum(c.isascii() and (c.isprintable() or c in "\n\t") for c in text) / len(text) > 0.95


@pytest.mark.parametrize("method", ["mtp", "ngram", *DRAFT_METHODS])
def test_every_method_gives_the_ar_text_and_gets_drafts_accepted(method):
    want = greedy("ar")
    got = greedy(method)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert [c.text for c in got] == [c.text for c in want]
    accepted = sum(sum(c.stats.accepted) for c in got)
    assert accepted > 0, f"{method}: no draft token was ever accepted"
