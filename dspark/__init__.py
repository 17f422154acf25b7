"""dspark: lossless speculative decoding (DSpark) for DeepSeek-V4-class models."""

__version__ = "0.1.0"
