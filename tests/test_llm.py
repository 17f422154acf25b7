"""`LLM` on the random tiny preset: text and token ids agree, greedy and seeds repeat, streams equal
generate, stop strings / stop tokens / eos cut the output, logprobs match a dense forward; and
`LLM.chat` on a tiny Qwen3 snapshot with its own chat template, eos list and DSpark draft."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, strategies as st
import torch

from dspark.checkpoint import save
from dspark.config import ModelConfig
from dspark.llm import LLM
from dspark.model import DeepseekV4
from dspark.text import ChatTemplateError, byte_tokenizer
from tests.helpers.text_checkpoints import qwen3_model, snapshot

PROMPTS = ["def fibonacci(n):", "héllo 👋 wörld", "x"]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("tiny")


@pytest.fixture(scope="module")
def greedy(llm):
    return llm.generate(PROMPTS, max_tokens=24, logprobs=True)


def test_checkpoint_directory(tmp_path, greedy):
    """The preset's weights saved with a tokenizer: same tokens, not marked random, eos merged."""
    save(DeepseekV4.random(ModelConfig.tiny(), seed=0), tmp_path)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        LLM(tmp_path)
    byte_tokenizer(ModelConfig.tiny().vocab_size).hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 7]}))
    model = LLM(tmp_path)
    assert not model.random_weights and model.eos_token_ids == (1, 7)
    assert model.generate(PROMPTS[0], max_tokens=24)[0].token_ids == greedy[0].token_ids


def test_random_preset_says_so(capsys):
    model = LLM("tiny", seed=3)
    assert model.random_weights and model.method == "ar"
    assert model.eos_token_ids == model.target.config.eos_token_ids
    assert "RANDOM weights" in capsys.readouterr().err


def test_generate_text_matches_token_ids(llm, greedy):
    assert len(greedy) == len(PROMPTS)
    for c in greedy:
        assert 1 <= len(c.token_ids) <= 24
        assert c.text == llm.tokenizer.decode(c.token_ids)
        assert c.finish_reason in ("length", "stop")
        assert (c.finish_reason == "length") == (len(c.token_ids) == 24)
        assert c.stats.rounds >= 1 and c.stats.tau == pytest.approx(1.0)


def test_greedy_is_deterministic_and_batch_independent(llm, greedy):
    again = llm.generate(PROMPTS, max_tokens=24)
    assert [c.token_ids for c in again] == [c.token_ids for c in greedy]
    alone = llm.generate(PROMPTS[1], max_tokens=24)
    assert alone[0].token_ids == greedy[1].token_ids


def test_logprobs_are_the_targets(llm, greedy):
    for prompt, c in zip(PROMPTS, greedy):
        assert len(c.logprobs) == len(c.token_ids)
        ids = llm.tokenizer.encode(prompt) + c.token_ids
        with torch.no_grad():
            logp = torch.log_softmax(llm.target(torch.tensor([ids]))[0].float(), -1)
        n = len(c.token_ids)
        expected = logp[len(ids) - n - 1:-1].gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(c.logprobs), expected, rtol=1e-4, atol=1e-4)
    assert llm.generate(PROMPTS[0], max_tokens=4)[0].logprobs is None


def test_stream_concatenates_to_generate(llm, greedy):
    deltas = list(llm.stream(PROMPTS[1], max_tokens=24))
    assert "".join(deltas) == greedy[1].text
    assert all(deltas)


