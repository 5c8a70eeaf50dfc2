"""The CLI: every subcommand has help, user errors are one line with exit code 2."""

import json
import subprocess
import sys

CLI = [sys.executable, "-m", "edgetune.cli"]


def run(*args, cwd=None):
    return subprocess.run(
        CLI + [a if isinstance(a, bytes) else str(a) for a in args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


def test_version_and_help_on_every_subcommand():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.startswith("edgetune ")
    for sub in ("quickstart", "train", "merge", "export", "verify", "eval", "run", "chat", "bench"):
        r = run(sub, "--help")
        assert r.returncode == 0 and "usage: edgetune " + sub in r.stdout, sub


def one_line_error(r, *needles):
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_model_path(tmp_path, task_data):
    r = run(
        "train", "--model", tmp_path / "nope", "--data", task_data[0], "--out", tmp_path / "run"
    )
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
    r = run(
        "train",
        "--config",
        cfg,
        "--model",
        tiny_model,
        "--data",
        task_data[0],
        "--out",
        tmp_path / "r",
    )
    one_line_error(r, f"{cfg}: unknown setting 'learning_rate' (did you mean 'lr'?)")
    assert not (tmp_path / "r").exists()


def test_run_answers_the_task_as_the_python_api_does(int4_bundle):
    """``edgetune run`` wraps the prompt in the chat template and prints the fine-tuned
    model's answer: the task's JSON action, token for token what ``Model.chat`` returns;
    ``--stream`` prints the same text."""
    from edgetune.runtime import Model

    prompt = "turn off the porch lights"  # a held-out (device, action, room) combination
    answer = Model.load(int4_bundle).chat(
        [{"role": "user", "content": prompt}], max_new_tokens=64
    )  # ends at eos, ~25 tokens
    assert json.loads(answer) == {"device": "light", "room": "porch", "action": "off"}
    r = run("run", int4_bundle, "--prompt", prompt, "--max-new-tokens", "64")
    assert r.returncode == 0 and r.stdout == answer + "\n", r.stderr
    r = run("run", int4_bundle, "--prompt", prompt, "--stream", "--max-new-tokens", "64")
    assert r.returncode == 0 and r.stdout == answer + "\n", r.stderr


def test_run_verify_and_damaged_bundle(int4_bundle, tmp_path):
    r = run("verify", int4_bundle)
    assert r.returncode == 0 and "OK" in r.stdout
    r = run("run", tmp_path / "nothing", "--prompt", "hi")
    one_line_error(r, "bundle directory not found")
    r = run("run", int4_bundle, "--prompt", "hi", "--max-new-tokens", "0")
    one_line_error(r, "max_new_tokens")


def test_run_bad_input_is_one_line(int4_bundle, tmp_path):
    r = run("run", int4_bundle, "--prompt", "   ")
    one_line_error(r, "prompt is empty")
    r = run("run", int4_bundle, "--prompt", b"\xff\xfe lights")
    one_line_error(r, "not valid UTF-8")
    r = run("run", int4_bundle, "--prompt", "word " * 2000)
    one_line_error(r, "context is 512")
    r = run("run", int4_bundle, "--prompt", "hi", "--backend", "native", "--max-new-tokens", "-1")
    one_line_error(r, "max_new_tokens")
    import shutil

    shutil.copytree(int4_bundle, tmp_path / "b")
    with open(tmp_path / "b" / "model.onnx.data", "r+b") as f:
        f.seek(100)
        f.write(b"\0\0\0\0")
    for backend in ("ort", "native"):
        r = run("run", tmp_path / "b", "--prompt", "hi", "--backend", backend)
        one_line_error(r, "model.onnx.data: damaged")


def test_run_seeded_sampling_repeats_across_processes(int4_bundle):
    args = (
        "run",
        int4_bundle,
        "--raw",
        "--prompt",
        "The function returns",
        "--max-new-tokens",
        "24",
        "--temperature",
        "1.0",
        "--top-k",
        "50",
    )
    first = run(*args, "--seed", "3")
    assert first.returncode == 0 and first.stdout.strip()
    assert run(*args, "--seed", "3").stdout == first.stdout
    assert any(run(*args, "--seed", str(s)).stdout != first.stdout for s in (4, 5))


def chat(bundle, stdin: bytes, *flags):
    return subprocess.run(
        CLI + ["chat", str(bundle), *flags], input=stdin, capture_output=True, timeout=600
    )


def test_chat_keeps_history_resets_and_exits(int4_bundle):
    from edgetune.runtime import Model

    turns = ["turn on the kitchen lights", "and lock the garage door", "dim the office lights"]
    r = chat(
        int4_bundle,
        f"{turns[0]}\n{turns[1]}\n/reset\n{turns[2]}\n/exit\nunanswered\n".encode(),
        "--max-new-tokens",
        "40",
        "--system",
        "You run a smart home.",
    )
    assert r.returncode == 0, r.stderr
    assert b"history cleared" in r.stderr and b"Traceback" not in r.stderr
    m = Model.load(int4_bundle)
    system = {"role": "system", "content": "You run a smart home."}
    user = [{"role": "user", "content": t} for t in turns]
    first = m.chat([system, user[0]], max_new_tokens=40)
    second = m.chat(
        [system, user[0], {"role": "assistant", "content": first}, user[1]], max_new_tokens=40
    )
    third = m.chat([system, user[2]], max_new_tokens=40)  # after /reset: no history
    assert r.stdout.decode().splitlines() == [first, second, third]


def test_chat_trims_history_and_survives_bad_messages(int4_bundle):
    long = "turn on the kitchen lights and " * 25  # ~150 tokens; the context is 512
    stdin = "\n".join([long] * 3 + ["word " * 2000, "lock the garage door"]).encode()
    r = chat(
        int4_bundle,
        stdin + b"\n\xff\xfe lights\n\n",
        "--max-new-tokens",
        "32",
        "--backend",
        "native",
    )
    assert r.returncode == 0, r.stderr  # EOF quits cleanly
    err = r.stderr.decode()
    assert "oldest messages to fit the 512-token context" in err
    assert "message too long: 2006 tokens" in err and "not valid UTF-8" in err
    assert "Traceback" not in err
    assert len(r.stdout.decode().splitlines()) == 4  # three long turns and the garage door


def test_chat_ctrl_c_and_bad_flags_quit_cleanly(int4_bundle, tmp_path):
    import signal

    p = subprocess.Popen(
        CLI + ["chat", str(int4_bundle)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert "/exit quits" in p.stderr.readline()  # loaded, waiting for input
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0 and "Traceback" not in err, err
    one_line_error(run("chat", int4_bundle, "--max-new-tokens", "0"), "max_new_tokens")
    one_line_error(run("chat", tmp_path / "nothing"), "bundle directory not found")
