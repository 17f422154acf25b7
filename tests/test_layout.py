"""Every package module has its test: dspark/<path>/<name>.py is tested by tests/<path>/test_<name>.py
(a leading underscore dropped: ops/_launch.py → tests/ops/test_launch.py), or COVERED_BY names the
test file that covers it and why. dspark/assets and __init__.py files are exempt."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dspark"

# module → (test file that covers it, why there). Remove an entry once tests/<path>/test_<name>.py exists.
COVERED_BY = {
    # config
    "dspark.config": ("tests/model/test_target.py",
                      "ModelConfig presets and refusals (test_config_refuses_unknown_layer_types, "
                      "test_truncated_model_keeps_shapes); field translation and refusals in "
                      "tests/checkpoint/test_v4.py, DraftConfig in tests/draft/test_deepspec.py, SamplingParams "
                      "checks in tests/decode/test_engine.py"),
    # checkpoint: one test file per format
    "dspark.checkpoint.deepspec": ("tests/draft/test_deepspec.py",
                                   "DeepSpec draft format: save/load round trips, sharded and bf16 "
                                   "checkpoints, refusals, config spellings"),
    "dspark.checkpoint.reader": ("tests/checkpoint/test_v4.py",
                                 "missing / truncated / corrupt shards, index checks, never unpickles, lazy "
                                 "metadata (test_reader_single_file_and_lazy_metadata)"),
    "dspark.checkpoint.v4_config": ("tests/checkpoint/test_v4.py",
                                    "config translation: HF defaults, legacy Flash config, round trip, "
                                    "bad configs refused, read_config"),
    # draft
    "dspark.draft.heads": ("tests/draft/test_deepspec.py",
                           "Markov (vanilla / gated / rnn) and confidence heads through the DeepSpec draft; "
                           "the block sampler against the kernels in tests/ops/test_markov_kernel.py"),
    "dspark.draft.protocol": ("tests/draft/test_deepspec.py",
                              "test_engine_protocol (the drafter-facing surface), "
                              "test_forward_train_matches_inference (TrainOutput labels, block_label_index)"),
    "dspark.draft.v4": ("tests/train/test_train_v4.py",
                        "training forward equals inference block by block; release loading in "
                        "tests/checkpoint/test_v4_draft.py, engine drafting in tests/decode/test_dspark_drafter.py"),
    # model
    "dspark.model.layers": ("tests/model/test_target.py",
                            "RMSNorm, YaRN rope and grouped projections inside the fp32 / bf16 HF equivalence; "
                            "rope_inv_freq against HF in tests/checkpoint/test_v4.py"),
    "dspark.model.mhc": ("tests/model/test_target.py",
                         "HyperConnection / HyperHead inside the HF equivalence; the mHC ops in "
                         "tests/ops/test_mhc_kernel.py"),
    "dspark.model.decoder": ("tests/model/test_target.py",
                             "every DecoderLayer (attention + MoE in mHC) inside the HF equivalence; the cached "
                             "attend path in tests/model/test_cache.py"),
    # ops: one kernel test file per op (the reference and the Triton kernel side by side)
    "dspark.ops._launch": ("tests/ops/test_attention_kernel.py",
                           "use_triton / kernels switch and op registration, in every *_kernel test"),
    "dspark.ops.attention": ("tests/ops/test_attention_kernel.py", "reference and kernel"),
    "dspark.ops.compressor": ("tests/ops/test_compressor_kernel.py", "reference and kernel"),
    "dspark.ops.indexer": ("tests/ops/test_indexer_kernel.py", "reference and kernel"),
    "dspark.ops.markov": ("tests/ops/test_markov_kernel.py", "reference and kernel"),
    "dspark.ops.mhc": ("tests/ops/test_mhc_kernel.py", "reference and kernel"),
    "dspark.ops.rng": ("tests/ops/test_sampling.py", "uniforms: counter-based streams, used by every sampler test"),
    # train
    "dspark.train.data": ("tests/train/test_trainer.py",
                          "OnTheFly and FeatureShards feed training (cached features equal on-the-fly ones); "
                          "SequenceData in tests/train/test_trainer.py and tests/data/test_pack.py"),
    "dspark.train.recipe": ("tests/test_cli.py",
                            "new_draft / train_draft / calibrate_draft through `dspark train-draft` end to end; "
                            "the nano pipeline in tests/train/test_nano.py"),
    # decode
    "dspark.decode.block": ("tests/decode/test_dspark_drafter.py",
                            "BlockDrafter in the engine, both draft layouts, against a cache-free rerun"),
    "dspark.decode.buffers": ("tests/decode/test_engine.py",
                              "SlotState through every engine test (sampling parameters per slot)"),
    "dspark.decode.drafter": ("tests/decode/test_engine.py",
                              "the Drafter base through the oracle drafter (tests/helpers/drafters.py)"),
    "dspark.decode.mtp": ("tests/decode/test_engine.py",
                          "MTP drafts equal a cache-free MTP chain every round"),
    "dspark.decode.ngram": ("tests/decode/test_engine.py",
                            "n-gram drafts equal a from-scratch lookup every round"),
    "dspark.decode.stats": ("tests/decode/test_engine.py",
                            "per-round proposal lengths / acceptances / emissions checked round by round"),
}


def modules() -> dict[str, Path]:
    """Dotted name → file of every package module that needs a test."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if path.name == "__init__.py" or rel.parts[0] in ("assets", "__pycache__"):
            continue
        out[".".join(("dspark",) + rel.with_suffix("").parts)] = path
    return out


def own_test(path: Path) -> Path:
    rel = path.relative_to(PACKAGE)
    return ROOT / "tests" / rel.parent / f"test_{rel.stem.lstrip('_')}.py"


def test_every_module_has_a_test():
    missing = []
    for name, path in modules().items():
        if own_test(path).is_file():
            continue
        if name in COVERED_BY and (ROOT / COVERED_BY[name][0]).is_file():
            continue
        missing.append(f"{path.relative_to(ROOT)}: add {own_test(path).relative_to(ROOT)} or a COVERED_BY entry")
    assert not missing, "modules without a test:\n" + "\n".join(missing)


def test_covered_by_entries_are_current():
    mods = modules()
    stale = []
    for name, (test, reason) in COVERED_BY.items():
        if name not in mods:
            stale.append(f"{name}: no such module")
        elif own_test(mods[name]).is_file():
            stale.append(f"{name}: has {own_test(mods[name]).relative_to(ROOT)} now, drop the entry")
        elif not (ROOT / test).is_file():
            stale.append(f"{name}: {test} does not exist")
        elif not reason.strip():
            stale.append(f"{name}: give the reason")
    assert not stale, "COVERED_BY (tests/test_layout.py) needs updating:\n" + "\n".join(stale)
