"""Memory images of weight arrays: ``.mem`` for Verilog ``$readmemh`` and ``.coe`` for
Xilinx block-RAM initialisation, each with a parser so files round-trip to the same bytes.

* ``.mem``: one hexadecimal word a line, most significant digit first, ``//`` comments
  allowed; ``@ADDR`` lines (hex word address) set the load address (IEEE 1364 $readmemh).
* ``.coe``: ``memory_initialization_radix=16;`` then ``memory_initialization_vector=`` and
  the words separated by commas, ending with ``;`` (Xilinx COE syntax).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np


def _words(data: np.ndarray, word_bytes: int) -> list[int]:
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    pad = (-raw.size) % word_bytes
    rows = np.concatenate([raw, np.zeros(pad, np.uint8)]).reshape(-1, word_bytes)
    # little-endian in memory: byte 0 of a word is its least significant byte
    return [int.from_bytes(bytes(w), "little") for w in rows]


def write_mem(path: Path, data: np.ndarray, word_bytes: int = 1, comment: str = "") -> Path:
    digits = 2 * word_bytes
    lines = [f"// {line}" for line in comment.splitlines()] if comment else []
    lines.append("@0")
    lines += [f"{w:0{digits}x}" for w in _words(data, word_bytes)]
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


def read_mem(path: Path, word_bytes: int = 1) -> bytes:
    """Bytes of a ``.mem`` file (words placed at their @addresses, gaps zero)."""
    words: dict[int, int] = {}
    addr = 0
    for raw in Path(path).read_text().splitlines():
        line = raw.split("//")[0].strip()
        for tok in line.split():
            if tok.startswith("@"):
                addr = int(tok[1:], 16)
            else:
                words[addr] = int(tok.replace("_", ""), 16)
                addr += 1
    size = max(words) + 1 if words else 0
    out = bytearray()
    for a in range(size):
        out += words.get(a, 0).to_bytes(word_bytes, "little")
    return bytes(out)


def write_coe(path: Path, data: np.ndarray, word_bytes: int = 1, comment: str = "") -> Path:
    digits = 2 * word_bytes
    words = [f"{w:0{digits}x}" for w in _words(data, word_bytes)]
    head = [f"; {line}" for line in comment.splitlines()] if comment else []
    body = ",\n".join(words)
    Path(path).write_text(
        "\n".join(head + ["memory_initialization_radix=16;", "memory_initialization_vector="])
        + "\n"
        + body
        + ";\n"
    )
    return Path(path)


def read_coe(path: Path, word_bytes: int = 1) -> bytes:
    text = "\n".join(
        line.split(";", 1)[0] if line.lstrip().startswith(";") else line
        for line in Path(path).read_text().splitlines()
    )
    radix_m = re.search(r"memory_initialization_radix\s*=\s*(\d+)\s*;", text)
    vec_m = re.search(r"memory_initialization_vector\s*=\s*([^;]*);", text, re.S)
    if radix_m is None or vec_m is None:
        missing = (
            "memory_initialization_radix" if radix_m is None else "memory_initialization_vector"
        )
        raise ValueError(f"{path}: not a COE file (no {missing}=...;)")
    radix, vec = int(radix_m.group(1)), vec_m.group(1)
    out = bytearray()
    for tok in re.split(r"[,\s]+", vec.strip()):
        if tok:
            out += int(tok, radix).to_bytes(word_bytes, "little")
    return bytes(out)
