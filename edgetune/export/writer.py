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
        align = PAGE_ALIGN if array.nbytes >= PAGE_ALIGN else SMALL_ALIGN
        pad = -self.offset % align
        try:
            if pad:
                self._f.write(b"\0" * pad)
            self._f.write(memoryview(array.reshape(-1).view(np.uint8)))
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EFBIG):
                raise EdgetuneError(f"{self.path}: disk full while writing {name} "
                                    f"({array.nbytes / 1e6:.1f} MB; {e.strerror})") from None
            raise
        self.offset += pad
        t = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                             dims=array.shape, data_location=onnx.TensorProto.EXTERNAL)
        for key, value in (("location", self.path.name), ("offset", str(self.offset)),
                           ("length", str(array.nbytes))):
            t.external_data.add(key=key, value=value)
        self.offset += array.nbytes
        return t

    def close(self) -> None:
        if not self._f.closed:
            try:
                self._f.close()
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EFBIG):
                    raise EdgetuneError(f"{self.path}: disk full") from None
                raise
