"""The nano tokenizer: a byte-level BPE trained on a corpus's train split, and the corpus tokenized.

Special tokens take ids 0.. in the order given (default <|bos|> 0, <|eos|> 1, <|pad|> 2, <|mask|> 3),
the 256 byte symbols follow, then merges; every byte string is representable, so decode(encode(t))
== t for any text that does not spell a special token literally. Held-out text never reaches the
trainer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Iterator

import torch

from dspark.data.corpus import read_corpus, sample_key

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|mask|>")


def _training_texts(corpus_dir: Path, max_training_bytes: int | None) -> Iterator[str]:
    """Train-split texts in sample order (a byte cap then keeps a mix of sources, not the first
    ones alphabetically), stopping before the cap."""
    docs = sorted(read_corpus(corpus_dir, "train"), key=lambda d: sample_key(d.relpath))
    budget = math.inf if max_training_bytes is None else max_training_bytes
    for doc in docs:
        size = len(doc.text.encode("utf-8"))
        if size > budget:
            return
        budget -= size
        yield doc.text


def train_tokenizer(corpus_dir: str | Path, out_path: str | Path, vocab_size: int = 8192, *, min_frequency: int = 2,
                    special_tokens: Iterable[str] = SPECIAL_TOKENS, max_training_bytes: int | None = None,
                    progress: bool = True) -> Path:
    """Train a byte-level BPE on the train split of `corpus_dir`; writes `tokenizer.json` and
    `tokenizer_config.json` into directory `out_path` (what `dspark.text.load_tokenizer` reads).

    Special tokens get ids 0.. in the given order; the first two are bos and eos. On a small
    corpus the vocabulary can stop short of `vocab_size` (no pair left that occurs
    `min_frequency` times): size models from the loaded tokenizer's `vocab_size`.
    `max_training_bytes` caps the text fed to the trainer (whole documents, in sample order).
    """
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    special_tokens = tuple(special_tokens)
    if len(special_tokens) < 2 or len(set(special_tokens)) != len(special_tokens):
        raise ValueError(f"special_tokens must name distinct bos and eos first, got {special_tokens!r}")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(special_tokens) + len(alphabet):
        raise ValueError(f"vocab_size {vocab_size} leaves no room for {len(special_tokens)} special tokens "
                         f"and {len(alphabet)} byte symbols")
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=progress,
                                  special_tokens=list(special_tokens), initial_alphabet=alphabet)
    # NOTE: no thread pinning needed: the trainer counts words in parallel but sums the counts and
    # breaks ties between equally frequent pairs by pair, so its output does not depend on
    # scheduling (byte-identical tokenizer.json with RAYON_RS_NUM_CPUS=1 and =8, tokenizers 0.23).
    hf.train_from_iterator(_training_texts(Path(corpus_dir), max_training_bytes), trainer=trainer)

    out = Path(out_path)
    out.mkdir(parents=True, exist_ok=True)
    hf.save(str(out / "tokenizer.json"))
    bos, eos, *rest = special_tokens
    # Documents are separated by eos alone (see dspark.data.pack), so no bos is added; transformers'
    # space clean-up would break the exact round trip.
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
              "add_bos_token": False, "clean_up_tokenization_spaces": False}
    names = dict(zip(("pad_token", "mask_token"), rest))
    (out / "tokenizer_config.json").write_text(json.dumps({**config, **names}, indent=1) + "\n", encoding="utf-8")
    return out


def tokenize_corpus(corpus_dir: str | Path, tokenizer_path: str | Path, split: str,
                    domain: str | None = None) -> list[tuple[str, torch.Tensor]]:
    """(relpath, int32 token ids with eos appended) of each document of a split, in relpath order."""
    from dspark.text import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    if not tok.eos_token_ids:
        raise ValueError(f"{tokenizer_path}: the tokenizer names no eos token (needed as document separator)")
    docs = list(read_corpus(corpus_dir, split, domain))
    docs.sort(key=lambda d: d.relpath)
    prefix = [tok.bos_token_id] if tok.add_bos else []
    encoded = tok.hf.encode_batch([d.text for d in docs], add_special_tokens=False)
    return [(d.relpath, torch.tensor(prefix + e.ids + [tok.eos_token_ids[0]], dtype=torch.int32))
            for d, e in zip(docs, encoded)]
