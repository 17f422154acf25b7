"""The acceptance harnesses (`dspark eval`) on the engine's own drafters.

    run.py       a nano run directory: target, drafts, k, held-out documents; the eval methods
    harness.py   EvalConfig and `evaluate`: end to end through the engine, teacher forced through
                 `engine.drafter.teacher_forced` (every definition in its docstring)
    stats.py     anchors, exact acceptance, survival, the file bootstrap, repetition
    report.py    eval.json, table.md, plots, traces.jsonl
    bench.py     `dspark eval --bench`: τ per chat benchmark and method on a real checkpoint and its
                 drafts, by DeepSpec's evaluation rules (each rule and its source in its docstring)
"""

from dspark.eval.harness import EvalConfig, evaluate, generate_one, make_engine
from dspark.eval.report import markdown_table, plot, trace_lines
from dspark.eval.run import DRAFT_METHODS, METHODS, Run, heldout_files, load_run
from dspark.eval.stats import TF_WARMUP, acceptance_tf, bootstrap_ci, repeated_ngrams, survival, target_rows, tf_anchors

__all__ = ["DRAFT_METHODS", "METHODS", "TF_WARMUP", "EvalConfig", "Run", "acceptance_tf", "bootstrap_ci", "evaluate",
           "generate_one", "heldout_files", "load_run", "make_engine", "markdown_table", "plot", "repeated_ngrams",
           "survival", "target_rows", "tf_anchors", "trace_lines"]
