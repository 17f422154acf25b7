"""`LLM`: a target, its tokenizer, its chat template and one `Engine`; text or chat messages in,
completions or text streams out.

All prompts of a call share one engine (continuous batching) driven by the one host loop
(`dspark.decode.run`). Per request, token ids pass through an `IncrementalDetokenizer` and a
`StopStringMatcher` (dspark/text.py); a request whose text hits a stop string is aborted in the
engine at once. Stop tokens are the engine's: it finishes a request at one and says which
(`RequestOutput.stop_token`); the text leaves it out.
"""

from __future__ import annotations

import sys
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from dspark import checkpoint
from dspark.config import KERNELS, EngineConfig, ModelConfig, SamplingParams
from dspark.decode import methods
from dspark.decode.methods import draft_method
from dspark.decode.engine import Engine, RequestOutput
from dspark.decode.generate import run
from dspark.decode.schedule import SCHEDULERS
from dspark.decode.sps import engine_sps
from dspark.decode.stats import RequestStats
from dspark.model import DeepseekV4
from dspark.text import (ChatTemplate, IncrementalDetokenizer, StopStringMatcher, Tokenizer, byte_tokenizer,
                         load_tokenizer, no_chat_template)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# The embedded default model (trained by `dspark train-nano`, exported here); absent in a checkout
# that has not shipped it yet.
PACKAGED = {"nano": Path(__file__).parent / "assets" / "nano"}


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


def _check_draft(draft, path: Path, method: str | None) -> str:
    """The method to run `draft` with: `method`, or the draft's own when None. A draft read (from its
    config.json) as another method's is refused, except DFlash for DFlash + L1: a config cannot tell
    those apart (the same architecture, trained with another loss)."""
    own = draft_method(draft)
    if method is None or own == method or {own, method} <= {"dflash", "dflash-l1"}:
        return method or own
    raise ValueError(f"{path} holds a draft for method {own!r} (read from its config.json), not for {method!r}: "
                     f"pass method={own!r} or a {method} draft")


@dataclass
class Completion:
    """One prompt's result. `text` never contains a stop token's or stop string's text."""

    text: str
    # every token generated, up to the one that completed a stop string; a stop token is left
    # out, so without a stop string `text == tokenizer.decode(token_ids)`
    token_ids: list[int]
    logprobs: list[float] | None  # per token of token_ids, under the target's raw distribution
    finish_reason: str  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None  # the stop token id or stop string that ended it, if any
    stats: RequestStats | None  # the engine's counters (rounds, τ); None if it reported none
    error: str | None = None  # what went wrong when finish_reason is "error" (e.g. NaN logits)


# on_text(prompt index, new text, new token ids): what one step added to one prompt's output
TextCallback = Callable[[int, str, list[int]], None]


