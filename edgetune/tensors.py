"""A Hugging Face model dir's safetensors, read one tensor at a time.

Every stage that walks a model's weights (export, merge, the parity report) reads them
through ``SafetensorsSource``: the headers of all shards are parsed and checked up front
(a missing shard, a truncated file or a tensor whose bytes run past the end of its file is
an error naming the file and the tensor, before anything is written), then each tensor is
read on request into its own array, so a stage holds one tensor, not the model.

Tensors are read with ``pread`` into fresh arrays rather than viewed through one long-lived
memory map: a map's pages stay resident in the process until it is unmapped, so walking a
7.6 GB checkpoint through a map would leave 7.6 GB of resident pages; a read buffer is freed
with the tensor. Torch-free: bf16 is widened to fp32 by a 16-bit shift.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ModelError

INDEX = "model.safetensors.index.json"

# safetensors dtype -> (numpy dtype it is stored as, bytes per element)
_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
_WRITE_CHUNK = 1 << 22  # values converted and written at a time


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: file, absolute offset, length, dtype and shape."""

    name: str
    file: Path
    dtype: str  # safetensors dtype code: F32, F16, BF16, ...
    shape: tuple[int, ...]
    offset: int  # absolute, from the start of the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check one safetensors file's header; {name: TensorInfo}."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER):
            raise ModelError(
                f"{path}: truncated or not a safetensors file (header of {n} bytes "
                f"in a {size}-byte file)"
            )
        try:
            meta = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelError(f"{path}: damaged safetensors header ({e})") from None
    if not isinstance(meta, dict):
        raise ModelError(f"{path}: damaged safetensors header (not a JSON object)")
    base = 8 + n
    out = {}
    for name, t in meta.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = (
                t["dtype"],
                tuple(int(d) for d in t["shape"]),
                t["data_offsets"],
            )
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{path}: tensor {name!r}: damaged header entry {t!r}") from None
        if dtype not in _DTYPES:
            raise ModelError(f"{path}: tensor {name!r}: dtype {dtype} is not supported")
        want = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize
        if end - start != want or start < 0:
            raise ModelError(
                f"{path}: tensor {name!r}: {end - start} bytes for shape "
                f"{list(shape)} of {dtype} ({want} expected)"
            )
        if base + end > size:
            raise ModelError(
                f"{path}: truncated: tensor {name!r} ends at byte {base + end}, the file has {size}"
            )
        out[name] = TensorInfo(name, path, dtype, shape, base + start, want)
    return out


def widen(raw: np.ndarray, dtype: str) -> np.ndarray:
    """fp32 values of a stored array (bf16 held as uint16)."""
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32, copy=False)


