"""The nano tokenizer: deterministic and loadable, exact round trips, never trained on held-out
text; tokenizing a split."""

from __future__ import annotations

import torch

from dspark.data.corpus import read_corpus
from dspark.data.tokenizer import SPECIAL_TOKENS, _training_texts, tokenize_corpus, train_tokenizer
from dspark.text import load_tokenizer
from tests.helpers.corpora import tokenizer_corpus

ROUND_TRIP = [
    "def f(x):\r\n\treturn {'ключ': x, \"名前\": 'π≈3.14'}  # ☃ 🎉\r\n",
    "\t\t  mixed\tindent \n\n\n  trailing   ",
    "control \x00\x01\x7f and combining e\u0301 and zero\u200bwidth",
    "",
]


def test_tokenizer_deterministic_and_loadable(tmp_path):
    corpus, _, _ = tokenizer_corpus(tmp_path)
    a = train_tokenizer(corpus, tmp_path / "tok_a", vocab_size=400)
    b = train_tokenizer(corpus, tmp_path / "tok_b", vocab_size=400)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    tok = load_tokenizer(a)
    assert tok.vocab_size <= 400  # a tiny corpus runs out of pairs seen twice before 400
    assert [tok.hf.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert tok.bos_token_id == 0 and tok.eos_token_ids == (1,) and not tok.add_bos
    for text in ROUND_TRIP:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(i >= len(SPECIAL_TOKENS) for i in ids)
    assert tok.decode([0, *tok.encode("x = 1"), 1]) == "x = 1"  # specials are skipped in text


def test_heldout_never_reaches_tokenizer(tmp_path):
    corpus, held, train = tokenizer_corpus(tmp_path)
    texts = list(_training_texts(corpus, None))
    assert len(texts) == sum(1 for _ in read_corpus(corpus, "train"))
    assert not any("zqxvbnheld" in t for t in texts) and any("wrtplkjtrain" in t for t in texts)
    tok = load_tokenizer(train_tokenizer(corpus, tmp_path / "tok", vocab_size=600))
    assert len(tok.encode(" wrtplkjtrain")) == 1  # learned whole from train
    assert len(tok.encode(" zqxvbnheld")) > 3  # never seen: stays in pieces
    # A byte cap stops before the document that would cross it.
    capped = list(_training_texts(corpus, len(texts[0].encode()) + len(texts[1].encode())))
    assert capped == texts[:2]


def test_tokenize_corpus(tmp_path):
    corpus, _, _ = tokenizer_corpus(tmp_path)
    path = train_tokenizer(corpus, tmp_path / "tok", vocab_size=400)
    tok = load_tokenizer(path)
    docs = tokenize_corpus(corpus, path, "train", "prose")
    texts = {d.relpath: d.text for d in read_corpus(corpus, "train", "prose")}
    assert [r for r, _ in docs] == sorted(texts)
    for relpath, ids in docs:
        assert ids.dtype == torch.int32 and ids[-1] == 1 and (ids[:-1] != 1).all()
        assert tok.decode(ids.tolist()) == texts[relpath]