def test_stop_string_truncates(llm, greedy):
    full = greedy[0]
    stop = full.text[len(full.text) // 2:][:2]  # two characters from the middle
    cut = full.text.find(stop)
    for run in (lambda: llm.generate(PROMPTS[0], max_tokens=24, stop=[stop])[0],
                lambda: "".join(llm.stream(PROMPTS[0], max_tokens=24, stop=[stop]))):
        c = run()
        text = c if isinstance(c, str) else c.text
        assert text == full.text[:cut]
    c = llm.generate(PROMPTS[0], max_tokens=24, stop=[stop], logprobs=True)[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    # token ids run up to the token that completed the stop string
    assert c.token_ids == full.token_ids[:len(c.token_ids)]
    assert stop in llm.tokenizer.decode(c.token_ids) and stop not in llm.tokenizer.decode(c.token_ids[:-1])
    assert len(c.logprobs) == len(c.token_ids)
    assert not llm.engine.has_unfinished()  # the request was aborted at the stop string


def test_stop_token_ids_and_eos(llm, greedy):
    full = greedy[0].token_ids
    stop_id = full[3]
    first = full.index(stop_id)
    c = llm.generate(PROMPTS[0], max_tokens=24, stop_token_ids=[stop_id])[0]
    assert c.token_ids == full[:first] and c.finish_reason == "stop" and c.stop_reason == stop_id
    assert c.text == llm.tokenizer.decode(full[:first])  # the stop token's text is not included

    eos_llm = LLM("tiny")
    eos_llm.eos_token_ids = (stop_id,)
    c = eos_llm.generate(PROMPTS[0], max_tokens=24)[0]
    assert c.token_ids == full[:first] and c.stop_reason == stop_id


def test_seeds_per_prompt(llm):
    kw = dict(max_tokens=12, temperature=1.0, top_p=0.9)
    batch = llm.generate(PROMPTS[:2], seed=7, **kw)
    assert [c.token_ids for c in batch] == [c.token_ids for c in llm.generate(PROMPTS[:2], seed=7, **kw)]
    assert batch[1].token_ids == llm.generate(PROMPTS[1], seed=8, **kw)[0].token_ids  # prompt i uses seed + i
    for c in batch:
        assert c.text == llm.tokenizer.decode(c.token_ids)


def test_more_prompts_than_slots(greedy):
    small = LLM("tiny", max_batch=2)
    assert [c.token_ids for c in small.generate(PROMPTS, max_tokens=24)] == [c.token_ids for c in greedy]


def test_early_close_aborts_and_frees_the_llm(llm, greedy):
    it = llm.stream(PROMPTS[0], max_tokens=24)
    next(it)
    with pytest.raises(RuntimeError, match="still running"):
        llm.generate(PROMPTS[0], max_tokens=2)
    it.close()
    assert llm.generate(PROMPTS[0], max_tokens=24)[0].token_ids == greedy[0].token_ids


@pytest.mark.parametrize("kwargs, message", [
    (dict(texts=""), "prompt 0 is empty"),
    (dict(texts=["ok", ""]), "prompt 1 is empty"),
    (dict(texts=[]), "no prompts"),
    (dict(texts=[b"bytes"]), "not a string"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(seed=-1), "seed"),
    (dict(seed="1"), "seed"),
    (dict(stop=[""]), "stop strings"),
    (dict(stop="end"), "stop strings"),
    (dict(stop_token_ids=[10**6]), "outside the vocabulary"),
    (dict(stop_token_ids=["1"]), "stop_token_ids must be integers"),
    (dict(max_tokens=10**6), "max_seq_len"),
])
def test_bad_arguments(llm, kwargs, message):
    kwargs = {"texts": "ok", **kwargs}
    with pytest.raises(ValueError, match=message):
        llm.generate(**kwargs)


def test_bad_construction():
    with pytest.raises(ValueError, match="not a checkpoint directory.*known presets"):
        LLM("no-such-model")
    with pytest.raises(ValueError, match="unknown dtype"):
        LLM("tiny", dtype="fp8")
    with pytest.raises(ValueError, match="unknown method"):
        LLM("tiny", method="magic")
    with pytest.raises(ValueError, match="bad device"):
        LLM("tiny", device="gpu")
    with pytest.raises(ValueError, match="unknown kernels"):
        LLM("tiny", kernels="cuda")
    with pytest.raises(ValueError, match="drafts nothing"):
        LLM("tiny", num_draft_tokens=2)
    with pytest.raises(ValueError, match="method 'ngram' takes no trained draft, but draft='d' was given"):
        LLM("tiny", method="ngram", draft="d")
    with pytest.raises(ValueError, match="one prompt"):
        LLM.stream(None, ["a", "b"])


@given(field=st.sampled_from(["max_tokens", "temperature", "top_k", "top_p", "seed", "stop", "stop_token_ids"]),
       value=st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                       st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5),
                       st.lists(st.integers(min_value=-2, max_value=10**6), max_size=2)))
