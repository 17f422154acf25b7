"""A smoke nano run (every stage at toy size, ~10 s on 2 cores) and its evaluation, built once per
test session and shared by the eval and teacher-forcing tests (read-only: tests write elsewhere)."""

from __future__ import annotations

from pathlib import Path

import torch

from dspark.eval import EvalConfig, evaluate
from dspark.train.nano import NanoRecipe, run as run_nano

EVAL_CONFIG = EvalConfig(files=2, prompt_tokens=24, max_tokens=16, tf_tokens=64)
_built: dict[str, object] = {}


def smoke_run(tmp_path_factory) -> Path:
    """The run directory (pass pytest's session-scoped `tmp_path_factory`)."""
    if "run" not in _built:
        threads = torch.get_num_threads()
        out = tmp_path_factory.mktemp("nano")
        try:
            run_nano(NanoRecipe.smoke(), out, progress=False)
        finally:
            torch.set_num_threads(threads)
        _built["run"] = out
    return _built["run"]


def smoke_eval(tmp_path_factory) -> tuple[dict, Path]:
    """(eval.json content, output directory) of `dspark eval` on the smoke run with EVAL_CONFIG."""
    if "eval" not in _built:
        out = tmp_path_factory.mktemp("eval")
        _built["eval"] = evaluate(smoke_run(tmp_path_factory), out, EVAL_CONFIG, progress=False), out
    return _built["eval"]
