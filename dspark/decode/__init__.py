"""The decoding engine: the method registry, batched requests, draft → schedule → verify → accept →
roll back, and the one host loop (`run`) that `generate()` and every other caller use."""

from dspark.config import EngineConfig
from dspark.decode.engine import Engine, RequestOutput
from dspark.decode.generate import Driver, GenerationResult, collect, generate, run
from dspark.decode.methods import METHODS

__all__ = ["METHODS", "Driver", "Engine", "EngineConfig", "GenerationResult", "RequestOutput", "collect", "generate",
           "run"]
