"""Tokenizers and streaming text: byte-tokenizer round trips, incremental detokenization equal to
a full decode (byte, byte-level BPE and Metaspace BPE tokenizers), UTF-8 safety, stop strings, and
chat templates rendered and encoded as transformers' apply_chat_template."""

from __future__ import annotations

import functools
import json

import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import decoders, models, pre_tokenizers, trainers

from dspark.text import (ChatTemplate, ChatTemplateError, IncrementalDetokenizer, StopStringMatcher, Tokenizer,
                         byte_tokenizer, load_tokenizer, read_chat_template)
from tests.helpers.text_checkpoints import QWEN3_STYLE_TEMPLATE, tokenizer_files

# The properties below take milliseconds per example: run more than the CI profile's default.
CHEAP_EXAMPLES = 200

HARD_TEXTS = [
    "",
    "def fibonacci(n):\n    return n",
    "👋🏽 👨‍👩‍👧 🇫🇷",  # skin tone, ZWJ family, flag: 4-byte characters in sequences
    "日本語のテキスト, 中文, 한국어",
    "e\u0301 n\u0303 a\u0308\u0304 ",  # combining marks
    "\x00\x01\t\r\n\x7f\u00a0\u2028\ufeff",
    "<|unused_300|> is text, not a token",
    "\ufffd replacement character",
]

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)",
    "Speculative decoding drafts tokens and verifies them in one pass.",
    "日本語のテキストと中文的句子。Emoji: 👋🏽 🚀 ✨",
    "café naïve résumé — “quotes” and ‘apostrophes’",
]


@functools.lru_cache(maxsize=None)
def bpe(kind: str) -> Tokenizer:
    """A small BPE trained here: byte-level (GPT-2 style) or Metaspace (SentencePiece style)."""
    if kind == "bytelevel":
        hf = tokenizers.Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        hf = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
        hf.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
        hf.decoder = decoders.Metaspace(prepend_scheme="always")
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    hf.train_from_iterator(CORPUS * 4, trainer)
    return Tokenizer(hf)


def stream(tokenizer: Tokenizer, ids: list[int], cuts: list[int]) -> list[str]:
    """Deltas of an IncrementalDetokenizer fed `ids` in chunks ending at `cuts`, then flushed."""
    detok = IncrementalDetokenizer(tokenizer)
    bounds = [0, *sorted(c % (len(ids) + 1) for c in cuts), len(ids)]
    deltas = [detok.push(ids[a:b]) for a, b in zip(bounds, bounds[1:])]
    return deltas + [detok.flush()]


# ------------------------------------------------------------------------------ byte tokenizer
@pytest.mark.parametrize("text", HARD_TEXTS)
def test_byte_tokenizer_ids_are_utf8_bytes(text):
    tok = byte_tokenizer(509)
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.decode(tok.encode(text)) == text


@given(st.text())
def test_byte_tokenizer_round_trips_any_text(text):
    tok = byte_tokenizer(300)
    assert tok.decode(tok.encode(text)) == text


def test_byte_tokenizer_vocabulary():
    tok = byte_tokenizer(300)
    assert tok.vocab_size == 300 and tok.eos_token_ids == () and not tok.add_bos
    assert tok.decode([104, 299, 105]) == "h<|unused_299|>i"  # ids past the bytes stay visible
    assert byte_tokenizer(256).vocab_size == 256
    for bad in (255, 0, "300"):
        with pytest.raises(ValueError, match="vocab_size >= 256"):
            byte_tokenizer(bad)


# ------------------------------------------------------------------------------ detokenization
@settings(max_examples=CHEAP_EXAMPLES)
@given(st.lists(st.integers(0, 299), max_size=40), st.lists(st.integers(0, 40), max_size=6))
def test_detokenizer_equals_full_decode_byte_ids(ids, cuts):
    """Any ids, valid UTF-8 or not (random models emit stray continuation bytes)."""
    tok = byte_tokenizer(300)
    assert "".join(stream(tok, ids, cuts)) == tok.decode(ids)


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
@settings(max_examples=CHEAP_EXAMPLES)
@given(data=st.data())
def test_detokenizer_equals_full_decode_bpe(kind, data):
    tok = bpe(kind)
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=30))
    cuts = data.draw(st.lists(st.integers(0, 30), max_size=6))
    assert "".join(stream(tok, ids, cuts)) == tok.decode(ids)


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
@pytest.mark.parametrize("text", CORPUS + ["unseen words: zebra quantum 🦓 ünïcödé"])
def test_detokenizer_streams_encoded_text_token_by_token(kind, text):
    tok = bpe(kind)
    ids = tok.encode(text)
    deltas = stream(tok, ids, list(range(len(ids))))
    assert "".join(deltas) == tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas)
    assert deltas[-1] == ""  # nothing was held back at the end of valid text


