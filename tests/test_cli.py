"""`dspark generate` with the random tiny preset (or the embedded nano model where named): streamed
text, completions, the stats line, progress on a terminal, --help, and one-line errors for bad input;
`--chat` with `--model DIR --draft DIR` on a tiny snapshot with its own chat template."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from dspark.checkpoint import save
from dspark.cli import main
from dspark.config import ModelConfig
from dspark.model import DeepseekV4
from dspark.text import byte_tokenizer
from tests.helpers.text_checkpoints import snapshot


def run(capsys, *args: str) -> tuple[int, str, str]:
    """`dspark generate` on the random tiny preset unless the arguments name a model."""
    source = [] if {"--model", "--preset"} & set(args) else ["--preset", "tiny"]
    rc = main(["generate", "--max-tokens", "12", *source, *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_generate_streams_and_reports(capsys):
    rc, out, err = run(capsys, "--prompt", "def f(x):")
    assert rc == 0 and out.endswith("\n") and len(out) > 1
    lines = err.strip().splitlines()
    assert "RANDOM weights" in lines[0]
    assert lines[-1].startswith("method ar: 12 tokens in ")
    assert "tok/s" in lines[-1] and "11 rounds" in lines[-1] and "τ 1.00" in lines[-1]
    assert sum("tokens in" in line for line in lines) == 1


def test_default_is_the_embedded_nano_model(capsys):
    """No --model / --preset: the shipped trained model, not a random one; its drafts agree with ar."""
    rc, ar_out, err = run(capsys, "--preset", "nano", "--prompt", "import os\n")
    assert rc == 0 and "RANDOM" not in err and len(ar_out) > 1
    rc = main(["generate", "--max-tokens", "12", "--prompt", "import os\n", "--method", "dspark"])
    out, err = capsys.readouterr()
    assert rc == 0 and out == ar_out and "RANDOM" not in err
    assert err.strip().splitlines()[-1].startswith("method dspark: ")


def test_several_prompts_and_files(capsys, tmp_path):
    (tmp_path / "p.txt").write_text("from a file\n", encoding="utf-8")
    rc, out, err = run(capsys, "--prompt", "a", "--prompt", "b", "--prompt-file", str(tmp_path / "p.txt"))
    assert rc == 0
    for i in (1, 2, 3):
        assert f"--- completion {i}/3 " in out
    assert err.strip().splitlines()[-1].startswith("method ar: ")


@pytest.mark.parametrize("method", ["mtp", "ngram"])
def test_speculative_methods_give_the_ar_text(capsys, method):
    _, ar_out, _ = run(capsys, "--prompt", "abcabcabc")
    rc, out, err = run(capsys, "--prompt", "abcabcabc", "--method", method)
    assert rc == 0 and out == ar_out
    assert err.strip().splitlines()[-1].startswith(f"method {method}: ")


def test_stop_string_cuts_the_output(capsys):
    _, full, _ = run(capsys, "--prompt", "hello")
    text = full[:-1]  # the final newline ends the stream
    stop = text[len(text) // 2:][:2]
    rc, out, _ = run(capsys, "--prompt", "hello", "--stop", stop)
    assert rc == 0 and out == text[:text.find(stop)] + "\n"


def test_checkpoint_directory(capsys, tmp_path):
    save(DeepseekV4.random(ModelConfig.tiny(), seed=0), tmp_path)
    rc, _, err = run(capsys, "--model", str(tmp_path))
    assert rc == 1 and err.strip().splitlines() == [f"error: no tokenizer.json in {tmp_path} "
                                                    "(dspark reads HF `tokenizers` JSON files only)"]
    byte_tokenizer(ModelConfig.tiny().vocab_size).hf.save(str(tmp_path / "tokenizer.json"))
    _, preset_out, _ = run(capsys, "--prompt", "abc")
    rc, out, err = run(capsys, "--model", str(tmp_path), "--prompt", "abc")
    assert rc == 0 and out == preset_out and "RANDOM" not in err


def test_chat_with_a_draft_gives_the_ar_text(capsys, tmp_path_factory):
    """--chat renders the snapshot's own template; --draft DIR drafts with a DeepSpec DSpark draft."""
    model_dir, drafts = snapshot(tmp_path_factory)
    chat = ["--model", str(model_dir), "--chat", "What is 12 times 7?", "--no-thinking"]
    rc, ar_out, err = run(capsys, *chat)
    assert rc == 0 and err.strip().splitlines()[-1].startswith("method ar: ")
    rc, out, err = run(capsys, *chat, "--method", "dspark", "--draft", str(drafts["dspark"]))
    assert rc == 0 and out == ar_out and err.strip().splitlines()[-1].startswith("method dspark: ")
    rc, out, err = run(capsys, *chat, "--draft", str(drafts["eagle3"]))  # the method read from the draft's config
    assert rc == 0 and out == ar_out and err.strip().splitlines()[-1].startswith("method eagle3: ")
    rc, out, _ = run(capsys, *chat[:-1], "--chat", "Reverse a string.", "--thinking")
    assert rc == 0 and "--- completion 2/2 " in out


