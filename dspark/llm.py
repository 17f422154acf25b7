"""`LLM`: a target, its tokenizer and one `Engine`; text in, completions or text streams out.

All prompts of a call share one engine (continuous batching). Per request, token ids pass
through an `IncrementalDetokenizer` and a `StopStringMatcher` (dspark/text.py); a request whose
text hits a stop string is aborted in the engine at once.
"""

from __future__ import annotations

import sys
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from dspark import checkpoint
from dspark.config import KERNELS, ModelConfig, SamplingParams
from dspark.decode.engine import METHODS, Engine, RequestOutput
from dspark.decode.stats import RequestStats
from dspark.model import DeepseekV4
from dspark.text import IncrementalDetokenizer, StopStringMatcher, Tokenizer, byte_tokenizer, load_tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# The embedded default model (trained by `dspark train-nano`, exported here); absent in a checkout
# that has not shipped it yet.
PACKAGED = {"nano": Path(__file__).parent / "assets" / "nano"}
# Methods that need a trained draft next to the target (`<bundle>/drafts/<method>`).
DRAFT_METHODS = ("dspark", "dflash", "dflash-l1", "dspark-v4")


def default_model() -> str:
    """'nano' when its weights ship with the package, else the random 'tiny' preset."""
    return "nano" if (PACKAGED["nano"] / "target" / "config.json").exists() else "tiny"


def _model_dirs(path_or_preset) -> tuple[Path, Path | None] | None:
    """(target dir, drafts dir) of a packaged name or a directory; None for a preset name."""
    root = PACKAGED.get(str(path_or_preset), Path(path_or_preset))
    if (root / "target" / "config.json").exists():  # an exported bundle: target/ + drafts/
        return root / "target", root / "drafts"
    if root.is_dir():
        return root, root / "drafts" if (root / "drafts").is_dir() else None
    return None


@dataclass
class Completion:
    """One prompt's result. `text` never contains a stop token's or stop string's text."""

    text: str
    # every token generated, up to the one that completed a stop string; a stop token is left
    # out, so without a stop string `text == tokenizer.decode(token_ids)`
    token_ids: list[int]
    logprobs: list[float] | None  # per token of token_ids, under the target's raw distribution
    finish_reason: str  # "stop" | "length" | "abort"
    stop_reason: int | str | None  # the stop token id or stop string that ended it, if any
    stats: RequestStats | None  # the engine's counters (rounds, τ); None if it reported none


@dataclass
class Update:
    """What one engine step added to one prompt's output."""

    index: int  # position of the prompt in the call
    text: str  # new text, possibly "" (bytes of an unfinished character are held back)
    token_ids: list[int]  # new tokens, as they will appear in Completion.token_ids
    completion: Completion | None  # set on the prompt's last update


class _Request:
    """Host-side state of one prompt: its token ids, and its text as streamed so far."""

    def __init__(self, index: int, tokenizer: Tokenizer, stop_token_ids: Sequence[int],
                 stop: Sequence[str], logprobs: bool):
        self.index = index
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.matcher = StopStringMatcher(stop)
        self.stop_token_ids = frozenset(stop_token_ids)
        self.want_logprobs = logprobs
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.stats: RequestStats | None = None

    def feed(self, out: RequestOutput) -> Update:
        """Take one engine delta; the update carries a Completion when this request is done."""
        start, parts = len(self.token_ids), []
        reason, stop_reason = None, None
        self.stats = out.stats
        for token, logprob in zip(out.new_token_ids, out.new_logprobs):
            # Cut at the stop token ourselves instead of trusting where the engine cut: what
            # follows it in a delta is never part of the output.
            if token in self.stop_token_ids:
                reason, stop_reason = "stop", token
                break
            self.token_ids.append(token)
            self.logprobs.append(logprob)
            parts.append(self.matcher.push(self.detokenizer.push([token])))
            if self.matcher.stopped:
                reason, stop_reason = "stop", self.matcher.matched
                break
        else:
            if out.finished:
                reason = out.finish_reason
        if reason is not None and not self.matcher.stopped:
            parts.append(self.matcher.push(self.detokenizer.flush()))
            if self.matcher.stopped:
                reason, stop_reason = "stop", self.matcher.matched
            else:
                parts.append(self.matcher.flush())
        delta = "".join(parts)
        self.text.append(delta)
        completion = None
        if reason is not None:
            completion = Completion("".join(self.text), self.token_ids,
                                    self.logprobs if self.want_logprobs else None, reason, stop_reason, self.stats)
        return Update(self.index, delta, self.token_ids[start:], completion)


