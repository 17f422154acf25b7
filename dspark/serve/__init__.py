"""The HTTP front end over the engine: an OpenAI-compatible server (`dspark serve`).

app (FastAPI routes), worker (the engine thread around the one host loop), protocol (OpenAI request
schemas and error bodies), metrics (Prometheus text), server (uvicorn on one socket).
"""

from dspark.serve.app import ServeConfig, create_app
from dspark.serve.server import Server

__all__ = ["ServeConfig", "Server", "create_app"]
