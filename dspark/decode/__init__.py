"""The decoding engine: batched requests, draft → verify → accept → roll back, generate()."""

from dspark.decode.engine import Engine, RequestOutput
from dspark.decode.generate import GenerationResult, generate

__all__ = ["Engine", "RequestOutput", "generate", "GenerationResult"]
