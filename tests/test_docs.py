"""The docs: generated benchmark tables up to date, README short, every relative link live.

Standard library only (no edgetune import), so this runs in well under a second.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _generator():
    path = ROOT / "tools" / "benchmarks_md.py"
    spec = importlib.util.spec_from_file_location("benchmarks_md", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _prose(path: Path) -> str:
    """A page without its fenced code blocks and inline code spans (no links live there)."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", path.read_text(encoding="utf-8")))


def _anchors(path: Path, anchor) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return {anchor(m.group(1)) for m in re.finditer(r"^#+\s+(.*?)\s*$", text, re.M)}


def test_benchmarks_md_is_generated_from_the_json():
    """A hand edit of docs/benchmarks.md (or of README.md's generated blocks), or a JSON
    changed without regenerating, fails here: run `python tools/benchmarks_md.py`."""
    assert _generator().main(["--check"]) == 0


def test_every_benchmark_table_names_its_command_and_cpu():
    for tid, t in _generator().load():
        assert t["command"].strip() and t["cpu"].strip(), tid


def test_readme_fits_two_screens():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= 200, f"README.md has {n} lines; move detail into docs/"


def test_readme_keeps_the_test_command():
    assert "make test" in (ROOT / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    anchor = _generator().anchor
    broken = []
    for target in LINK.findall(_prose(page)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, frag = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(target)
        elif frag and dest.suffix == ".md" and frag not in _anchors(dest, anchor):
            broken.append(target + " (no such heading)")
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


def test_license_is_apache_2():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert "Copyright 2026 the edgetune authors" in text
