"""Text in and out: tokenizers, chat templates, incremental detokenization and stop strings.

A `Tokenizer` is an HF `tokenizers` tokenizer plus the few facts generation needs from a
checkpoint's JSON configs (eos ids, whether to prepend BOS). A `ChatTemplate` is the checkpoint's
own Jinja chat template, rendered and encoded as transformers' `apply_chat_template` does (the one
renderer: `LLM.chat`, the server and `dspark eval --bench` all use it). Output text always skips special
tokens. Streaming has two stages per request: `IncrementalDetokenizer` turns token ids into
UTF-8-safe text deltas, then `StopStringMatcher` cuts the text before the first stop string and
holds back any tail that could still become one.
"""

from __future__ import annotations

import json
from pathlib import Path
from datetime import datetime
from typing import Iterable, Sequence

import jinja2
import jinja2.sandbox
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

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens=False` leaves out the BOS / post-processor tokens
        (rendered chat templates write their own)."""
        ids = self.hf.encode(text, add_special_tokens=add_special_tokens).ids
        # tokenizer_config's add_bos_token is applied by transformers, not by tokenizer.json's
        # post-processor; honour it without doubling a BOS the post-processor already added.
        if add_special_tokens and self.add_bos and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def token_text(self, token_id: int | None) -> str:
        """The text of a special token for templates ('' for none)."""
        return (self.hf.id_to_token(token_id) or "") if token_id is not None else ""


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


# ---------------------------------------------------------------------------------- chat templates
CHAT_TEMPLATE_FILE = "chat_template.jinja"


class ChatTemplateError(ValueError):
    """Messages the template refuses (it calls raise_exception) or that are not chat messages."""


def _raise_template_error(message: str):
    raise jinja2.TemplateError(message)  # `render` turns it into a ChatTemplateError naming the template


def _tojson(value, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    # transformers' own tojson: jinja2's built-in one HTML-escapes <, >, & and ' (tool schemas would change)
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def read_chat_template(path: str | Path) -> tuple[str, Path] | None:
    """(template source, the file it came from) of checkpoint directory `path`, or None if it has none.

    As transformers: a `chat_template.jinja` file wins over tokenizer_config.json's `chat_template`,
    which is a string or a list of named templates (the one named "default" is used)."""
    path = Path(path)
    file = path / CHAT_TEMPLATE_FILE
    if file.is_file():
        try:
            return file.read_text(encoding="utf-8"), file
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{file}: not readable UTF-8 text ({e})") from None
    config = path / "tokenizer_config.json"
    template = _read_json(config).get("chat_template") if config.is_file() else None
    if template is None:
        return None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
        if template is None:
            raise ValueError(f"{config}: chat_template lists templates {sorted(map(str, named))} but none named "
                             "'default'")
    if not isinstance(template, str):
        raise ValueError(f"{config}: chat_template must be a string or a list of named templates, "
                         f"got {type(template).__name__}")
    return template, config


def no_chat_template(path: str | Path) -> str:
    """What to say when checkpoint directory `path` has no chat template: where it was looked for."""
    path = Path(path)
    return (f"{path} has no chat template (looked for {path / CHAT_TEMPLATE_FILE} and the chat_template field of "
            f"{path / 'tokenizer_config.json'})")


class ChatTemplate:
    """A Jinja chat template bound to its tokenizer, rendered as transformers' `apply_chat_template`:
    a sandboxed environment with trim_blocks / lstrip_blocks and loop controls, `raise_exception`,
    `strftime_now`, transformers' `tojson`, the tokenizer's `bos_token` / `eos_token` strings (not its
    other special tokens), `tools` / `documents` (None unless given), and any extra keyword (Qwen3's
    `enable_thinking`, ...) passed through to the template."""

    def __init__(self, source: str, tokenizer: Tokenizer, origin: str | Path = "chat template"):
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                           extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_template_error  # what HF chat templates call on bad input
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"{origin}: not a valid Jinja chat template ({e})") from None
        self.tokenizer = tokenizer
        self.origin = str(origin)
        # tokenizer_config's eos_token comes first in eos_token_ids (load_tokenizer), as transformers' eos_token
        first_eos = tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else None
        self._special = {"bos_token": tokenizer.token_text(tokenizer.bos_token_id),
                         "eos_token": tokenizer.token_text(first_eos)}

    @classmethod
    def of_checkpoint(cls, path: str | Path, tokenizer: Tokenizer) -> "ChatTemplate | None":
        found = read_chat_template(path)
        return None if found is None else cls(found[0], tokenizer, found[1])

    def render(self, messages: Sequence[dict], *, add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt text of one conversation (`messages`: dicts with a `role` and a `content` string)."""
        if isinstance(messages, (str, dict)) or not isinstance(messages, Sequence) or not messages:
            raise ChatTemplateError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got "
                                    f"{messages!r}"[:300])
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ChatTemplateError(f"message {i} must be a dict with a string 'role', got {m!r}"[:300])
        try:
            # tools / documents are None unless given, as transformers passes them (templates test `is none`)
            return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         **{"tools": None, "documents": None, **self._special, **kwargs})
        except jinja2.TemplateError as e:  # templates raise on message orders they do not allow
            raise ChatTemplateError(f"the chat template ({self.origin}) refused the messages: {e}") from None

    def encode(self, messages: Sequence[dict], **kwargs) -> list[int]:
        """Token ids of the rendered prompt: the template writes its own special tokens, so none are added
        (transformers' `apply_chat_template(tokenize=True)`)."""
        return self.tokenizer.encode(self.render(messages, **kwargs), add_special_tokens=False)


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
