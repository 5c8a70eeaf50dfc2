"""The bundle: what ships to a device. Manifest, hashes, atomic writes, verification.

Torch-free: the runtime imports this to verify a bundle before loading it.
``edgetune.json`` records the format version, architecture and its
hyper-parameters, the quantization spec, tokenizer and chat template, every
file with its SHA-256 and size, and the export report's summary.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from .errors import BundleError

MANIFEST = "edgetune.json"
FORMAT_VERSION = 1
REQUIRED = ("format_version", "architecture", "quantization", "files", "decoder", "tokenizer")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_table(root: Path) -> dict[str, dict]:
    """{relative path: {sha256, bytes}} for every file under ``root`` except the manifest."""
    table = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            table[p.relative_to(root).as_posix()] = {
                "sha256": sha256_file(p),
                "bytes": p.stat().st_size,
            }
    return table


def read_json(path: Path, error: type[Exception]):
    """Parse a JSON file; a malformed one raises ``error`` naming the file."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None


def write_manifest(root: Path, info: dict) -> Path:
    """Write ``edgetune.json`` with ``info`` plus the file table of everything in ``root``."""
    manifest = {"format_version": FORMAT_VERSION, **info, "files": file_table(root)}
    path = root / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def read_manifest(root: str | os.PathLike) -> dict:
    root = Path(root)
    if not root.is_dir():
        raise BundleError(f"{root}: bundle directory not found")
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(f"{path}: missing (not an edgetune bundle)")
    manifest = read_json(path, BundleError)
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise BundleError(f"{path}: manifest lacks field(s) {', '.join(missing)}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise BundleError(
            f"{path}: format_version {manifest['format_version']} is not supported "
            f"(this edgetune reads {FORMAT_VERSION})"
        )
    return manifest


def verify(root: str | os.PathLike) -> dict:
    """Check structure and every file's size and SHA-256; name the first damaged file."""
    root = Path(root)
    manifest = read_manifest(root)
    for rel, entry in manifest["files"].items():
        p = root / rel
        if not p.is_file():
            raise BundleError(f"{p}: listed in {MANIFEST} but missing")
        if p.stat().st_size != entry["bytes"]:
            raise BundleError(
                f"{p}: damaged (size {p.stat().st_size}, manifest says {entry['bytes']})"
            )
        if sha256_file(p) != entry["sha256"]:
            raise BundleError(f"{p}: damaged (SHA-256 does not match {MANIFEST})")
    for rel in (manifest["decoder"]["filename"], "tokenizer.json"):
        if rel not in manifest["files"]:
            raise BundleError(f"{root / MANIFEST}: does not list required file {rel}")
    return manifest


def commit_dir(tmp: Path, out: Path) -> Path:
    """Move a completed temporary dir into place, replacing ``out`` only at the very end."""
    old = out.parent / f".{out.name}.old"
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def dir_bytes(path: str | os.PathLike) -> int:
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
