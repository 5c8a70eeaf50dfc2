"""The LM head of a model run layer by layer: its weight kept as stored, widened in row chunks.

At Phi-3's 32064 x 3072 the head is 394 MB in fp32; the checkpoint holds it in bf16 (a
memory map) and the bundle as int8 codes. ``Head`` reads ``HEAD_ROWS`` vocabulary rows at a
time from a row source (``CheckpointRows``, ``ArrayRows``, or the bundle's packed rows,
``readback.QuantRows``), and ``token_groups`` batches sequences so the head is read once per
group of ``GROUP_TOKENS`` positions, not once per sequence.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ..errors import ModelError
from ..tensors import SafetensorsSource

if TYPE_CHECKING:
    from torch import nn

HEAD_ROWS = 4096  # LM-head rows (vocabulary entries) widened to fp32 at a time (50 MB at 3072)
GROUP_TOKENS = 512  # positions whose logits are computed together ((N, V) fp32: 66 MB at 32064)

WeightFn = Callable[[str], "np.ndarray | None"]
"""HF parameter name -> replacement fp32 array in HF layout ((out, in) for a projection), or
None to keep the checkpoint's tensor."""


def token_groups(lengths: Sequence[int], tokens: int = GROUP_TOKENS) -> list[list[int]]:
    """Consecutive sequence indices in groups of up to ``tokens`` positions (a longer
    sequence alone): the head's weight is read once per group, not once per sequence."""
    groups: list[list[int]] = []
    n = 0
    for j, t in enumerate(lengths):
        if groups and n + t <= tokens:
            groups[-1].append(j)
            n += t
        else:
            groups.append([j])
            n = t
    return groups


class RowSource(Protocol):
    """A (V, H) weight read a block of rows at a time: ``CheckpointRows``, ``ArrayRows``,
    ``readback.QuantRows``."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def rows(self, start: int, stop: int) -> np.ndarray:
        """fp32 rows [start, stop)."""
        ...


class CheckpointRows:
    """Rows of a checkpoint tensor, widened to fp32 on demand from the memory-mapped file."""

    def __init__(self, source: SafetensorsSource, name: str):
        self.source, self.name = source, name
        self.shape = tuple(source.info(name).shape)

    def rows(self, start: int, stop: int) -> np.ndarray:
        return self.source.array(self.name, (start, stop))


class ArrayRows:
    """Rows of an fp32 array held in memory (a weight override given as a whole array)."""

    def __init__(self, array: np.ndarray):
        self.array = np.asarray(array, np.float32)
        self.shape = self.array.shape

    def rows(self, start: int, stop: int) -> np.ndarray:
        return self.array[start:stop]


def override_rows(weights: WeightFn | None, name: str, shape: tuple[int, int]) -> RowSource | None:
    """The override of ``name`` as a row source: its packed form when the override has one
    (``BundleWeights.rows``: the int8 head stays int8 in memory), else its whole array;
    None when nothing overrides it."""
    if weights is None:
        return None
    packed = getattr(weights, "rows", None)
    src: RowSource | None = packed(name) if callable(packed) else None
    if src is None:
        w = weights(name)
        if w is None:
            return None
        src = ArrayRows(w)
    if tuple(src.shape) != tuple(shape):
        raise ModelError(
            f"weight override: tensor {name!r} has shape {list(src.shape)}, the "
            f"model needs {list(shape)} (HF layout: (out, in))"
        )
    return src


@dataclass
class Head:
    """Final norm + LM head of one stream. The head's (V, H) weight (HF layout) stays in
    its stored form (bf16 in the checkpoint's memory map, int8 codes of the bundle) and is
    widened ``HEAD_ROWS`` rows at a time: one fp32 chunk, never the 394 MB fp32 head."""

    norm: nn.Module
    weight: RowSource  # .shape (V, H); .rows(start, stop) -> fp32 (stop - start, H)

    def project(self, x):
        """(N, V) fp32 logits of (N, H) normed hidden states."""
        import torch

        v = self.weight.shape[0]
        out = torch.empty((x.shape[0], v), dtype=torch.float32)
        for a in range(0, v, HEAD_ROWS):
            b = min(v, a + HEAD_ROWS)
            w = torch.from_numpy(np.ascontiguousarray(self.weight.rows(a, b), np.float32))
            out[:, a:b] = torch.nn.functional.linear(x, w)
        return out

    def logits(self, h, last: bool = False):
        """(T, V) torch logits of one sequence's (1, T, H) final hidden states (only the last
        position's, (1, V), with ``last``)."""
        return self.project(self.norm(h[:, -1:] if last else h)[0])

    def logits_many(self, hs: Sequence) -> list:
        """(T_j, V) logits of each (1, T_j, H) hidden states, the head read once for all."""
        import torch

        x = torch.cat([self.norm(h)[0] for h in hs])
        return list(torch.split(self.project(x), [h.shape[1] for h in hs]))
