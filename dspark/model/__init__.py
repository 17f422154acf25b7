"""Targets: DeepSeek-V4 (`DeepseekV4`) and its layers, the flat ragged batch, the paged cache, and the
`Target` protocol the engine talks to."""

from dspark.model.protocol import Target
from dspark.model.target import DeepseekV4

__all__ = ["DeepseekV4", "Target"]
