"""`dspark eval --bench` (dspark.eval.bench) on a tiny chat snapshot with DSpark, DFlash and EAGLE-3 drafts:
DeepSpec's JSONL reading and sample subsets, draft methods from config, methods left out with a
note, τ equal to what `dspark.decode.generate` gives per sample at the same seeds, and the CLI's
table and files."""

from __future__ import annotations

import json
import random

import pytest

from dspark import checkpoint
from dspark.cli import main
from dspark.decode import generate
from dspark.decode.methods import draft_method
from dspark.eval.bench import (TASK_SAMPLES, BenchConfig, bench_table, evaluate_bench, load_models,
                               plan_methods, read_bench, select_samples)
from dspark.eval.stats import bootstrap_ci
from tests.helpers.text_checkpoints import bench_file, snapshot, tokenizer_files

QUESTIONS = ["What is 12 times 7?", "Write a function that reverses a string."]


@pytest.fixture(scope="module")
def snap(tmp_path_factory):
    return snapshot(tmp_path_factory)


@pytest.fixture(scope="module")
def models(snap):
    model_dir, drafts = snap
    return load_models(model_dir, [drafts["dflash"], drafts["eagle3"], drafts["dspark"]])


def test_read_bench_keeps_the_first_turn(tmp_path):
    f = bench_file(tmp_path / "b.jsonl", QUESTIONS)
    f.write_text(f.read_text() + "\n   \n")  # blank lines are skipped
    assert read_bench(f) == QUESTIONS
    for bad, where in (('{"turns": []}', 2), ('{"turns": ["a", 3]}', 2), ('{"question": "a"}', 2), ("[1]", 2),
                       ("not json", 2)):
        (tmp_path / "bad.jsonl").write_text('{"turns": ["ok"]}\n' + bad + "\n")
        with pytest.raises(ValueError, match=f"bad.jsonl:{where}: "):
            read_bench(tmp_path / "bad.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no rows"):
        read_bench(tmp_path / "empty.jsonl")


def test_samples_follow_deepspecs_subset_rule():
    rows = [f"q{i}" for i in range(40)]
    assert select_samples(rows, 40, 7) == rows and select_samples(rows, None, 7) == rows
    expected = list(rows)
    random.Random(980406).shuffle(expected)  # base_evaluator.run_dataset
    assert select_samples(rows, 30, 980406) == expected[:30]
    assert TASK_SAMPLES["gsm8k"] == 500 and TASK_SAMPLES["mt-bench"] == 80 and TASK_SAMPLES["aime25"] == 30


def test_draft_methods_come_from_the_config(snap, models):
    _, drafts = snap
    assert set(models.drafts) == {"dspark", "dflash", "eagle3"}
    assert all(draft_method(model) == method for method, (_, model) in models.drafts.items())
    assert draft_method(checkpoint.load_draft(drafts["dspark"], models.target)) == "dspark"
    with pytest.raises(ValueError, match="no decoding method is known for a int draft"):
        draft_method(3)
    with pytest.raises(ValueError, match="both dspark drafts"):
        load_models(snap[0], [drafts["dspark"], drafts["dspark"]])


def test_methods_without_a_draft_are_left_out_with_a_note(models):
    run, notes = plan_methods(models, BenchConfig())
    assert run == ["ar", "ngram", "eagle3", "dflash", "dspark"] and notes == []  # a Qwen3 has no MTP module
    run, notes = plan_methods(models, BenchConfig(methods=("dspark", "dspark-v4", "ar", "dflash", "mtp")))
    assert run == ["ar", "dflash", "dspark"]
    assert notes == ["mtp: left out, the target has no MTP module",
                     "eagle3: draft " + str(models.drafts["eagle3"][0]) + " given but eagle3 is not among --methods",
                     "dspark-v4: left out, no dspark-v4 draft given (--draft)"]
    with pytest.raises(ValueError, match="methods"):
        BenchConfig(methods=("medusa",))


