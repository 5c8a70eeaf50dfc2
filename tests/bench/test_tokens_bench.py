"""``edgetune bench tokens``: every case measured against its spec, and the table prints."""

import json

from edgetune.bench import tokens
from edgetune.cli import main


def test_bench_tokens_json_covers_every_case(monkeypatch, capsys):
    monkeypatch.setattr(tokens, "VOCABS", (2048,))
    monkeypatch.setattr(tokens, "LENGTHS", (64,))
    assert main(["bench", "tokens", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    cases = {(r["logits"], r["sampling"]) for r in report["selection"]}
    assert cases == {(s, name) for s in ("flat", "peaked") for name, _ in tokens.CASES}
    assert all(r["reference_ms"] > 0 and r["select_ms"] > 0 for r in report["selection"])
    assert [r["tokens"] for r in report["text"]] == [64]
    table = tokens.format_results(report)
    assert table.count("x\n") + table.endswith("x") == len(report["selection"]) + 1
