"""Reading checkpoints: config.json, and safetensors files or sharded sets behind an index.

Only safetensors are opened (memory-mapped, one tensor at a time); nothing is ever unpickled.
`read_tensor` returns a tensor as the model wants it, dequantising FP8 / FP4 weights that carry a
`.scale` sibling (upstream DeepSeek releases).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open

from dspark.checkpoint.quant import SCALE_DTYPES, dequantize_fp4, dequantize_fp8


def config_path(path: str | Path) -> Path:
    path = Path(path)
    return (path.parent if path.is_file() else path) / "config.json"


def raw_config(path: str | Path) -> dict:
    """The config.json of a checkpoint directory (or of the directory holding a .safetensors file)."""
    file = config_path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no config.json beside the checkpoint")
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointReader:
    """Lazy read-only access to a safetensors checkpoint: a directory with `model.safetensors` or
    `model.safetensors.index.json` + shards, or one .safetensors file.

    Every file's header is checked when opened (missing shards, truncated or corrupt files and index
    entries a shard does not hold are refused, naming the file); tensors are read one at a time
    from memory-mapped files.
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        self.path = path
        self._files: dict[Path, object] = {}  # file → open safe_open handle
        self._where: dict[str, Path] = {}  # tensor name → file
        if path.is_file():
            if path.suffix != ".safetensors":
                raise ValueError(f"{path}: not a .safetensors file (pickled formats are never read)")
            self._add_file(path, None)
        elif path.is_dir():
            index, single = path / "model.safetensors.index.json", path / "model.safetensors"
            if index.is_file():
                self._read_index(index)
            elif single.is_file():
                self._add_file(single, None)
            else:
                pickled = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
                hint = f"; found {pickled}, which would need unpickling and is never read" if pickled else ""
                raise ValueError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")
        else:
            raise FileNotFoundError(f"{path}: no such checkpoint file or directory")

    def _read_index(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a safetensors index with a weight_map ({e!r})") from None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: weight_map is not a dict")
        shards: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(shard, []).append(name)
        for shard, names in shards.items():
            # A shard is named by a plain file name in the index's directory: no separators, no "..".
            # The file itself may be a symlink (the Hugging Face hub cache links snapshots into ../../blobs).
            if not isinstance(shard, str) or not shard or "/" in shard or "\\" in shard or shard in (".", ".."):
                raise ValueError(f"{index}: shard {shard!r} is not a file name inside the checkpoint directory")
            file = index.parent / shard
            if not file.is_file():
                raise ValueError(f"{index}: shard {shard if shard.isprintable() else repr(shard)} is missing (needed for {names[0]!r} and "
                                 f"{len(names) - 1} more)")
            self._add_file(file, names)

    def _add_file(self, file: Path, names: list[str] | None) -> None:
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
            held = set(handle.keys())
        except Exception as e:  # safetensors raises its own error type for corrupt headers
            raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
        absent = [n for n in names if n not in held] if names is not None else []
        if absent:
            raise ValueError(f"{file}: the index maps {listing(absent)} to this file, which does not hold them")
        self._files[file] = handle
        for name in (names if names is not None else sorted(held)):
            self._where[name] = file

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def _slice(self, name: str):
        if name not in self._where:
            raise KeyError(f"{name!r} is not in checkpoint {self.path}")
        return self._files[self._where[name]].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        code = self._slice(name).get_dtype()
        if code not in _DTYPES:
            raise ValueError(f"{name!r} in {self._where[name]} has unsupported dtype {code}")
        return _DTYPES[code]

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read into memory."""
        self._slice(name)  # raises KeyError for unknown names
        try:
            return self._files[self._where[name]].get_tensor(name)
        except Exception as e:
            raise ValueError(f"{self._where[name]}: cannot read {name!r} ({e})") from None

    def close(self) -> None:
        self._files.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def listing(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def load_state_strictly(model: torch.nn.Module, path: str | Path, *, shared: dict[str, torch.Tensor | None],
                        shared_as: str, what: str) -> None:
    """Copy the checkpoint at `path` into `model`'s state_dict (parameters and buffers) in place, casting
    to its dtypes; a tensor the checkpoint lacks comes from `shared` (name → tensor or None) if given there,
    reported as "{shared_as} {module}". Missing, unexpected, mis-shaped and non-float tensors are all
    reported by name, as "cannot load {what} {path}: ...", before anything is copied."""
    with CheckpointReader(path) as reader:
        state = model.state_dict()
        missing, misshaped, bad = [], [], []
        for name, param in state.items():
            if name in reader:
                shape, ok, source = reader.shape(name), reader.dtype(name).is_floating_point, name
            elif shared.get(name) is not None:
                shape, ok = tuple(shared[name].shape), shared[name].is_floating_point()
                source = f"{shared_as} {name.split('.')[0]}"
            else:
                missing.append(name)
                continue
            if shape != tuple(param.shape):
                misshaped.append(f"{source} {list(shape)} (needs {list(param.shape)})")
            elif not ok:
                bad.append(f"{source} is not floating point")
        unexpected = [k for k in reader.keys() if k not in state]
        errors = [f"{len(v)} {kind}: {listing(v)}" for kind, v in
                  (("missing tensors", missing), ("unexpected tensors", unexpected),
                   ("mis-shaped tensors", misshaped), ("bad tensors", bad)) if v]
        if errors:
            raise ValueError(f"cannot load {what} {path}: " + "; ".join(errors))
        with torch.no_grad():
            for name, param in state.items():
                param.copy_(reader.get(name) if name in reader else shared[name])


def scale_key(key: str) -> str | None:
    """Upstream FP8/FP4 scales hang off the projection: `x.wq_a.weight` ↔ `x.wq_a.scale`."""
    return key[: -len(".weight")] + ".scale" if key.endswith(".weight") else None


def fp8_block_of(raw_config: dict) -> tuple[int, int]:
    block = (raw_config.get("quantization_config") or {}).get("weight_block_size", (128, 128))
    return int(block[0]), int(block[1])


class Stored(NamedTuple):
    """How a checkpoint tensor is stored: 'fp8' / 'fp4' (with a scale), 'float' or 'int'."""

    kind: str
    shape: tuple[int, ...]  # logical (dequantised) shape


def describe(reader: CheckpointReader, key: str, fp8_block: tuple[int, int]) -> Stored:
    """Storage kind and logical shape from the headers alone; a bad scale raises ValueError."""
    dtype, shape = reader.dtype(key), reader.shape(key)
    scale = scale_key(key)
    if scale is None or scale not in reader:
        if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise ValueError(f"{key} is {dtype} but has no {scale}")
        return Stored("float" if dtype.is_floating_point else "int", shape)
    if len(shape) != 2:
        raise ValueError(f"{key} has a .scale sibling but is {len(shape)}-D")
    n, k = shape
    if dtype == torch.float8_e4m3fn:
        kind, want = "fp8", (math.ceil(n / fp8_block[0]), math.ceil(k / fp8_block[1]))
    elif dtype in (torch.int8, torch.uint8):
        kind, k = "fp4", 2 * k
        want = (n, math.ceil(k / 32))
    else:
        raise ValueError(f"{key} has a .scale sibling but dtype {dtype} (expected float8_e4m3fn or packed int8 FP4)")
    if reader.dtype(scale) not in SCALE_DTYPES:
        raise ValueError(f"{scale} is {reader.dtype(scale)}; scales must be one of {SCALE_DTYPES}")
    if reader.shape(scale) != want:
        raise ValueError(f"{scale} has shape {list(reader.shape(scale))}, {kind} weight {key} needs {list(want)}")
    return Stored(kind, (n, k))


def read_tensor(reader: CheckpointReader, key: str, fp8_block: tuple[int, int]) -> torch.Tensor:
    """A checkpoint tensor, dequantised to float32 when it has a `.scale` sibling."""
    t = reader.get(key)
    scale = scale_key(key)
    if scale is None or scale not in reader:
        return t
    if t.dtype == torch.float8_e4m3fn:
        return dequantize_fp8(t, reader.get(scale), fp8_block)
    return dequantize_fp4(t, reader.get(scale))


def read_sts(path: str | Path) -> torch.Tensor | None:
    """STS temperatures saved next to a draft (`sts.json`, dspark.train.calibrate), or None."""
    file = Path(path) / "sts.json"
    if not file.is_file():
        return None
    try:
        temps = json.loads(file.read_text()).get("sts_temperatures")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{file}: not a JSON object with sts_temperatures ({e})") from None
    if not isinstance(temps, list) or not temps or not all(
            isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t < float("inf") for t in temps):
        raise ValueError(f"{file}: sts_temperatures must be a list of positive numbers")
    return torch.tensor(temps, dtype=torch.float32)
