"""The safetensors files of a model directory: which they are and what they hold.

`weight_files` resolves the single file, the sorted `*.safetensors`, or the
shards model.safetensors.index.json lists. `scan` reads only their headers
(name, shape, dtype of every tensor), so a truncated or corrupt file, an index
entry its shard lacks, or a tensor stored twice is found, and named, before a
single weight is read or any memory allocated. `read_tensors` then reads the
chosen tensors, still naming the file if reading fails.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from dendrite.model.errors import MissingFileError, ModelLoadError
from dendrite.model.jsonfile import read_json_object

__all__ = [
    "CASTABLE_DTYPES",
    "INDEX_FILE",
    "TensorInfo",
    "describe_files",
    "read_tensors",
    "scan",
    "weight_files",
]

INDEX_FILE = "model.safetensors.index.json"
#: safetensors dtypes a float weight may be cast from. Integers (quantized
#: packs), bools and complex numbers would "cast" into garbage, and 8-bit
#: floats need scales this loader does not apply.
CASTABLE_DTYPES = ("F32", "F16", "BF16", "F64")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry: where it is, its shape and safetensors dtype."""

    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors' spelling: F32, BF16, I32, ...


def _weight_map(d: Path) -> dict[str, Path]:
    """tensor -> shard path from the index, its shards checked to exist."""
    index = d / INDEX_FILE
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelLoadError(f"{index}: no weight_map object (tensor name -> shard file)")
    bad = [k for k, v in weight_map.items() if not isinstance(v, str) or not v]
    if bad:
        raise ModelLoadError(f"{index}: weight_map entry {bad[0]!r} does not name a file")
    shards = {f: d / f for f in dict.fromkeys(weight_map.values())}
    missing = [f for f, p in shards.items() if not p.is_file()]
    if missing:
        raise MissingFileError(
            f"{index} names shard(s) missing from {d}: {', '.join(missing)}"
        )
    return {name: shards[f] for name, f in weight_map.items()}


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files holding the weights, each checked to exist."""
    d = Path(model_dir)
    if (d / INDEX_FILE).is_file():
        return list(dict.fromkeys(_weight_map(d).values()))
    files = sorted(p for p in d.glob("*.safetensors") if p.is_file())
    if not files:
        other = sorted(
            p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf")
        )
        hint = f" (found {', '.join(other)}: only safetensors is supported)" if other else ""
        raise MissingFileError(f"no *.safetensors weights in {d}{hint}")
    return files


def describe_files(files: list[Path], shown: int = 4) -> str:
    """'a.safetensors, b.safetensors (+3 more)': a file set for a message."""
    names = [f.name for f in files]
    more = f" (+{len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _open(path: Path):  # -> safetensors safe_open handle
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except SafetensorError as e:
        # "incomplete metadata, file not fully covered" is the usual truncated download.
        raise ModelLoadError(f"{path}: not a valid safetensors file: {e}") from None
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read: {e.strerror or e}") from None


def scan(model_dir: Path, files: list[Path]) -> dict[str, TensorInfo]:
    """Every tensor's header entry across `files`; raises ModelLoadError naming the
    file for a corrupt header, a tensor in two files, or one the index misplaces."""
    found: dict[str, TensorInfo] = {}
    for path in files:
        with _open(path) as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                if name in found:
                    raise ModelLoadError(
                        f"tensor {name} is stored twice: in {found[name].file} and {path}"
                    )
                s = f.get_slice(name)
                found[name] = TensorInfo(name, path, tuple(s.get_shape()), s.get_dtype())
    d = Path(model_dir)
    if (d / INDEX_FILE).is_file():
        for name, shard in _weight_map(d).items():
            info = found.get(name)
            if info is None or info.file != shard:
                where = f"it is in {info.file.name}" if info else "no shard has it"
                raise ModelLoadError(
                    f"{d / INDEX_FILE} puts tensor {name} in {shard.name}, but {where}"
                )
    return found


def read_tensors(infos: Iterable[TensorInfo]) -> Iterator[tuple[TensorInfo, torch.Tensor]]:
    """(info, CPU tensor) for each of `infos`, memory-mapped, one file open at a time."""
    by_file: dict[Path, list[TensorInfo]] = {}
    for info in infos:
        by_file.setdefault(info.file, []).append(info)
    from safetensors import SafetensorError

    for path, group in by_file.items():
        with _open(path) as f:
            for info in group:
                try:
                    tensor = f.get_tensor(info.name)
                except (SafetensorError, OSError) as e:
                    raise ModelLoadError(
                        f"{path}: cannot read tensor {info.name}: {e}"
                    ) from None
                yield info, tensor