def test_tau_per_benchmark_equals_generate_at_the_same_seeds(snap, models, tmp_path):
    """The harness is the engine at DeepSpec's settings: each sample's τ pools exactly the rounds that
    `generate(..., draft=PATH, seed=seed + idx)` reports for the chat-rendered prompt."""
    model_dir, drafts = snap
    f = bench_file(tmp_path / "gsm8k.jsonl", QUESTIONS)
    config = BenchConfig(max_new_tokens=12, methods=("ar", "dspark"), seed=5)
    results = evaluate_bench(models, [f], config, progress=False)
    (row,) = results["benchmarks"]
    assert row["benchmark"] == "gsm8k" and row["samples"] == 2 and results["methods"] == ["ar", "dspark"]
    prompts = [models.chat_template.encode([{"role": "user", "content": q}], enable_thinking=False)
               for q in QUESTIONS]
    eos = [*models.target.config.eos_token_ids, *models.tokenizer.eos_token_ids]
    out = generate(models.target, prompts, method="dspark", draft=str(drafts["dspark"]), max_new_tokens=12,
                   temperature=1.0, top_k=0, top_p=1.0, seed=5, num_draft_tokens=4, eos_token_id=eos)
    emitted, rounds = [sum(o.stats.emitted) for o in out], [o.stats.rounds for o in out]
    s = row["methods"]["dspark"]
    assert all(o.token_ids and o.stats.tau >= 1 for o in out)
    assert s["tau"] == pytest.approx(sum(emitted) / sum(rounds)) and s["rounds"] == sum(rounds)
    assert s["tau_ci"] == list(bootstrap_ci(emitted, rounds, seed=5))
    assert s["num_draft_tokens"] == models.drafts["dspark"][1].block_size
    assert row["methods"]["ar"]["tau"] == 1.0
    table = bench_table(results)
    assert "| benchmark | samples | ar | dspark |" in table and "| gsm8k | 2 | 1.00 [1.00, 1.00] |" in table
    assert "dflash: draft" in table and "eagle3: draft" in table  # drafts given but not asked for are named
    with pytest.raises(ValueError, match=r"\+ max_new_tokens 600 \+ a draft block \(5\) = .* exceed the target's 512"):
        evaluate_bench(models, [f], BenchConfig(max_new_tokens=600, methods=("dspark",)), progress=False)


def test_cli_writes_the_table_and_json(snap, tmp_path, capsys):
    model_dir, drafts = snap
    f = bench_file(tmp_path / "mt-bench.jsonl", QUESTIONS[:1])
    out = tmp_path / "out"
    rc = main(["eval", "--model", str(model_dir), "--draft", f"{drafts['dflash']},{drafts['eagle3']}", "--bench",
               str(f), "--methods", "ar,eagle3", "dflash,dspark", "--max-new-tokens", "6", "--out", str(out),
               "--no-progress"])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    assert "| mt-bench | 1 |" in stdout and "dspark: left out, no dspark draft given (--draft)" in stdout
    data = json.loads((out / "bench.json").read_text())
    assert data["methods"] == ["ar", "eagle3", "dflash"] and data["config"]["seed"] == 980406
    assert data["config"]["temperature"] == 1.0 and data["config"]["enable_thinking"] is False
    assert (out / "bench.md").read_text().strip() == stdout.strip()


def test_a_target_without_chat_template_is_refused(snap, tmp_path):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).symlink_to(snap[0] / name)
    tokenizer_files(tmp_path, template=None)
    with pytest.raises(ValueError, match=f"{tmp_path} has no chat template .*; benchmark prompts are chats"):
        load_models(tmp_path)


@pytest.mark.parametrize("args, message", [
    (["--bench", "x.jsonl"], "need both --model DIR and --bench"),
    (["--run", "r", "--model", "m"], "exclude each other"),
    (["--model", "/nonexistent", "--bench", "x.jsonl"], "--model: no checkpoint directory"),
])
def test_cli_refuses_incomplete_bench_requests(capsys, args, message):
    assert main(["eval", *args]) == 1
    assert message in capsys.readouterr().err