class TextRequest:
    """Host-side text state of one prompt: detokenizer, stop strings, the completion so far."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str], logprobs: bool):
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.matcher = StopStringMatcher(stop)
        self.want_logprobs = logprobs
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.completion: Completion | None = None

    def feed(self, out: RequestOutput) -> tuple[str, list[int]]:
        """Take one engine delta → (new text, new token ids); sets `completion` when this request is done."""
        start, parts = len(self.token_ids), []
        reason, stop_reason = (out.finish_reason, out.stop_token) if out.finished else (None, None)
        # A stop token ends the request and is left out of the text (the engine emits it last).
        new = out.new_token_ids[:-1] if out.stop_token is not None else out.new_token_ids
        for token, logprob in zip(new, out.new_logprobs):
            self.token_ids.append(token)
            self.logprobs.append(logprob)
            parts.append(self.matcher.push(self.detokenizer.push([token])))
            if self.matcher.stopped:
                reason, stop_reason = "stop", self.matcher.matched
                break
        if reason is not None and not self.matcher.stopped:
            parts.append(self.matcher.push(self.detokenizer.flush()))
            if self.matcher.stopped:
                reason, stop_reason = "stop", self.matcher.matched
            else:
                parts.append(self.matcher.flush())
        delta = "".join(parts)
        self.text.append(delta)
        if reason is not None:
            self.completion = Completion("".join(self.text), self.token_ids,
                                         self.logprobs if self.want_logprobs else None, reason, stop_reason, out.stats,
                                         out.error)
        return delta, self.token_ids[start:]


class LLM:
    """Generate text with a target (DeepSeek-V4 or a dense HF family: `dspark.checkpoint.load_target`) and
    one decoding method (dspark.decode.methods).

    `path_or_preset` is a checkpoint directory (weights + tokenizer.json, and for `chat` a chat template:
    chat_template.jinja or tokenizer_config.json's; an exported bundle holds `target/` and
    `drafts/<method>/`) or a preset name of `ModelConfig.preset`; a preset builds
    RANDOM weights with a byte tokenizer (`random_weights` is then True): its output is noise,
    useful only to see the stack run. `draft` is a draft checkpoint directory for the methods that need
    one (dspark, dflash, eagle3, ...; default: the bundle's `drafts/<method>`). `method` defaults to
    the draft's own (read from its config.json by `dspark.checkpoint.load_draft`), else `ar`. The
    hardware and async schedulers profile the target's verify speed first (cached; see `dspark sps`).
    """

    def __init__(self, path_or_preset: str | Path | None = None, method: str | None = None, *,
                 draft: str | Path | None = None,
                 num_draft_tokens: int | None = None, dtype: str = "fp32", device: str = "cpu", max_batch: int = 8,
                 max_seq_len: int | None = None, seed: int = 0, scheduler: str = "fixed", cuda_graphs: bool = False,
                 compile: bool | None = False, kernels: str = "auto"):
        # Arguments are checked before a checkpoint that may take minutes is loaded.
        path_or_preset = default_model() if path_or_preset is None else path_or_preset
        if kernels not in KERNELS:
            raise ValueError(f"unknown kernels {kernels!r}; expected one of {KERNELS}")
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
        if method is None and draft is None:
            method = "ar"
        spec = None if method is None else methods.get(method)  # None: the draft's own, once it is loaded
        if draft is not None and spec is not None and not spec.needs_draft:
            raise ValueError(f"method {method!r} takes no trained draft, but draft={str(draft)!r} was given")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; expected one of {SCHEDULERS}")
        config = EngineConfig(max_batch=max_batch, max_seq_len=max_seq_len, num_draft_tokens=num_draft_tokens,
                              scheduler=scheduler, cuda_graphs=cuda_graphs, compile=compile)
        try:
            kind = torch.device(device).type
        except RuntimeError as e:
            raise ValueError(f"bad device {device!r}: {e}") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device")
        dirs = _model_dirs(path_or_preset)
        draft_model = None
        if dirs is not None:
            model_dir, drafts_dir = dirs
            self.target = checkpoint.load_target(model_dir, dtype=DTYPES[dtype], device=device, kernels=kernels)
            self.tokenizer = load_tokenizer(model_dir)
            self.chat_template = ChatTemplate.of_checkpoint(model_dir, self.tokenizer)
            self._no_template = no_chat_template(model_dir)
            self.random_weights = False
            if spec is None or spec.needs_draft:
                draft_dir = Path(draft) if draft is not None else (
                    drafts_dir / method if drafts_dir is not None else None)
                if draft_dir is None or not (draft_dir / "config.json").exists():
                    where = draft_dir if draft_dir is not None else f"{model_dir}/drafts/{method} (no drafts/ folder)"
                    what = f"method {method!r} needs a trained draft" if method else "draft must be a draft checkpoint"
                    raise ValueError(f"{what}: none at {where} (pass draft=DIR)")
                draft_model = checkpoint.load_draft(draft_dir, self.target, dtype=DTYPES[dtype], device=device,
                                                    kernels=kernels)
                method = _check_draft(draft_model, draft_dir, method)
                spec = methods.get(method)
        else:
            if spec is None or spec.needs_draft:
                raise ValueError(f"{str(path_or_preset)!r} is a random preset: it has no trained draft"
                                 + (f" for method {method!r}" if method else ""))
            try:
                model_config = ModelConfig.preset(str(path_or_preset)).replace(kernels=kernels)
            except ValueError as e:
                raise ValueError(f"{str(path_or_preset)!r} is not a checkpoint directory, and {e}") from None
            self.target = DeepseekV4.random(model_config, seed=seed, dtype=DTYPES[dtype], device=device)
            self.tokenizer = byte_tokenizer(model_config.vocab_size)
            self.chat_template = None
            self._no_template = f"{str(path_or_preset)!r} is a random-weight preset: it has no chat template"
            self.random_weights = True
            print(f"WARNING: '{path_or_preset}' is a preset with RANDOM weights (seed {seed}): the generated text is "
                  "noise.", file=sys.stderr)
        vocab = self.target.config.vocab_size
        if self.tokenizer.vocab_size > vocab:
            raise ValueError(f"the tokenizer has {self.tokenizer.vocab_size} tokens but the model only {vocab}")
        self.eos_token_ids = tuple(dict.fromkeys(self.target.config.eos_token_ids + self.tokenizer.eos_token_ids))
        if scheduler in ("hardware", "async"):
            gamma, _ = spec.draft_tokens(draft_model, num_draft_tokens)
            config = config.replace(sps=engine_sps(self.target, max_batch, gamma))
        self.engine = Engine(self.target, method, draft=draft_model, config=config)
        self.method = method
        self._busy = False

    # ------------------------------------------------------------------------------ public
    def generate(self, texts: str | Sequence[str], *, max_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop: Sequence[str] | None = None,
                 stop_token_ids: Sequence[int] | None = None, logprobs: bool = False,
                 on_text: TextCallback | None = None) -> list[Completion]:
        """One Completion per prompt, in order. Generation stops at the model's eos tokens, at
        `stop_token_ids` and before any of the `stop` strings; prompt i samples with seed + i.
        `on_text(index, text, token_ids)` sees what each step added to each prompt (streaming, progress)."""
        return self.generate_ids(self._encode(texts), max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                                 top_p=top_p, seed=seed, stop=stop, stop_token_ids=stop_token_ids, logprobs=logprobs,
                                 on_text=on_text)

    def stream(self, text: str, **kwargs) -> Iterator[str]:
        """Text deltas of one prompt as they are generated (same keywords as `generate`).
        Closing the iterator early aborts the request."""
        if not isinstance(text, str):
            raise ValueError("stream() takes one prompt string; use generate() for several")
        requests = self._start(self._encode(text), **kwargs)

        def deltas():
            with closing(requests):  # closing the text stream early closes (aborts) the request too
                for _, delta, _ in requests:
                    if delta:
                        yield delta

        return deltas()

    def chat(self, messages: Sequence[dict] | Sequence[Sequence[dict]], *, enable_thinking: bool | None = None,
             chat_template_kwargs: dict | None = None, **sampling) -> list[Completion]:
        """One Completion per conversation: `messages` is one conversation (a list of {"role", "content"}
        dicts) or a list of them. Each is rendered with the checkpoint's own chat template (generation
        prompt added; `enable_thinking` and `chat_template_kwargs` go to the template, e.g. Qwen3's
        thinking switch) and generated like `generate` (same sampling keywords)."""
        return self.generate_ids(self.chat_prompts(messages, enable_thinking=enable_thinking,
                                                   chat_template_kwargs=chat_template_kwargs), **sampling)

    def chat_prompts(self, messages: Sequence[dict] | Sequence[Sequence[dict]], *, enable_thinking: bool | None = None,
                     chat_template_kwargs: dict | None = None) -> list[list[int]]:
        """The token ids `chat` generates from: one list per conversation."""
        if self.chat_template is None:
            raise ValueError(self._no_template)
        if isinstance(messages, Sequence) and messages and isinstance(messages[0], dict):
            messages = [messages]  # one conversation
        if isinstance(messages, (str, dict)) or not isinstance(messages, Sequence) or not messages:
            raise ValueError(f"messages must be a conversation (a list of role/content dicts) or a list of "
                             f"them, got {messages!r}"[:300])
        kwargs = dict(chat_template_kwargs or {})
        if enable_thinking is not None:
            kwargs["enable_thinking"] = enable_thinking
        prompts = [self.chat_template.encode(conversation, **kwargs) for conversation in messages]
        for i, ids in enumerate(prompts):
            if not ids:
                raise ValueError(f"conversation {i} renders to no tokens")
        return prompts

    def generate_ids(self, prompts: Sequence[Sequence[int]], *, on_text: TextCallback | None = None,
                     **sampling) -> list[Completion]:
        """`generate` from prompts given as token ids (e.g. `chat_prompts`)."""
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
            raise ValueError("prompts must be a non-empty list of token-id lists")
        requests = self._start([list(p) for p in prompts], **sampling)
        for index, delta, tokens in requests:
            if on_text is not None:
                on_text(index, delta, tokens)
        return [r.completion for r in requests.texts]

    # ------------------------------------------------------------------------------ internals
    def _start(self, prompts: list[list[int]], *, max_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int | None = None, stop: Sequence[str] | None = None,
               stop_token_ids: Sequence[int] | None = None, logprobs: bool = False) -> "_Requests":
        """Check and admit every prompt (token ids) now (bad input raises here); iterate to run them."""
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if stop_token_ids is not None and not isinstance(stop_token_ids, (list, tuple)):
            raise ValueError(f"stop_token_ids must be a list of integers, got {stop_token_ids!r}")
        stop_ids = tuple(dict.fromkeys([*self.eos_token_ids, *(stop_token_ids or ())]))
        params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                                 seed=None if seed is None else seed + i, stop_token_ids=stop_ids,
                                 max_tokens=max_tokens) for i in range(len(prompts))]
        matcher_stops = StopStringMatcher(stop or ()).stop_strings  # checks the stop strings now
        # One call at a time: a second caller's requests would share the engine's steps.
        if self._busy:
            raise RuntimeError("this LLM is still running another generate/stream; finish or close it first")
        steps = run(self.engine, prompts, params)
        self._busy = True
        return _Requests(self, steps, [TextRequest(self.tokenizer, matcher_stops, logprobs) for _ in prompts])

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


class _Requests:
    """One call's prompts in flight: iterating yields (prompt index, new text, new token ids) per
    request per step; a request that hits a stop string is aborted in the engine at once."""

    def __init__(self, llm: LLM, steps, texts: list[TextRequest]):
        self.llm, self.steps, self.texts = llm, steps, texts
        self._it = self._run()

    def __iter__(self):
        return self._it

    def close(self) -> None:
        self._it.close()

    def _run(self):
        index_of = {rid: i for i, rid in enumerate(self.steps.request_ids)}
        try:
            for outputs in self.steps:
                for out in outputs:
                    index = index_of[out.request_id]
                    req = self.texts[index]
                    if req.completion is not None:
                        continue  # ended by a stop string; its abort reporting back
                    delta, tokens = req.feed(out)
                    if req.completion is not None and not out.finished:
                        self.llm.engine.abort(out.request_id)  # a stop string ended it
                    yield index, delta, tokens
        finally:
            self.steps.close()
            self.llm._busy = False