def test_metaspace_needs_the_context_window():
    """Decoding token by token drops the word spaces; the window keeps them."""
    tok = bpe("metaspace")
    ids = tok.encode("the lazy dog")
    assert "".join(tok.decode([i]) for i in ids) != tok.decode(ids)
    assert "".join(stream(tok, ids, list(range(len(ids))))) == tok.decode(ids) == "the lazy dog"


def test_detokenizer_holds_partial_characters():
    tok = byte_tokenizer(256)
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push([b]) for b in "a👋é".encode()]
    assert deltas == ["a", "", "", "", "👋", "", "é"]
    assert detok.flush() == ""


@settings(max_examples=CHEAP_EXAMPLES)
@given(st.text(max_size=30), st.lists(st.integers(0, 120), max_size=8))
def test_detokenizer_never_emits_partial_utf8(text, cuts):
    deltas = stream(byte_tokenizer(256), list(text.encode()), cuts)
    emitted = ""
    for d in deltas:
        emitted += d
        assert text.startswith(emitted)  # no U+FFFD where the text has a split character
    assert emitted == text


def test_detokenizer_flush_emits_an_incomplete_tail():
    tok = byte_tokenizer(256)
    detok = IncrementalDetokenizer(tok)
    assert detok.push([0x68]) == "h"
    assert detok.push([0xF0, 0x9F]) == ""
    assert detok.flush() == tok.decode([0xF0, 0x9F]) == "\ufffd"


# ------------------------------------------------------------------------------ loading
def test_load_tokenizer_reads_eos_and_bos(tmp_path):
    tok = bpe("bytelevel")
    tok.hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "</s>", "special": True}, "bos_token": "<s>", "add_bos_token": True}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 0]}))
    loaded = load_tokenizer(tmp_path)
    assert loaded.eos_token_ids == (1, 0)  # </s> from tokenizer_config, then the new ones, no repeats
    assert loaded.bos_token_id == 0 and loaded.add_bos
    ids = loaded.encode("the quick fox")
    assert ids[0] == 0 and ids[1:] == tok.encode("the quick fox")
    assert loaded.decode(ids) == "the quick fox"  # special tokens are skipped


def test_load_tokenizer_without_configs(tmp_path):
    bpe("metaspace").hf.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path)
    assert loaded.eos_token_ids == () and loaded.bos_token_id is None and not loaded.add_bos


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path)
    bpe("bytelevel").hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<missing>"}))
    with pytest.raises(ValueError, match="not in tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="not readable JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 10**6}))
    with pytest.raises(ValueError, match="outside the tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "2"}))
    with pytest.raises(ValueError, match="eos_token_id must be"):
        load_tokenizer(tmp_path)


# ------------------------------------------------------------------------------ chat templates
# What HF templates use beyond plain Jinja: loop controls, transformers' tojson (no HTML escaping),
# strftime_now, eos_token, and keywords passed through.
FEATURES_TEMPLATE = ("{%- for m in messages %}{%- if loop.index0 > 1 %}{% break %}{% endif %}"
                     "{{ m.role }}:{{ m.content | tojson }}\n{% endfor %}{{ extra | tojson }}{{ eos_token }}"
                     "{{ strftime_now('%Y') | length }}{{ tools is none }}{{ documents is none }}")
CONVERSATION = [{"role": "system", "content": "Be <brief> & exact"}, {"role": "user", "content": "héllo 👋"},
                {"role": "assistant", "content": "hi"}]


@pytest.mark.parametrize("where", ["config", "jinja"])
@pytest.mark.parametrize("source, kwargs", [(QWEN3_STYLE_TEMPLATE, {"enable_thinking": False}),
                                            (QWEN3_STYLE_TEMPLATE, {}),
                                            (FEATURES_TEMPLATE, {"extra": {"k": "<b> é"}})],
                         ids=["qwen3-no-thinking", "qwen3", "features"])
def test_chat_template_matches_transformers(tmp_path, where, source, kwargs):
    from transformers import AutoTokenizer

    tokenizer_files(tmp_path, template=where, source=source)
    ours = ChatTemplate.of_checkpoint(tmp_path, load_tokenizer(tmp_path))
    hf = AutoTokenizer.from_pretrained(tmp_path)
    for messages in (CONVERSATION[:2], CONVERSATION):
        text = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
        assert ours.render(messages, **kwargs) == text
        assert ours.encode(messages, **kwargs) == hf(text, add_special_tokens=False).input_ids
    if kwargs.get("enable_thinking") is False:
        assert ours.render(CONVERSATION[1:2], **kwargs).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_chat_template_files(tmp_path):
    tokenizer_files(tmp_path, template=None)
    assert read_chat_template(tmp_path) is None
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "config {{ 1 }}"}))
    assert read_chat_template(tmp_path) == ("config {{ 1 }}", tmp_path / "tokenizer_config.json")
    (tmp_path / "chat_template.jinja").write_text("file")  # the .jinja file wins, as in transformers
    assert read_chat_template(tmp_path) == ("file", tmp_path / "chat_template.jinja")
    (tmp_path / "chat_template.jinja").unlink()
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "plain"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": named}))
    assert read_chat_template(tmp_path)[0] == "plain"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": named[:1]}))
    with pytest.raises(ValueError, match="none named 'default'"):
        read_chat_template(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": 3}))
    with pytest.raises(ValueError, match="chat_template must be a string"):
        read_chat_template(tmp_path)


def test_chat_template_errors(tmp_path):
    tok = load_tokenizer(tokenizer_files(tmp_path))
    with pytest.raises(ValueError, match="my.jinja: not a valid Jinja chat template"):
        ChatTemplate("{% for %}", tok, "my.jinja")
    template = ChatTemplate(QWEN3_STYLE_TEMPLATE, tok)
    with pytest.raises(ChatTemplateError, match="refused the messages: unknown role tool"):
        template.render([{"role": "tool", "content": "x"}])
    for bad in ([], "hi", [{"content": "no role"}], {"role": "user", "content": "x"}):
        with pytest.raises(ChatTemplateError, match="message"):
            template.render(bad)
    sandboxed = ChatTemplate("{{ messages.__class__.__mro__ }}", tok)  # templates are data, never code
    with pytest.raises(ChatTemplateError):
        sandboxed.render([{"role": "user", "content": "x"}])


def test_chat_encoding_adds_no_special_tokens(tmp_path):
    """A template writes its own BOS; encoding the rendered text must not add a second one."""
    tok = bpe("bytelevel")
    tok.hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
         "chat_template": "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}"}))
    loaded = load_tokenizer(tmp_path)
    ids = ChatTemplate.of_checkpoint(tmp_path, loaded).encode([{"role": "user", "content": "the fox"}])
    assert ids == [0, *tok.encode("the fox"), 1]
    assert loaded.encode("the fox") == [0, *tok.encode("the fox")]  # plain text still gets add_bos_token


