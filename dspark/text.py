"""Text in and out: tokenizers, incremental detokenization and stop strings.

A `Tokenizer` is an HF `tokenizers` tokenizer plus the few facts generation needs from a
checkpoint's JSON configs (eos ids, whether to prepend BOS). Output text always skips special
tokens. Streaming has two stages per request: `IncrementalDetokenizer` turns token ids into
UTF-8-safe text deltas, then `StopStringMatcher` cuts the text before the first stop string and
holds back any tail that could still become one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

# What a lossy UTF-8 decode puts where bytes do not (yet) form a character.
_REPLACEMENT = "\ufffd"


class Tokenizer:
    """An HF `tokenizers.Tokenizer` with the eos / bos facts of its checkpoint."""

    def __init__(self, hf: tokenizers.Tokenizer, *, eos_token_ids: Iterable[int] = (),
                 bos_token_id: int | None = None, add_bos: bool = False):
        if add_bos and bos_token_id is None:
            raise ValueError("add_bos needs a bos_token_id")
        self.hf = hf
        self.eos_token_ids = tuple(eos_token_ids)
        self.bos_token_id = bos_token_id
        self.add_bos = add_bos

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=True).ids
        # tokenizer_config's add_bos_token is applied by transformers, not by tokenizer.json's
        # post-processor; honour it without doubling a BOS the post-processor already added.
        if self.add_bos and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)


# ---------------------------------------------------------------------------------- loading
def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_id(hf: tokenizers.Tokenizer, token, source: Path) -> int:
    # tokenizer_config.json spells special tokens as a string or as an AddedToken dict.
    content = token.get("content") if isinstance(token, dict) else token
    tid = hf.token_to_id(content) if isinstance(content, str) else None
    if tid is None:
        raise ValueError(f"{source}: special token {token!r} is not in tokenizer.json's vocabulary")
    return tid


def _id_list(value, name: str, source: Path) -> list[int]:
    ids = value if isinstance(value, list) else [value]
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise ValueError(f"{source}: {name} must be a token id or a list of them, got {value!r}")
    return ids


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of checkpoint directory `path`: `tokenizer.json`, plus eos / bos facts from
    `tokenizer_config.json` and `generation_config.json` when present."""
    path = Path(path)
    file = path / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {path} (dspark reads HF `tokenizers` JSON files only)")
    try:
        hf = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust side raises a bare Exception on any parse error
        raise ValueError(f"{file}: not a valid tokenizer.json ({e})") from None

    eos: list[int] = []
    bos, add_bos = None, False
    config = path / "tokenizer_config.json"
    if config.is_file():
        data = _read_json(config)
        if data.get("eos_token") is not None:
            eos.append(_token_id(hf, data["eos_token"], config))
        if data.get("bos_token") is not None:
            bos = _token_id(hf, data["bos_token"], config)
        add_bos = bool(data.get("add_bos_token", False)) and bos is not None
    generation = path / "generation_config.json"
    if generation.is_file():
        data = _read_json(generation)
        if data.get("eos_token_id") is not None:
            eos += _id_list(data["eos_token_id"], "eos_token_id", generation)
        if bos is None and data.get("bos_token_id") is not None:
            bos = _id_list(data["bos_token_id"], "bos_token_id", generation)[0]
    vocab = hf.get_vocab_size(with_added_tokens=True)
    bad = [t for t in eos + ([bos] if bos is not None else []) if t >= vocab]
    if bad:
        raise ValueError(f"{path}: special token ids {bad} outside the tokenizer's {vocab} tokens")
    return Tokenizer(hf, eos_token_ids=dict.fromkeys(eos), bos_token_id=bos, add_bos=add_bos)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character table, the alphabet of the ByteLevel pre-tokenizer."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = 256
    for b in range(256):
        if b not in table:
            table[b] = chr(shifted)
            shifted += 1
    return table


def byte_tokenizer(vocab_size: int) -> Tokenizer:
    """Token id b < 256 is byte b of the UTF-8 text; ids 256.. are never produced by encoding and
    decode to the visible marker `<|unused_ID|>` (random-weight models emit them).

    Built as a merge-less byte-level BPE, so every text round-trips exactly.
    """
    if not isinstance(vocab_size, int) or vocab_size < 256:
        raise ValueError(f"a byte tokenizer needs vocab_size >= 256 (one id per byte), got {vocab_size!r}")
    vocab = {char: b for b, char in _bytes_to_unicode().items()}
    # Plain vocabulary entries, not added tokens: an added token would also match its text in the
    # input, which would break the exact round trip; without merges BPE can never produce these.
    vocab.update({f"<|unused_{i}|>": i for i in range(256, vocab_size)})
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    return Tokenizer(hf)


# ---------------------------------------------------------------------------------- streaming
class IncrementalDetokenizer:
    """Token ids in, text deltas out; all deltas plus `flush()` equal `tokenizer.decode(all ids)`.

    Each push decodes a short window — the ids of the last emitted delta as context, then the
    new ones — and emits what the new ids added. The context keeps decoders that treat a
    sequence's first token specially (leading-space stripping) from changing text mid-stream.
    Text ending in U+FFFD is held back: the last ids may end inside a multi-byte character. The
    hold covers the whole push, so push one id at a time for the finest-grained deltas.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # window start: context ids, already emitted
        self._read = 0  # ids before this are emitted
        self._prefix_text = ""  # decode of ids[prefix:read]

    def push(self, ids: Iterable[int]) -> str:
        self._ids.extend(ids)
        text = self._tokenizer.decode(self._ids[self._prefix:])
        if len(text) <= len(self._prefix_text) or text.endswith(_REPLACEMENT):
            return ""
        return self._advance(text)

    def flush(self) -> str:
        """Everything still held back (an incomplete character at the end decodes to U+FFFD)."""
        return self._advance(self._tokenizer.decode(self._ids[self._prefix:]))

    def _advance(self, text: str) -> str:
        delta = text[len(self._prefix_text):]
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = self._tokenizer.decode(self._ids[self._prefix:self._read])
        return delta


class StopStringMatcher:
    """Cuts streamed text before the first stop string to complete, even one split across pushes.

    `push(text)` returns the text that is safe to emit: the tail that could still grow into a
    stop string is held until the next push decides it. Of stop strings completing at the same
    character the longest wins; once one has matched (`matched`), everything else is dropped.
    """

    def __init__(self, stop_strings: Sequence[str] = ()):
        if isinstance(stop_strings, str):
            raise ValueError("stop strings must be a list of strings, not one string")
        if not isinstance(stop_strings, (list, tuple)):
            raise ValueError(f"stop strings must be a list of strings, got {stop_strings!r}")
        bad = [s for s in stop_strings if not isinstance(s, str) or not s]
        if bad:
            raise ValueError(f"stop strings must be non-empty strings, got {bad!r}")
        self.stop_strings = tuple(stop_strings)
        self.matched: str | None = None
        self._held = ""

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        buf = self._held + text
        best = None  # (end, start, stop string) of the stop string that completes first
        for s in self.stop_strings:
            start = buf.find(s)
            if start >= 0 and (best is None or (start + len(s), start) < best[:2]):
                best = (start + len(s), start, s)
        if best is not None:
            self.matched, self._held = best[2], ""
            return buf[:best[1]]
        keep = self._partial_len(buf)
        self._held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        """The held tail, once the stream has ended without completing a stop string."""
        out, self._held = self._held, ""
        return out

    def _partial_len(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of a stop string."""
        longest = max((len(s) for s in self.stop_strings), default=1)
        for k in range(min(len(buf), longest - 1), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self.stop_strings):
                return k
        return 0
