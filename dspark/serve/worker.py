"""The engine thread: one `Driver` (dspark.decode.generate, the one host loop) fed by the HTTP front end.

Between steps the thread takes what the front end sent (new requests, aborts, stop), so requests join
and leave the running batch between rounds (continuous batching); admission into slots and KV pages is
the engine's. Each step's outputs go through the text machinery of `dspark.llm` (`TextRequest`:
detokenizer, stop strings, `Completion`) and are handed to the request's `deliver` callback, which
must not block (the app puts them on an unbounded asyncio queue): a slow reader never stalls the
engine; what it has not read is bounded by its max_tokens.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Sequence

from dspark.config import SamplingParams
from dspark.decode.engine import RequestOutput
from dspark.decode.generate import Driver
from dspark.llm import LLM, Completion, TextRequest
from dspark.serve.metrics import Metrics


@dataclass
class Admitted:
    """All of a submission's requests were queued in the engine; their ids, in choice order."""

    request_ids: list[int]


@dataclass
class Rejected:
    """The engine refused a submission (nothing of it stays queued)."""

    error: Exception


@dataclass
class Delta:
    """What one step added to one choice; `completion` is set on its last one."""

    index: int  # the choice
    text: str
    token_ids: list[int]
    logprobs: list[float]
    completion: Completion | None = None


@dataclass
class Submission:
    """One HTTP request's choices: a prompt and sampling parameters each, shared stop strings."""

    prompts: Sequence[Sequence[int]]
    params: Sequence[SamplingParams]
    stop: Sequence[str]
    logprobs: bool
    deliver: Callable[[object], None]  # called on the engine thread with Admitted | Rejected | Delta
    arrival: float = field(default_factory=time.monotonic)


@dataclass
class _Live:
    submission: Submission
    index: int
    text: TextRequest
    rounds_seen: int = 0
    last_token: float | None = None  # when its previous tokens were delivered (inter-token latency)


class Worker:
    """The engine thread of one `LLM`. `submit`, `abort` and `stop` may be called from any thread."""

    SHUTDOWN = "the server is shutting down"

    def __init__(self, llm: LLM, metrics: Metrics):
        self.llm, self.metrics = llm, metrics
        self.driver = Driver(llm.engine)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._live: dict[int, _Live] = {}
        self._stopping = False
        self.error: str | None = None  # set if the thread died
        self._thread = threading.Thread(target=self._main, name="dspark-engine", daemon=True)

    # ------------------------------------------------------------------ any thread
    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def submit(self, submission: Submission) -> None:
        if not self.alive:
            raise RuntimeError(self.SHUTDOWN if self._stopping else f"the engine thread stopped: {self.error}")
        self._inbox.put(("add", submission))

    def abort(self, request_ids: Sequence[int]) -> None:
        """End these requests at the next round (a client went away); their slots and pages return now."""
        self._inbox.put(("abort", list(request_ids)))

    def stop(self, timeout: float = 30.0) -> None:
        """Fail every request in flight with an error, then end the thread."""
        self._stopping = True
        self._inbox.put(("stop", None))
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def counts(self) -> tuple[int, int]:
        """(running, waiting) requests in the engine."""
        engine = self.llm.engine
        return engine.num_running, engine.num_waiting

    # ------------------------------------------------------------------ the engine thread
    def _main(self) -> None:
        try:
            while not self._stopping:
                self._take_commands(block=not self.driver.pending)
                if self._stopping or not self.driver.pending:
                    continue
                try:
                    outputs = self.driver.step()
                except Exception as e:  # a failed step fails what is in flight; the engine serves on
                    traceback.print_exc()
                    self._fail_all(f"engine step failed: {type(e).__name__}: {e}")
                    continue
                for out in outputs:
                    self._emit(out)
        except BaseException as e:  # never leave clients hanging on a dead thread
            self.error = f"{type(e).__name__}: {e}"
            traceback.print_exc()
            raise
        finally:
            self._stopping = True
            self._fail_all(self.SHUTDOWN if self.error is None else f"the engine thread stopped: {self.error}")
            while True:  # submissions that raced with the stop
                try:
                    kind, what = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if kind == "add":
                    self._deliver(what, Rejected(RuntimeError(self.SHUTDOWN)))

    def _take_commands(self, block: bool) -> None:
        try:
            command = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, what = command
            if kind == "stop":
                self._stopping = True
                return
            if kind == "add":
                self._add(what)
            else:
                for rid in what:
                    live = self._live.pop(rid, None)
                    if live is not None:
                        self.driver.abort(rid)
                        self.metrics.observe_finished("abort", time.monotonic() - live.submission.arrival)
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _add(self, sub: Submission) -> None:
        rids: list[int] = []
        try:
            for prompt, params in zip(sub.prompts, sub.params):
                rids.append(self.driver.add(prompt, params))
        except (ValueError, TypeError) as e:  # all or nothing: the aborted ones report at the next step, unheard
            for rid in rids:
                self.driver.abort(rid)
            self._deliver(sub, Rejected(e))
            return
        for index, rid in enumerate(rids):
            self._live[rid] = _Live(sub, index, TextRequest(self.llm.tokenizer, sub.stop, sub.logprobs))
        self.metrics.observe_admitted(sum(len(p) for p in sub.prompts))
        self._deliver(sub, Admitted(rids))

    def _emit(self, out: RequestOutput) -> None:
        live = self._live.get(out.request_id)
        if live is None:  # aborted by its client, or ended by a stop string: its abort reporting back
            return
        text = live.text
        start = len(text.token_ids)
        delta, tokens = text.feed(out)
        self.metrics.observe_rounds(out.stats, live.rounds_seen)
        live.rounds_seen = out.stats.rounds
        now = time.monotonic()
        if tokens:
            first = not start
            self.metrics.observe_tokens(len(tokens), now - live.submission.arrival if first else None,
                                        None if first or live.last_token is None else now - live.last_token)
            live.last_token = now
        done = text.completion
        if done is not None:
            del self._live[out.request_id]
            if not out.finished:
                self.driver.abort(out.request_id)  # a stop string ended it
            self.metrics.observe_finished(done.finish_reason, now - live.submission.arrival)
        self._deliver(live.submission, Delta(live.index, delta, tokens, text.logprobs[start:], done))

    def _fail_all(self, message: str) -> None:
        for rid, live in list(self._live.items()):
            self.driver.abort(rid)
            t = live.text
            done = Completion("".join(t.text), t.token_ids, t.logprobs if t.want_logprobs else None, "error", None,
                              None, message)
            self.metrics.observe_finished("error", time.monotonic() - live.submission.arrival)
            self._deliver(live.submission, Delta(live.index, "", [], [], done))
        self._live.clear()
        try:
            self.driver.close()
        except Exception:  # the engine is broken beyond an abort; the clients have their errors
            traceback.print_exc()

    @staticmethod
    def _deliver(sub: Submission, event) -> None:
        try:
            sub.deliver(event)
        except RuntimeError:  # the front end's event loop is gone (server stopped): nobody to tell
            pass
