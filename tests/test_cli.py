"""The CLI: every subcommand has help, user errors are one line with exit code 2."""

import json
import subprocess
import sys

CLI = [sys.executable, "-m", "edgetune.cli"]


def run(*args, cwd=None):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, cwd=cwd)


def test_version_and_help_on_every_subcommand():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.startswith("edgetune ")
    for sub in ("quickstart", "train", "merge", "export", "verify", "eval", "run"):
        r = run(sub, "--help")
        assert r.returncode == 0 and "usage: edgetune " + sub in r.stdout, sub


def one_line_error(r, *needles):
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_model_path(tmp_path, task_data):
    r = run("train", "--model", tmp_path / "nope", "--data", task_data[0], "--out", tmp_path / "run")
    one_line_error(r, "nope", "model directory not found")
    assert not (tmp_path / "run").exists()


def test_malformed_jsonl_line(tmp_path, tiny_model):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "fine"}) + "\n" + '{"messages": [}\n')
    r = run("train", "--model", tiny_model, "--data", data, "--out", tmp_path / "run")
    one_line_error(r, f"{data}:2", "not valid JSON")
    assert not (tmp_path / "run").exists()


def test_existing_output_dirs(tmp_path, tiny_model, task_data, int4_bundle):
    out = tmp_path / "run"
    out.mkdir()
    (out / "x").write_text("keep")
    r = run("train", "--model", tiny_model, "--data", task_data[0], "--out", out)
    one_line_error(r, str(out), "exists")
    r = run("export", tiny_model, "--out", out)
    one_line_error(r, str(out), "--force")
    assert [p.name for p in out.iterdir()] == ["x"]


def test_unknown_config_key(tmp_path, tiny_model, task_data):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("rank: 8\nlearning_rate: 1e-3\n")
    r = run("train", "--config", cfg, "--model", tiny_model, "--data", task_data[0], "--out",
            tmp_path / "r")
    one_line_error(r, str(cfg), "learning_rate")


def test_run_verify_and_damaged_bundle(int4_bundle, tmp_path):
    r = run("run", int4_bundle, "--prompt", "turn off the porch lights", "--max-new-tokens", "24")
    assert r.returncode == 0 and r.stdout.strip()
    r = run("run", int4_bundle, "--prompt", "turn off the porch lights", "--stream",
            "--max-new-tokens", "8")
    assert r.returncode == 0 and r.stdout.strip()
    r = run("verify", int4_bundle)
    assert r.returncode == 0 and "OK" in r.stdout
    r = run("run", tmp_path / "nothing", "--prompt", "hi")
    one_line_error(r, "bundle directory not found")
    r = run("run", int4_bundle, "--prompt", "hi", "--max-new-tokens", "0")
    one_line_error(r, "max_new_tokens")