class SafetensorsSource:
    """The tensors of a model dir (one file, or shards named by ``model.safetensors.index.json``)."""

    def __init__(self, model_dir: str | os.PathLike):
        self.dir = Path(model_dir)
        index = self.dir / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ModelError(f"{index}: not a safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
            for f in files:
                if not (self.dir / f).is_file():
                    owner = next(k for k, v in weight_map.items() if v == f)
                    raise ModelError(
                        f"{index}: names shard {f} (e.g. for {owner}), which is missing"
                    )
        else:
            weight_map, files = None, sorted(p.name for p in self.dir.glob("*.safetensors"))
        if not files:
            raise ModelError(f"{self.dir}: no *.safetensors weights found")
        self.tensors: dict[str, TensorInfo] = {}
        for f in files:
            for name, info in read_header(self.dir / f).items():
                if name in self.tensors:
                    raise ModelError(
                        f"{self.dir / f}: tensor {name!r} also in {self.tensors[name].file.name}"
                    )
                self.tensors[name] = info
        if weight_map is not None:
            for name, f in weight_map.items():
                if name not in self.tensors or self.tensors[name].file.name != f:
                    raise ModelError(f"{index}: {name} is not in {f}")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise ModelError(f"{self.dir}: tensor {name!r} not found in the safetensors weights")
        return self.tensors[name]

    def expect(self, name: str, shape: tuple[int, ...]) -> TensorInfo:
        """The tensor's info, checked against the shape the config implies."""
        info = self.info(name)
        if info.shape != tuple(shape):
            raise ModelError(
                f"{info.file}: tensor {name!r} has shape {list(info.shape)}, "
                f"config.json implies {list(shape)}"
            )
        return info

    def raw(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The stored values (bf16 as uint16), all of them or rows [start, stop) of dim 0."""
        info = self.info(name)
        dt = np.dtype(_DTYPES[info.dtype])
        shape, offset = info.shape, info.offset
        if rows is not None:
            row = math.prod(shape[1:]) * dt.itemsize
            start, stop = rows
            shape, offset = (stop - start, *shape[1:]), offset + start * row
        out = np.empty(shape, dt)
        with open(info.file, "rb") as f:
            got = f.readinto(out.reshape(-1).view(np.uint8).data) if f.seek(offset) == offset else 0
        if got != out.nbytes:
            raise ModelError(f"{info.file}: truncated while reading tensor {name!r}")
        return out

    def array(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """fp32 values of tensor ``name`` (or of rows [start, stop) of its first dim)."""
        return widen(self.raw(name, rows), self.info(name).dtype)

    def dtype(self) -> str:
        """The checkpoint's floating dtype (of its largest tensor): F32, F16 or BF16."""
        return max(self.tensors.values(), key=lambda t: t.nbytes).dtype


def _narrow(x: np.ndarray, dtype: str) -> np.ndarray:
    """fp32 (or wider) values stored as ``dtype`` (bf16: round to nearest even, as torch does)."""
    if dtype == "BF16":
        u = np.ascontiguousarray(x, np.float32).view(np.uint32)
        rounded = u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
        out = (rounded >> np.uint32(16)).astype(np.uint16)
        nan = np.isnan(x)
        if nan.any():
            out[nan] = 0x7FC0
        return out
    return np.ascontiguousarray(x, _DTYPES[dtype])


class SafetensorsWriter:
    """Write one safetensors file tensor by tensor: the header (every name, dtype and shape)
    is known up front, so each tensor's bytes go to disk as they are made and are freed.

    >>> with SafetensorsWriter(path, [("w", "BF16", (4, 8))]) as w:
    ...     w.write("w", np.ones((4, 8), np.float32))
    Tensors must be written in the order given; ``close`` checks that all were.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        specs: Sequence[tuple[str, str, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ):
        self.path = Path(path)
        self.specs = [(n, d, tuple(int(s) for s in shape)) for n, d, shape in specs]
        header: dict = {"__metadata__": metadata or {"format": "pt"}}
        pos = 0
        for name, dtype, shape in self.specs:
            nbytes = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize
            header[name] = {
                "dtype": dtype,
                "shape": list(shape),
                "data_offsets": [pos, pos + nbytes],
            }
            pos += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # tensors start 8-byte aligned, as safetensors writes them
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, x: np.ndarray) -> None:
        """Append tensor ``name`` (any float array; converted to its declared dtype)."""
        want, dtype, shape = self.specs[self._next]
        if name != want or tuple(x.shape) != shape:
            raise ValueError(
                f"{self.path}: expected {want} {list(shape)} next, got {name} {list(x.shape)}"
            )
        flat = x.reshape(-1)
        for a in range(0, flat.size, _WRITE_CHUNK):  # converted piecewise: no full-size temporaries
            self._f.write(_narrow(flat[a : a + _WRITE_CHUNK], dtype).view(np.uint8).data)
        self._next += 1

    def close(self) -> None:
        if self._f.closed:
            return
        self._f.close()
        if self._next != len(self.specs):
            raise ValueError(f"{self.path}: {len(self.specs) - self._next} tensors not written")

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._f.close()
