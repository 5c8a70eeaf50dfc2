"""``edgetune bench scale``'s report as text: per-stage tables against the layer count, the
decode table, and the targets with pass/fail (the report itself comes from ``scale.bench``).
"""

from __future__ import annotations

GB, MB = 1e9, 1e6  # decimal units throughout, as the targets are stated


def _fmt(v, unit: str) -> str:
    if v is None:
        return "n/a"
    if unit == "bytes":
        return f"{v / MB:.0f} MB" if abs(v) < GB else f"{v / GB:.2f} GB"
    if unit == "s":
        return f"{v:.1f} s"
    if unit == "share":
        return f"{100 * v:.0f}%"
    return f"{v:.2f}x" if unit == "x" else f"{v:.3g}"


def _stage_table(report: dict, key: str, title: str, unit: str) -> list[str]:
    """One row per stage: the value at each layer count, the slope per layer, the fit at 32
    layers of this width, and the extrapolations to Phi-3-mini and Phi-3-medium."""
    scale = MB if key == "peak_rss_bytes" else 1.0
    digits = 0 if key == "peak_rss_bytes" else 1

    def num(v) -> str:
        return "n/a" if v is None else f"{v / scale:.{digits}f}"

    layers = report["layers"]
    by = {(r["name"], r["layers"]): r for r in report["results"]}
    lines = [
        f"{title:<16}"
        + "".join(f"{'@' + str(n):>9}" for n in layers)
        + f"{unit + '/layer':>11}{'fit @32':>9}{'Phi-3-mini':>12}{'Phi-3-medium':>14}"
    ]
    for f in report["fits"]:
        cells = []
        for n in layers:
            r = by.get((f["name"], n))
            cells.append("" if r is None else "error" if "error" in r else num(r[key]))
        slope, c = f[f"{key}_slope"], f[f"{key}_intercept"]
        lines.append(
            f"{f['name']:<16}"
            + "".join(f"{x:>9}" for x in cells)
            + f"{num(slope):>11}{num(None if slope is None else c + 32 * slope):>9}"
            + f"{num(f['phi3-mini'][key]):>12}{num(f['phi3-medium'][key]):>14}"
        )
    return lines


def format_results(report: dict) -> str:
    s = report["shape"]
    lines = [
        f"random {s['hidden']}-wide model (MLP {s['intermediate']}, {s['heads']} heads, "
        f"{s['kv_heads']} key/value, vocab {s['vocab']}) at "
        f"{', '.join(map(str, report['layers']))} layers; {report['threads']} threads",
        "",
    ]
    lines += _stage_table(report, "peak_rss_bytes", "peak RSS MB", "MB")
    lines += [""] + _stage_table(report, "wall_s", "wall s", "s")
    dec = [r for r in report["results"] if r["name"].startswith("decode-") and "error" not in r]
    if dec:
        bw = report.get("read_bandwidth_gb_s")
        lines += [
            "",
            f"decode: {report['prompt_tokens']}-token prompt, {report['new_tokens']} new "
            f"tokens; read bandwidth in this run " + ("n/a" if bw is None else f"{bw:.1f} GB/s"),
            f"{'backend':<16}{'layers':>7}{'tok/s':>9}{'MB/token':>10}{'KV MB':>8}"
            f"{'BW use':>8}{'RSS/(read+KV)':>15}",
        ]
        for r in dec:
            util = r.get("bw_utilisation")
            lines.append(
                f"{r['name']:<16}{r['layers']:>7}{r['tokens_per_s']:>9.1f}"
                f"{r['bytes_per_token'] / MB:>10.1f}{r['kv_bytes'] / MB:>8.1f}"
                f"{'n/a' if util is None else f'{100 * util:.0f}%':>8}"
                f"{r['rss_per_read_and_kv']:>15.2f}"
            )
    lines += ["", f"{'target':<52}{'value':>11}{'bound':>12}  result"]
    for t in report["targets"]:
        verdict = {True: "pass", False: "FAIL", None: "n/a"}[t["passed"]]
        bound = (">= " if t.get("at_least") else "<= ") + _fmt(t["bound"], t["unit"])
        lines.append(
            f"{t['name']:<52}{_fmt(t['value'], t['unit']):>11}{bound:>12}  "
            f"{verdict} ({t['source']})"
        )
    lines += [
        "",
        "fit @32: the least-squares line c + s*L at 32 layers of this width. "
        "Phi-3-mini / -medium: y = c*E_T/E_B + s*L_T*P_T/P_B,",
        "P = h*(h + 2*kv*d) + h*h + 3*h*i the parameters of one layer, E = vocab*h; "
        "mini: h 3072, i 8192, 32 layers; medium: h 5120,",
        "i 17920, kv 10 x d 128, 40 layers; vocab 32064. MB and GB are decimal.",
    ]
    errors = [
        f"  {r['name']} @{r['layers']}: {r['error']}" for r in report["results"] if "error" in r
    ]
    if errors:
        lines += ["", "errors:"] + errors
    if report.get("work_dir"):
        lines += ["", f"outputs kept in {report['work_dir']}"]
    return "\n".join(lines)
