"""`Server`: an `LLM`, its engine thread and the FastAPI app under uvicorn, on one listening socket.

`serve_forever()` is `dspark serve`; `start()` / `stop()` run it on a background thread (tests, the
benchmark). Stopping first fails the requests in flight with an error (streams get an error event,
others a 503), then lets uvicorn close the connections: a stopped server never leaves a client hanging.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import uvicorn

from dspark.llm import LLM
from dspark.serve.app import ServeConfig, create_app
from dspark.serve.metrics import Metrics
from dspark.serve.worker import Worker


class _Uvicorn(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, worker: Worker):
        super().__init__(config)
        self.worker = worker

    async def shutdown(self, sockets=None) -> None:
        await asyncio.to_thread(self.worker.stop)  # in-flight requests get their errors before connections close
        await super().shutdown(sockets)


class Server:
    """Serve `llm` over HTTP at host:port (port 0: a free one, see `.port`)."""

    def __init__(self, llm: LLM, config: ServeConfig, host: str = "127.0.0.1", port: int = 8000,
                 log_level: str = "warning"):
        self.llm, self.config, self.host = llm, config, host
        self.metrics = Metrics(config.model_name, llm.method)
        self.worker = Worker(llm, self.metrics)
        self.app = create_app(llm, self.worker, self.metrics, config)
        self.socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.port = self.socket.getsockname()[1]
        self._uvicorn = _Uvicorn(uvicorn.Config(self.app, log_level=log_level, http="h11", loop="asyncio",
                                                lifespan="off", timeout_graceful_shutdown=10), self.worker)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def serve_forever(self) -> None:
        """Serve until interrupted (Ctrl-C / SIGTERM)."""
        self.worker.start()
        try:
            self._uvicorn.run(sockets=[self.socket])
        finally:
            self.worker.stop()

    def start(self, timeout: float = 30.0) -> "Server":
        """Serve on a background thread; returns once the server accepts connections."""
        self.worker.start()
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [self.socket]},
                                        name="dspark-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Fail what is in flight, close the connections, end both threads."""
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self.worker.stop()

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