def test_hostile_arguments_are_refused_by_name_or_run(llm, field, value):
    """Either a ValueError / TypeError naming the argument at the call, or a completion."""
    kwargs = {"max_tokens": 3, field: value}
    if field == "max_tokens" and isinstance(value, int) and not isinstance(value, bool) and value > 3:
        kwargs[field] = 3  # a valid but long budget: not what this test is about
    try:
        out = llm.generate("ok", **kwargs)
    except (ValueError, TypeError) as e:
        name = {"stop": "stop string", "stop_token_ids": "stop"}.get(field, field)
        assert name in str(e) or "vocabulary" in str(e) or "max_seq_len" in str(e), f"{field}={value!r}: {e}"
        return
    assert len(out) == 1 and out[0].finish_reason in ("stop", "length")
    assert not llm.engine.has_unfinished()


# ------------------------------------------------------------------------------ chat
CHAT = [{"role": "user", "content": "What is 12 times 7?"}]


@pytest.fixture(scope="module")
def chat_llms(tmp_path_factory):
    model_dir, drafts = snapshot(tmp_path_factory)
    return LLM(model_dir), LLM(model_dir, method="dspark", draft=drafts["dspark"])


def test_chat_renders_the_checkpoints_template_and_drafts_losslessly(chat_llms):
    ar, dspark = chat_llms
    assert ar.eos_token_ids == (ar.tokenizer.hf.token_to_id("<|im_end|>"), ar.tokenizer.hf.token_to_id("<|endoftext|>"))
    (ids,) = ar.chat_prompts(CHAT, enable_thinking=False)
    assert ids == ar.tokenizer.encode("<|im_start|>user\nWhat is 12 times 7?<|im_end|>\n<|im_start|>assistant\n"
                                      "<think>\n\n</think>\n\n", add_special_tokens=False)
    (default,) = ar.chat_prompts(CHAT)  # without enable_thinking the template leaves the think block out
    assert default == ids[:len(default)] and len(default) < len(ids)
    want = ar.generate_ids([ids], max_tokens=16)[0]
    hf = qwen3_model().generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
    assert want.finish_reason == "length" and want.token_ids == hf  # the snapshot decodes as transformers does
    got = dspark.chat(CHAT, max_tokens=16, enable_thinking=False)
    assert len(got) == 1 and got[0].token_ids == want.token_ids and got[0].text == want.text  # greedy is lossless
    assert got[0].stats.tau >= 1 and dspark.method == "dspark"
    two = ar.chat([CHAT, [{"role": "system", "content": "Be brief."}, *CHAT]], max_tokens=4,
                  chat_template_kwargs={"enable_thinking": False})
    assert len(two) == 2 and two[0].token_ids == want.token_ids[:4]


def test_the_drafts_method_comes_from_its_config(tmp_path_factory):
    model_dir, drafts = snapshot(tmp_path_factory)
    assert LLM(model_dir, draft=drafts["eagle3"]).method == "eagle3"  # no method given: the draft's own
    assert LLM(model_dir, method="dflash-l1", draft=drafts["dflash"]).method == "dflash-l1"  # one config for both
    for method, kind in (("dspark", "eagle3"), ("dflash", "dspark")):
        with pytest.raises(ValueError, match=f"holds a draft for method '{kind}' \\(read from its config.json\\), "
                                             f"not for '{method}': pass method='{kind}'"):
            LLM(model_dir, method=method, draft=drafts[kind])
    with pytest.raises(ValueError, match="'tiny' is a random preset: it has no trained draft"):
        LLM("tiny", draft=drafts["dspark"])


def test_chat_errors(chat_llms, llm, tmp_path_factory, tmp_path):
    ar, _ = chat_llms
    with pytest.raises(ChatTemplateError, match="refused the messages: unknown role tool"):
        ar.chat([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="conversation"):
        ar.chat("hello")
    with pytest.raises(ValueError, match="random-weight preset: it has no chat template"):
        llm.chat(CHAT)
    model_dir, _ = snapshot(tmp_path_factory)
    for f in model_dir.iterdir():
        if f.name != "tokenizer_config.json":
            (tmp_path / f.name).symlink_to(f)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"no chat template \\(looked for {tmp_path}/chat_template.jinja and the "
                                         f"chat_template field of {tmp_path}/tokenizer_config.json\\)"):
        LLM(tmp_path).chat(CHAT)


def test_compile_reaches_the_engine_config():
    # Checked before any model is built: compiled rounds are the CPU path, CUDA graphs the GPU one.
    with pytest.raises(ValueError, match="compile=True and cuda_graphs=True"):
        LLM("tiny", compile=True, cuda_graphs=True)
