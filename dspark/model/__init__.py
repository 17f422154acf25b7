"""Targets: DeepSeek-V4 (`DeepseekV4`) and its layers, dense HF decoders (`DenseTarget`: Qwen3, Llama-3,
Gemma 4 text), the flat ragged batch, the paged cache, and the
`Target` protocol the engine talks to."""

from dspark.model.dense import DenseTarget
from dspark.model.protocol import Target
from dspark.model.target import DeepseekV4

__all__ = ["DeepseekV4", "DenseTarget", "Target"]
