"""dspark: lossless speculative decoding (DSpark) for DeepSeek-V4-class models."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `dspark.LLM` / `dspark.load_target` without importing torch and the model code on a bare `import dspark`.
    if name == "LLM":
        from dspark.llm import LLM

        return LLM
    if name == "load_target":
        from dspark.checkpoint import load_target

        return load_target
    raise AttributeError(f"module 'dspark' has no attribute {name!r}")