class LLM:
    """Generate text with a DeepSeek-V4 target and one decoding method.

    `path_or_preset` is a checkpoint directory (weights + tokenizer.json) or a preset name of
    `ModelConfig.preset`; a preset builds RANDOM weights with a byte tokenizer (`random_weights`
    is then True): its output is noise, useful only to see the stack run.
    """

    def __init__(self, path_or_preset: str | Path | None = None, method: str = "ar",
                 num_draft_tokens: int | None = None, dtype: str = "fp32", device: str = "cpu", max_batch: int = 8,
                 max_seq_len: int | None = None, seed: int = 0, scheduler: str = "fixed", cuda_graphs: bool = False,
                 kernels: str = "auto"):
        # Arguments are checked before a checkpoint that may take minutes is loaded.
        path_or_preset = default_model() if path_or_preset is None else path_or_preset
        if kernels not in KERNELS:
            raise ValueError(f"unknown kernels {kernels!r}; expected one of {KERNELS}")
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
        if method not in METHODS + DRAFT_METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {METHODS + DRAFT_METHODS}")
        try:
            kind = torch.device(device).type
        except RuntimeError as e:
            raise ValueError(f"bad device {device!r}: {e}") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device")
        dirs = _model_dirs(path_or_preset)
        drafter = None
        if dirs is not None:
            model_dir, drafts_dir = dirs
            self.target = checkpoint.load_target(model_dir, dtype=DTYPES[dtype], device=device, kernels=kernels)
            self.tokenizer = load_tokenizer(model_dir)
            self.random_weights = False
            if method in DRAFT_METHODS:
                drafter = self._drafter(drafts_dir, method, max_batch, max_seq_len, dtype, device, kernels)
        else:
            if method in DRAFT_METHODS:
                raise ValueError(f"method {method!r} needs a trained draft; {str(path_or_preset)!r} is a random preset")
            try:
                config = ModelConfig.preset(str(path_or_preset)).replace(kernels=kernels)
            except ValueError as e:
                raise ValueError(f"{str(path_or_preset)!r} is not a checkpoint directory, and {e}") from None
            self.target = DeepseekV4.random(config, seed=seed, dtype=DTYPES[dtype], device=device)
            self.tokenizer = byte_tokenizer(config.vocab_size)
            self.random_weights = True
            print(f"WARNING: '{path_or_preset}' is a preset with RANDOM weights (seed {seed}): the generated text is "
                  "noise.", file=sys.stderr)
        vocab = self.target.config.vocab_size
        if self.tokenizer.vocab_size > vocab:
            raise ValueError(f"the tokenizer has {self.tokenizer.vocab_size} tokens but the model only {vocab}")
        self.eos_token_ids = tuple(dict.fromkeys(self.target.config.eos_token_ids + self.tokenizer.eos_token_ids))
        self.engine = Engine(self.target, method="ar" if drafter is not None else method, drafter=drafter,
                             num_draft_tokens=num_draft_tokens, max_batch=max_batch, max_seq_len=max_seq_len,
                             scheduler=scheduler, sps="auto" if scheduler in ("hardware", "async") else None,
                             cuda_graphs=cuda_graphs)
        self.method = method
        self._busy = False

    def _drafter(self, drafts_dir: Path | None, method: str, max_batch: int, max_seq_len: int | None, dtype: str,
                 device: str, kernels: str):
        from dspark.decode.block import DSparkDrafter

        path = None if drafts_dir is None else drafts_dir / method
        if path is None or not (path / "config.json").exists():
            raise ValueError(f"no trained {method!r} draft next to the model (looked for {path})")
        draft = checkpoint.load_draft(path, self.target, dtype=DTYPES[dtype], device=device, kernels=kernels)
        length = max_seq_len or min(self.target.config.max_position_embeddings, 4096)
        return DSparkDrafter(draft.eval(), max_batch=max_batch, max_seq_len=length, name=method)

    # ------------------------------------------------------------------------------ public
    def generate(self, texts: str | Sequence[str], *, max_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop: Sequence[str] | None = None,
                 stop_token_ids: Sequence[int] | None = None, logprobs: bool = False) -> list[Completion]:
        """One Completion per prompt, in order. Generation stops at the model's eos tokens, at
        `stop_token_ids` and before any of the `stop` strings; prompt i samples with seed + i."""
        completions: dict[int, Completion] = {}
        for update in self.updates(texts, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                   seed=seed, stop=stop, stop_token_ids=stop_token_ids, logprobs=logprobs):
            if update.completion is not None:
                completions[update.index] = update.completion
        return [completions[i] for i in range(len(completions))]

    def stream(self, text: str, **kwargs) -> Iterator[str]:
        """Text deltas of one prompt as they are generated (same keywords as `generate`).
        Closing the iterator early aborts the request."""
        if not isinstance(text, str):
            raise ValueError("stream() takes one prompt string; use generate() for several")
        return self._texts(self.updates(text, **kwargs))

    def updates(self, texts: str | Sequence[str], *, max_tokens: int = 64, temperature: float = 0.0,
                top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop: Sequence[str] | None = None,
                stop_token_ids: Sequence[int] | None = None, logprobs: bool = False) -> Iterator[Update]:
        """Per-step updates of every prompt (what `generate` and `stream` are built on).

        Arguments are checked now; requests enter the engine on the first `next()`.
        """
        prompts = self._encode(texts)
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        user_stops = list(stop_token_ids or ())
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in user_stops):
            raise ValueError(f"stop_token_ids must be integers, got {user_stops!r}")
        stop_ids = tuple(dict.fromkeys([*self.eos_token_ids, *user_stops]))
        params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                                 seed=None if seed is None else seed + i, stop_token_ids=stop_ids,
                                 max_tokens=max_tokens) for i in range(len(prompts))]
        for p in params:
            p.validate(self.target.config.vocab_size)
        # Checks the stop strings now rather than on the first next().
        stop = StopStringMatcher(stop or ()).stop_strings
        return self._run(prompts, params, stop, logprobs)

    # ------------------------------------------------------------------------------ internals
    @staticmethod
    def _texts(updates: Iterator[Update]) -> Iterator[str]:
        with closing(updates):  # closing the text stream early closes (aborts) the request too
            for update in updates:
                if update.text:
                    yield update.text

    def _encode(self, texts: str | Sequence[str]) -> list[list[int]]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("no prompts given")
        prompts = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"prompt {i} is a {type(text).__name__}, not a string")
            if not text:
                raise ValueError(f"prompt {i} is empty")
            ids = self.tokenizer.encode(text)
            if not ids:
                raise ValueError(f"prompt {i} encodes to no tokens")
            prompts.append(ids)
        return prompts

    def _run(self, prompts: list[list[int]], params: list[SamplingParams], stop: Sequence[str],
             logprobs: bool) -> Iterator[Update]:
        # One call at a time: a second caller's engine outputs would otherwise land here.
        if self._busy:
            raise RuntimeError("this LLM is still running another generate/stream; finish or close it first")
        self._busy = True
        running: dict[int, _Request] = {}
        try:
            for i, (ids, p) in enumerate(zip(prompts, params)):
                running[self.engine.add_request(ids, p)] = _Request(i, self.tokenizer, p.stop_token_ids, stop,
                                                                    logprobs)
            while running:
                outputs = self.engine.step()
                if not outputs and not self.engine.has_unfinished():
                    raise RuntimeError(f"the engine stopped without finishing requests {sorted(running)}")
                for out in outputs:
                    req = running.get(out.request_id)
                    if req is None:
                        continue  # an earlier call's aborted request reporting its end
                    update = req.feed(out)
                    if update.completion is not None:
                        del running[out.request_id]
                        if not out.finished:
                            self.engine.abort(out.request_id)  # a stop string ended it
                    yield update
        finally:
            # Reached on errors and when the caller closes the iterator early.
            for rid in running:
                self.engine.abort(rid)
            self._busy = False
