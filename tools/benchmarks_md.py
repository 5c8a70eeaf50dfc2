"""Write docs/benchmarks.md (and README.md's generated blocks) from docs/benchmarks/*.json.

    python tools/benchmarks_md.py           # rewrite docs/benchmarks.md and README.md's blocks
    python tools/benchmarks_md.py --check   # exit 1 if either is not what the JSON gives

Each ``docs/benchmarks/NN-name.json`` is one measured table, rendered in file-name order:
``title``, ``command`` (what produced it), ``cpu`` (the machine it ran on), ``date``,
``source`` (where the numbers come from), ``notes`` (markdown paragraphs), an optional
``footnote`` (printed right under the table, also in README.md), an optional ``headline``
(``[what, result]`` for README.md's headline table), and the data, either

* ``columns`` / ``rows`` (cells are markdown) and optional ``align`` (``l`` / ``r`` per
  column): a table as it was printed, or
* ``report_file``: a benchmark's own ``--json`` output beside it (``raw/...``), rendered
  here (``edgetune bench scale`` so far).

README.md holds blocks between ``<!-- generated from docs/benchmarks/ID.json ... -->`` (or
``<!-- generated: headlines ... -->``) and ``<!-- end generated -->``; their content is
rewritten from the JSON, so the numbers a user first sees are the ones measured. Standard
library only, so the docs test stays fast.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "docs" / "benchmarks"
OUT = ROOT / "docs" / "benchmarks.md"
README = ROOT / "README.md"
COMMAND = "python tools/benchmarks_md.py"
MB = 1e6

BLOCK = re.compile(
    r"(<!-- generated(?: from docs/benchmarks/(?P<id>[\w.-]+)\.json|: (?P<kind>\w+))"
    r"[^>]*-->\n)(?P<body>.*?)(<!-- end generated -->)",
    re.S,
)


def load() -> list[tuple[str, dict]]:
    """(id, table) for every docs/benchmarks/*.json, in file-name order."""
    tables = []
    for path in sorted(DATA.glob("*.json")):
        t = json.loads(path.read_text(encoding="utf-8"))
        for key in ("title", "command", "cpu"):
            if not t.get(key):
                raise SystemExit(f"{path.relative_to(ROOT)}: missing {key!r}")
        if "report_file" in t:
            t["report"] = json.loads((DATA / t["report_file"]).read_text(encoding="utf-8"))
        elif not t.get("columns"):
            raise SystemExit(f"{path.relative_to(ROOT)}: needs columns/rows or report_file")
        tables.append((path.stem, t))
    return tables


def anchor(title: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def md_table(columns: list[str], rows: list[list], align: list[str] | None = None) -> list[str]:
    align = align or ["l"] + ["r"] * (len(columns) - 1)
    for r in rows:
        if len(r) != len(columns):
            raise SystemExit(f"row {r!r} has {len(r)} cells for {len(columns)} columns")

    def line(cells):
        return "| " + " | ".join(re.sub(r"(?<!\\)\|", r"\\|", str(c)) for c in cells) + " |"

    return [
        line(columns),
        "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|",
        *(line(r) for r in rows),
    ]


# ---- renderers of a benchmark's own --json output ------------------------------------------


def _num(x, spec: str, unit: str = "") -> str:
    return "n/a" if x is None else format(x, spec) + unit


def _target_value(x, unit: str) -> str:
    if x is None:
        return "n/a"
    return {
        "bytes": lambda v: f"{v / 1e9:.2f} GB",
        "s": lambda v: f"{v:.0f} s",
        "x": lambda v: f"{v:.2f}x",
        "share": lambda v: f"{100 * v:.0f} %",
    }.get(unit, lambda v: f"{v:g} {unit}")(x)


def render_scale(r: dict) -> list[str]:
    """``edgetune bench scale --json``: stages, decode, fits and targets."""
    s = r["shape"]
    bw = r.get("read_bandwidth_gb_s")
    models = ", ".join(f"{m['layers']} layers {m['bytes'] / 1e9:.2f} GB" for m in r["models"])
    out = [
        f"Random bf16 model, hidden {s['hidden']}, MLP {s['intermediate']}, {s['heads']} heads "
        f"({s['kv_heads']} key/value), vocab {s['vocab']}; checkpoints: {models}. "
        f"{r['threads']} threads; decode: {r['prompt_tokens']}-token prompt, "
        f"{r['new_tokens']} new tokens; read bandwidth in this run: "
        + ("not measured" if bw is None else f"{bw:.1f} GB/s")
        + ".",
        "",
    ]
    errors = any("error" in x for x in r["results"])
    rows = []
    for x in r["results"]:
        made = x.get("bundle_bytes") or x.get("merged_bytes")
        peak = x.get("peak_rss_bytes")
        rows.append(
            [
                f"`{x['name']}`",
                x["layers"],
                _num(peak and peak / MB, ".0f"),
                _num(x.get("wall_s"), ".0f"),
                _num(made and made / 1e9, ".2f", " GB"),
            ]
            + ([x.get("error", "")] if errors else [])
        )
    out += md_table(
        ["stage", "layers", "peak RSS MB", "wall s", "output"] + (["error"] if errors else []),
        rows,
        ["l", "r", "r", "r", "r", "l"][: len(rows[0])],
    )
    dec = [x for x in r["results"] if x["name"].startswith("decode-") and "error" not in x]
    if dec:
        out.append("")
        out += md_table(
            [
                "decode",
                "layers",
                "tok/s",
                "prefill tok/s",
                "first token ms",
                "MB read/token",
                "KV MB",
                "share of read BW",
                "RSS / (read + KV)",
            ],
            [
                [
                    f"`{x['name']}`",
                    x["layers"],
                    _num(x["tokens_per_s"], ".1f"),
                    _num(x.get("prefill_tokens_per_s"), ".1f"),
                    _num(x.get("first_token_ms"), ".0f"),
                    _num(x["bytes_per_token"] / MB, ".0f"),
                    _num(x["kv_bytes"] / MB, ".0f"),
                    _num(x.get("bw_utilisation") and 100 * x["bw_utilisation"], ".0f", " %"),
                    _num(x.get("rss_per_read_and_kv"), ".2f"),
                ]
                for x in dec
            ],
        )
    fits = [f for f in r.get("fits", []) if f.get("peak_rss_bytes_slope") is not None]
    if fits:
        out.append("")
        out += md_table(
            [
                "fit",
                "layers",
                "peak MB/layer",
                "peak MB at 0 layers",
                "Phi-3-mini peak MB",
                "Phi-3-medium peak MB",
                "s/layer",
                "Phi-3-mini s",
            ],
            [
                [
                    f"`{f['name']}`",
                    ", ".join(map(str, f["layers"])),
                    _num(f["peak_rss_bytes_slope"] / MB, ".1f"),
                    _num(f["peak_rss_bytes_intercept"] / MB, ".0f"),
                    _num(f["phi3-mini"]["peak_rss_bytes"] / MB, ".0f"),
                    _num(f["phi3-medium"]["peak_rss_bytes"] / MB, ".0f"),
                    _num(f.get("wall_s_slope"), ".1f"),
                    _num(f["phi3-mini"].get("wall_s"), ".0f"),
                ]
                for f in fits
            ],
        )
    out.append("")
    verdict = {True: "pass", False: "**miss**", None: "n/a"}
    bound = {True: ">= ", False: "<= "}
    out += md_table(
        ["target", "value", "bound", "result", "from"],
        [
            [
                t["name"],
                _target_value(t["value"], t["unit"]),
                bound[bool(t.get("at_least"))] + _target_value(t["bound"], t["unit"]),
                verdict[t["passed"]],
                t["source"],
            ]
            for t in r["targets"]
            if t["value"] is not None
        ],
        ["l", "r", "r", "l", "l"],
    )
    return out + ["", "Targets this run did not measure are left out."]


RENDERERS = {"scale": render_scale}


def render_data(t: dict) -> list[str]:
    if "report" in t:
        kind = t["report"].get("benchmark")
        if kind not in RENDERERS:
            raise SystemExit(f"no renderer for benchmark {kind!r} ({t['report_file']})")
        out = RENDERERS[kind](t["report"])
    else:
        out = md_table(t["columns"], t["rows"], t.get("align"))
    return out + (["", t["footnote"]] if t.get("footnote") else [])


def render_section(tid: str, t: dict) -> list[str]:
    out = [
        f"## {t['title']}",
        "",
        "```",
        t["command"],
        "```",
        "",
        f"Machine: {t['cpu']}."
        + (f" Measured {t['date']}." if t.get("date") else "")
        + (f" Numbers: {t['source']}." if t.get("source") else "")
        + f" Data: [{tid}.json](benchmarks/{tid}.json).",
        "",
    ]
    out += render_data(t)
    for note in t.get("notes", []):
        out += ["", note]
    return out + [""]


def render_benchmarks(tables: list[tuple[str, dict]]) -> str:
    out = [
        "# Benchmarks",
        "",
        f"<!-- generated by `{COMMAND}` from docs/benchmarks/*.json: do not edit; "
        "edit the JSON and run it again -->",
        "",
        f"Generated by `{COMMAND}` from [`docs/benchmarks/*.json`](benchmarks/): do not edit "
        "this file. To add or update a table, write its JSON (a benchmark's `--json` output "
        "goes under `benchmarks/raw/`) and run the command; `--check` (run by "
        "`tests/test_docs.py`) fails when this file is out of date. Every number was measured "
        "by the command shown above its table, on the machine named under it. Not re-measured "
        "when code changes: the date says when.",
        "",
        "How the kernels work: [kernels.md](kernels.md). The real-size analysis: "
        "[scale.md](scale.md).",
        "",
    ]
    out += [f"- [{t['title']}](#{anchor(t['title'])})" for _, t in tables]
    out.append("")
    for tid, t in tables:
        out += render_section(tid, t)
    return "\n".join(out).rstrip("\n") + "\n"


def render_block(tid: str | None, kind: str | None, tables: dict) -> str:
    if kind == "headlines":
        rows = [
            [*t["headline"], f"[table](docs/benchmarks.md#{anchor(t['title'])})"]
            for tid, t in tables.items()
            if t.get("headline")
        ]
        return "\n".join(md_table(["measured", "result", "details"], rows, ["l", "l", "l"])) + "\n"
    if tid not in tables:
        raise SystemExit(f"README.md: generated block for unknown table {tid!r}")
    t = tables[tid]
    return (
        "\n".join(
            render_data(t)
            + [
                "",
                f"`{t['command'].splitlines()[0].split('#')[0].strip()}`; machine: {t['cpu']}; "
                f"[details](docs/benchmarks.md#{anchor(t['title'])}).",
            ]
        )
        + "\n"
    )


def render_readme(text: str, tables: list[tuple[str, dict]]) -> str:
    by_id = dict(tables)
    return BLOCK.sub(
        lambda m: m.group(1) + render_block(m.group("id"), m.group("kind"), by_id) + m.group(5),
        text,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if docs/benchmarks.md or README.md is out of date",
    )
    args = ap.parse_args(argv)
    tables = load()
    stale = []
    for path, new in (
        (OUT, render_benchmarks(tables)),
        (README, render_readme(README.read_text(encoding="utf-8"), tables)),
    ):
        old = path.read_text(encoding="utf-8") if path.exists() else None
        if old == new:
            continue
        if args.check:
            stale.append(str(path.relative_to(ROOT)))
        else:
            path.write_text(new, encoding="utf-8")
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run `{COMMAND}`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
