"""Servers for the serve tests: an `LLM` behind `dspark.serve.Server` on 127.0.0.1 with a free port,
the official `openai` client pointed at it, and /metrics read back as numbers."""

from __future__ import annotations

import time

import httpx
import openai

from dspark.llm import LLM
from dspark.serve import ServeConfig, Server
from dspark.serve.metrics import parse

KEY = "sk-test"


def serve(llm: LLM, name: str = "tiny", **config) -> Server:
    """A started server for `llm` (stop it with `.stop()`)."""
    return Server(llm, ServeConfig(name, **config), host="127.0.0.1", port=0).start()


def client(server: Server, key: str | None = None, timeout: float = 60.0) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key or server.config.api_key or "none", max_retries=0,
                         timeout=timeout)


def async_client(server: Server, timeout: float = 120.0) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=server.config.api_key or "none", max_retries=0,
                              timeout=timeout)


def metrics(server: Server) -> dict[str, float]:
    return parse(httpx.get(server.url + "/metrics", timeout=10).text)


def metric(values: dict[str, float], name: str, **labels) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    total = 0.0
    for key, value in values.items():
        base, _, rest = key.partition("{")
        if base == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


def wait_idle(server: Server, timeout: float = 20.0) -> None:
    """Until the engine has no request running or waiting (aborts land at the next round)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running, waiting = server.worker.counts()
        if not running and not waiting and not server.worker.driver.pending:
            return
        time.sleep(0.02)
    raise TimeoutError("the engine did not go idle")
