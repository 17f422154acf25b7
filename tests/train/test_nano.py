"""The nano recipe's smoke mode: every stage runs, the result is deterministic, and a run stopped
mid-pretraining and resumed ends with the same weights."""

from __future__ import annotations

import json

import pytest
import torch

from dspark.train.nano import DRAFT_KINDS, NanoRecipe, export, run


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("nano")
    try:
        hashes = run(NanoRecipe.smoke(), out, progress=False)
    finally:
        torch.set_num_threads(threads)
    return out, hashes


def test_smoke_runs_every_stage_and_exports(smoke, tmp_path):
    out, hashes = smoke
    assert set(hashes) == {"target", *DRAFT_KINDS}
    for kind in ("dspark", "dspark-v4"):
        assert (out / "drafts" / kind / "draft" / "sts.json").exists()
        assert (out / "drafts" / kind / "reliability.png").exists()
    dest = export(out, tmp_path / "nano")
    from dspark.llm import LLM

    texts = {m: LLM(str(dest), method=m).generate("def f(x):", max_tokens=8)[0].text
             for m in ("ar", "mtp", "dspark", "dflash", "dflash-l1", "dspark-v4")}
    assert len(set(texts.values())) == 1  # every method is lossless against ar
    assert json.loads((dest / "hashes.json").read_text()) == hashes


def test_smoke_is_deterministic_and_resumes_exactly(smoke, tmp_path):
    _, hashes = smoke
    threads = torch.get_num_threads()
    try:
        partial = run(NanoRecipe.smoke(), tmp_path, progress=False, stop_target_after=3)
        assert partial["stopped_at"] == "3"
        resumed = run(NanoRecipe.smoke(), tmp_path, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert resumed == hashes