def test_progress_rewrites_a_line_on_a_terminal(capsys, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    assert main(["generate", "--max-tokens", "4", "--prompt", "a", "--prompt", "b"]) == 0
    text = err.getvalue()
    assert "\r\033[K" in text and "tok/s" in text
    # The progress line is cleared, then the stats line written over it.
    assert text.rstrip("\n").split("\r\033[K")[-1].startswith("method ar: 8 tokens")


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for flag in ("--model", "--preset", "--prompt-file", "--method", "--num-draft-tokens", "--max-tokens",
                 "--temperature", "--top-k", "--top-p", "--seed", "--stop", "--dtype", "--device", "--threads",
                 "--chat", "--draft", "--thinking"):
        assert flag in out
    assert "examples:" in out and "RANDOM" in out


@pytest.mark.parametrize("args", [
    ["--max-tokens", "many"], ["--method", "magic"], ["--model", "x", "--preset", "tiny"], ["--bogus"],
    ["--kernels", "cuda"],
])
def test_bad_flags_exit_2(capsys, args):
    with pytest.raises(SystemExit) as e:
        main(["generate", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["--max-tokens", "0"], "max_tokens"),
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "1.5"], "top_p"),
    (["--top-k", "-1"], "top_k"),
    (["--threads", "-2"], "threads"),
    (["--num-draft-tokens", "3"], "drafts nothing"),
    (["--model", "/no/such/checkpoint"], "no checkpoint directory"),
    (["--preset", "huge"], "known presets"),
    (["--prompt", ""], "empty"),
    (["--prompt-file", "/no/such/prompt.txt"], "cannot read prompt file"),
    (["--chat", "hi", "--prompt", "x"], "exclude each other"),
    (["--chat", "hi"], "has no chat template (looked for "),
    (["--method", "dspark", "--draft", "/no/such/draft"], "--draft: no draft checkpoint directory"),
])
def test_bad_values_exit_1(capsys, args, message):
    rc = main(["generate", *args])
    err = capsys.readouterr().err
    assert rc == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last and "Traceback" not in err


def test_console_script_error_has_no_traceback():
    res = subprocess.run([sys.executable, "-m", "dspark.cli", "generate", "--top-p", "0"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == ["error: top_p must be in (0, 1], got 0.0"]


def test_terminal_output_escapes_control_characters(capsys, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal()
    monkeypatch.setattr(sys, "stdout", out)
    # The random tiny model's greedy reply to this prompt holds the bytes 0x00 and 0x06.
    assert main(["generate", "--preset", "tiny", "--max-tokens", "32", "--prompt", "def f(x):"]) == 0
    text = out.getvalue()
    assert "\\x00" in text and "\\x06" in text
    assert all(c in "\n\t" or c.isprintable() or ord(c) >= 0xA0 for c in text)


def test_train_draft_end_to_end(tmp_path, capsys):
    """`dspark train-draft` on the tiny preset: trains, saves, calibrates, resumes."""
    from dspark.cli import main
    from dspark.checkpoint import load_draft

    out = tmp_path / "run"
    args = ["train-draft", "--out", str(out), "--steps", "6", "--sequences", "6", "--seq-len", "40",
            "--anchors", "4", "--batch-size", "2", "--checkpoint-every", "3", "--calibrate", "4", "--no-progress",
            "--block-size", "4", "--markov-rank", "8"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "trained dspark for 6 steps" in err and "ECE before" in err
    for name in ("loss.jsonl", "calibration.txt", "reliability.png", "draft/sts.json", "checkpoint/trainer.json"):
        assert (out / name).exists(), name
    draft = load_draft(out / "draft")
    assert draft.sts_temperatures is not None and draft.sts_temperatures.shape == (4,)
    assert main(args[:4] + ["7"] + args[5:]) == 0  # resumes at step 6 and trains one more
    assert len((out / "loss.jsonl").read_text().splitlines()) == 7


def test_train_draft_refuses_bad_requests(tmp_path, capsys):
    from dspark.cli import main

    assert main(["train-draft", "--out", str(tmp_path), "--kind", "dflash", "--steps", "2", "--sequences", "2",
                 "--seq-len", "24", "--anchors", "2", "--batch-size", "1", "--calibrate", "2", "--no-progress"]) == 1
    assert "needs a confidence head" in capsys.readouterr().err
    assert main(["train-draft", "--out", str(tmp_path), "--data", "x.txt", "--steps", "1"]) == 1
    assert "--data needs a --target checkpoint directory" in capsys.readouterr().err


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # capsys is read out per example
@given(option=st.sampled_from(["--max-tokens", "--temperature", "--top-k", "--top-p", "--seed", "--num-draft-tokens",
                               "--threads", "--method", "--scheduler", "--dtype", "--device", "--kernels", "--stop",
                               "--model", "--preset", "--prompt-file"]),
       value=st.one_of(st.text(max_size=6), st.sampled_from(["-1", "0", "nan", "inf", "-inf", "1e309", "2e63",
                                                             "9223372036854775808", "1.5", "x" * 300, "-"])))
def test_hostile_option_values_exit_with_one_line(capsys, option, value):
    """Any value of any option: exit 0, or 1 / 2 with one `error:` line and no traceback."""
    if option == "--prompt-file" and value == "-":
        value = "/nonexistent-file"  # stdin is not ours to read in a test
    args = ["generate", "--max-tokens", "2", option, value]
    if option not in ("--preset", "--model"):
        args += ["--preset", "tiny"]
    capsys.readouterr()
    try:
        rc = main(args)
    except SystemExit as e:  # argparse's own refusals
        rc = e.code
    err = capsys.readouterr().err
    assert rc in (0, 1, 2), rc
    if rc:
        lines = [line for line in err.strip().splitlines() if not line.startswith("WARNING")]
        assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
