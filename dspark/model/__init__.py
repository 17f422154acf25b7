"""DeepSeek-V4 target, its MTP module and (later) the DSpark / DFlash draft models."""

from dspark.model.target import DeepseekV4

__all__ = ["DeepseekV4"]
