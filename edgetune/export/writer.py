"""Initializers appended to the bundle's external data file as they are made.

Each array is written to ``model.onnx.data`` at once and only a ``TensorProto`` that
points at it (location, offset, length) stays in the graph, so the graph proto holds no
weight bytes and a tensor's memory is freed as soon as it is written. Large tensors start
on 64 KiB boundaries (the allocation granularity ONNX Runtime needs to memory-map external
data on every OS; 4 KiB pages on Linux), small ones are packed 16-byte aligned.
"""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import EdgetuneError

PAGE_ALIGN = 1 << 16
SMALL_ALIGN = 16
INLINE_BYTES = 1024  # tensors this small stay inside the proto, as onnx.save does


class ExternalDataWriter:
    """Appends arrays to one external data file; ``tensor(name, array)`` -> TensorProto."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f = open(self.path, "wb")
        self.offset = 0

    def tensor(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        array = np.ascontiguousarray(array)
        if array.nbytes <= INLINE_BYTES:
            return numpy_helper.from_array(array, name)
        return self.chunked(name, array.shape, array.dtype, [array])

    def chunked(self, name: str, shape: tuple[int, ...], dtype, chunks) -> onnx.TensorProto:
        """One tensor of ``shape`` written from ``chunks`` (arrays in C order whose bytes,
        one after another, are the tensor's), each freed once written: a table too large to
        hold in fp32 costs one chunk."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        align = PAGE_ALIGN if nbytes >= PAGE_ALIGN else SMALL_ALIGN
        pad = -self.offset % align
        written = 0
        try:
            if pad:
                self._f.write(b"\0" * pad)
            for chunk in chunks:
                chunk = np.ascontiguousarray(chunk, dtype)
                self._f.write(chunk.reshape(-1).view(np.uint8).data)
                written += chunk.nbytes
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EFBIG):
                raise EdgetuneError(
                    f"{self.path}: disk full while writing {name} "
                    f"({nbytes / 1e6:.1f} MB; {e.strerror})"
                ) from None
            raise
        if written != nbytes:
            raise EdgetuneError(
                f"{self.path}: tensor {name} got {written} bytes from its "
                f"chunks, its shape {list(shape)} needs {nbytes}"
            )
        self.offset += pad
        t = onnx.TensorProto(
            name=name,
            data_type=helper.np_dtype_to_tensor_dtype(dtype),
            dims=shape,
            data_location=onnx.TensorProto.EXTERNAL,
        )
        for key, value in (
            ("location", self.path.name),
            ("offset", str(self.offset)),
            ("length", str(nbytes)),
        ):
            t.external_data.add(key=key, value=value)
        self.offset += nbytes
        return t

    def close(self) -> None:
        if not self._f.closed:
            try:
                self._f.close()
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EFBIG):
                    raise EdgetuneError(f"{self.path}: disk full") from None
                raise