# ------------------------------------------------------------------------------ stop strings
def first_stop(text: str, stops: list[str]) -> str:
    """Reference: grow the text one character at a time; cut before the first stop string to
    complete (the longest of those completing at the same character)."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            return text[:end - max(map(len, done))]
    return text


def run_matcher(chunks: list[str], stops: list[str]) -> tuple[str, StopStringMatcher]:
    matcher = StopStringMatcher(stops)
    out = "".join(matcher.push(c) for c in chunks)
    return out + matcher.flush() * (not matcher.stopped), matcher


def test_stop_string_split_across_deltas():
    out, m = run_matcher(["Hello wor", "ld", "! more"], ["world"])
    assert out == "Hello " and m.matched == "world"
    out, m = run_matcher(["a", "b", "c", "d"], ["abcd"])
    assert out == "" and m.matched == "abcd"


def test_stop_string_holds_back_a_possible_start():
    m = StopStringMatcher(["</end>"])
    assert m.push("text </e") == "text "  # "</e" may still become "</end>"
    assert m.push("x") == "</ex"  # it did not
    assert m.push("tail <") == "tail "
    assert m.flush() == "<" and not m.stopped


def test_stop_string_first_to_complete_wins():
    # "bc" completes before "abcd" could, whatever the chunking.
    assert run_matcher(["abcd"], ["abcd", "bc"])[0] == "a"
    # Completing at the same character: the longer one cuts earlier.
    assert run_matcher(["xabc"], ["bc", "abc"])[0] == "x"


def test_stop_strings_after_stop_and_validation():
    m = StopStringMatcher(["."])
    assert m.push("one. two.") == "one" and m.push("three") == "" and m.flush() == ""
    assert run_matcher(["no stops ", "at all"], [])[0] == "no stops at all"
    for bad in (["ok", ""], [None], "stop"):
        with pytest.raises(ValueError, match="stop strings must be"):
            StopStringMatcher(bad)


@settings(max_examples=CHEAP_EXAMPLES)
@given(st.text(alphabet="abc.\n", max_size=30), st.lists(st.text(alphabet="abc.\n", min_size=1, max_size=4),
                                                          min_size=1, max_size=3),
       st.lists(st.integers(0, 30), max_size=6))
def test_stop_strings_independent_of_chunking(text, stops, cuts):
    bounds = [0, *sorted(c % (len(text) + 1) for c in cuts), len(text)]
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    out, m = run_matcher(chunks, stops)
    assert out == first_stop(text, stops)
    assert m.stopped == any(s in text for s in stops)
