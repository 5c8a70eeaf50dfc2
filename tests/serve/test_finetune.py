"""The fine-tuning service through the official ``openai`` client, on the tiny model.

files.create -> fine_tuning.jobs.create -> poll until succeeded -> events with loss ->
checkpoints -> chat with ``job.fine_tuned_model``; a bad file is a 400 naming line and field
and stores nothing; an unknown base is a 404; cancel stops the trainer; a failing trainer
fails the job with its message; pagination; and the crash test: ``kill -9`` the server while
a job trains, restart it on the same state dir, and the job finishes with the same adapter as
an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from .conftest import Running, wait_for

STEPS = {"max_steps": 12, "save_every": 3, "rank": 8}


UPLOAD_LIMIT = 2_000_000  # bytes: the shipped training file is about 0.4 MB


def start(base_fp32, tiny_model, state) -> Running:
    return Running([str(base_fp32), "--name", "tiny", "--base", str(tiny_model),
                    "--state-dir", str(state), "--max-upload-bytes", str(UPLOAD_LIMIT)])  # fmt: skip


@pytest.fixture(scope="module")
def service(base_fp32, tiny_model, tmp_path_factory):
    s = start(base_fp32, tiny_model, tmp_path_factory.mktemp("ft") / "state")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def training_file(service, task_data):
    return service.client().files.create(file=open(task_data[0], "rb"), purpose="fine-tune")


def wait_job(client, job_id: str, timeout: float = 300.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {job.status} after {timeout} s")


def create(client, training_file, validation_file=None, **edgetune):
    return client.fine_tuning.jobs.create(
        model="tiny", training_file=training_file.id, suffix="home", seed=3,
        validation_file=validation_file.id if validation_file else openai_not_given(),
        hyperparameters={"batch_size": 4}, extra_body={"edgetune": {**STEPS, **edgetune}},
    )  # fmt: skip


def openai_not_given():
    from openai import NOT_GIVEN

    return NOT_GIVEN


def test_upload_train_and_chat(service, training_file, task_data):
    client = service.client()
    assert training_file.purpose == "fine-tune" and training_file.filename == "train.jsonl"
    assert client.files.retrieve(training_file.id).bytes == os.path.getsize(task_data[0])
    assert client.files.content(training_file.id).read() == open(task_data[0], "rb").read()

    heldout = client.files.create(file=open(task_data[1], "rb"), purpose="fine-tune")
    job = create(client, training_file, heldout)
    assert job.status in ("validating_files", "queued") and job.model == "tiny"
    assert job.validation_file == heldout.id
    job = wait_job(client, job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:tiny:home:{job.id}"
    assert job.trained_tokens > 0 and job.finished_at >= job.created_at

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    losses = [e.data["train_loss"] for e in events if e.type == "metrics"]
    assert len(losses) == STEPS["max_steps"] and all(np.isfinite(losses))
    assert events[0].message == "The job has successfully completed"

    steps = [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id)]
    assert sorted(steps) == [3, 6, 9]

    (result,) = job.result_files
    csv = client.files.content(result).read().decode().splitlines()
    assert csv[0] == "step,train_loss,valid_loss,tokens" and len(csv) == STEPS["max_steps"] + 1
    valid = [line.split(",")[2] for line in csv[1:]]
    assert [i + 1 for i, v in enumerate(valid) if v] == [3, 6, 9, 12]  # every save_every steps

    assert job.fine_tuned_model in [m.id for m in client.models.list()]
    prompt = [{"role": "user", "content": "turn off the porch lights at 10pm"}]
    reply = client.chat.completions.create(
        model=job.fine_tuned_model, messages=prompt, temperature=0, max_tokens=24
    )
    assert reply.choices[0].message.content and reply.model == job.fine_tuned_model


def test_a_bad_file_is_refused_naming_the_line_and_stores_nothing(service, tmp_path):
    import openai

    client = service.client()
    before = [f.id for f in client.files.list()]
    bad = tmp_path / "bad.jsonl"
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    bad.write_text("\n".join([json.dumps(good), json.dumps(good), json.dumps({"prompt": 3})]))
    with pytest.raises(openai.BadRequestError) as e:
        client.files.create(file=open(bad, "rb"), purpose="fine-tune")
    message = e.value.body["message"]
    assert "bad.jsonl:3" in message and "prompt" in message
    assert str(tmp_path) not in message  # the server's own paths stay inside
    assert [f.id for f in client.files.list()] == before
    assert not [p for p in os.listdir(service_state(service)) if p.startswith(".upload")]


def test_an_upload_over_the_limit_is_413(service, tmp_path):
    import openai

    big = tmp_path / "big.jsonl"
    line = json.dumps({"text": "x" * 1000}) + "\n"
    big.write_text(line * (UPLOAD_LIMIT // len(line) + 10))
    with pytest.raises(openai.APIStatusError) as e:
        service.client().files.create(file=open(big, "rb"), purpose="fine-tune")
    assert e.value.status_code == 413


def service_state(service) -> str:
    return service.args[service.args.index("--state-dir") + 1]


def test_unknown_base_and_job_are_404(service, training_file):
    import openai

    client = service.client()
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=training_file.id)
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-000000000000000000000000")
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("../../etc/passwd")
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.create(model="tiny", training_file="file-nope")


def test_cancel_stops_the_trainer(service, training_file):
    client = service.client()
    job = create(client, training_file, max_steps=100000, save_every=1000)
    assert wait_for(
        lambda: client.fine_tuning.jobs.retrieve(job.id).status == "running", timeout=60
    )
    assert wait_for(lambda: any(e.type == "metrics" for e in
                                client.fine_tuning.jobs.list_events(job.id)), timeout=120)  # fmt: skip
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    last = lambda: max(  # noqa: E731
        (e.data["step"] for e in client.fine_tuning.jobs.list_events(job.id, limit=1000)
         if e.type == "metrics"), default=0)  # fmt: skip
    time.sleep(6)  # the trainer got SIGTERM, then SIGKILL after 5 s at most
    stopped_at = last()
    time.sleep(2)
    assert last() == stopped_at
    job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "cancelled" and job.fine_tuned_model is None
    assert not any(m.id.endswith(job.id) for m in client.models.list())


def test_a_failing_trainer_fails_the_job_with_its_message(service, training_file):
    import torch

    if torch.cuda.is_available():
        pytest.skip("the failure used here is asking for CUDA on a machine without it")
    client = service.client()
    job = wait_job(client, create(client, training_file, device="cuda").id)
    assert job.status == "failed" and job.fine_tuned_model is None
    assert "cuda" in job.error.message.lower()


def test_jobs_are_listed_newest_first_in_pages(service, training_file):
    client = service.client()
    made = [create(client, training_file, max_steps=100000) for _ in range(3)]
    for j in made:
        client.fine_tuning.jobs.cancel(j.id)
    first = client.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in first.data] == [made[2].id, made[1].id] and first.has_more
    second = client.fine_tuning.jobs.list(limit=2, after=made[1].id)
    assert second.data[0].id == made[0].id


def test_a_killed_server_resumes_the_job_to_the_same_adapter(base_fp32, tiny_model, tmp_path,
                                                            task_data):  # fmt: skip
    runs = {}
    for mode in ("straight", "killed"):
        state = tmp_path / mode
        s = start(base_fp32, tiny_model, state)
        try:
            client = s.client()
            f = client.files.create(file=open(task_data[0], "rb"), purpose="fine-tune")
            job = create(client, f)
            if mode == "killed":
                ckpts = state / "jobs" / job.id / "run" / "checkpoints"
                assert wait_for(lambda c=ckpts: c.is_dir() and len(os.listdir(c)) >= 2,
                                timeout=180, every=0.02)  # fmt: skip
                os.kill(s.pid, signal.SIGKILL)
                s.proc.wait(10)
                s = start(base_fp32, tiny_model, state)
                client = s.client()
                assert client.fine_tuning.jobs.retrieve(job.id).status in ("queued", "running")
            job = wait_job(client, job.id)
            assert job.status == "succeeded", job.error
            if mode == "killed":
                messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id)]
                assert any("restarted" in m for m in messages)
                assert any("Resumed" in m for m in messages)
            runs[mode] = load_file(str(state / "jobs" / job.id / "run" / "adapter" /
                                       "adapter_model.safetensors"))  # fmt: skip
        finally:
            s.stop()
    a, b = runs["straight"], runs["killed"]
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_export_bundle_gives_a_bundle_edgetune_run_loads(service, training_file):
    from .conftest import run_cli

    client = service.client()
    job = wait_job(client, create(client, training_file, max_steps=4, export_bundle=True).id)
    assert job.status == "succeeded", job.error
    bundle = job.edgetune["bundle"]
    assert bundle and os.path.isfile(os.path.join(bundle, "edgetune.json"))
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert any("Exporting" in m for m in messages) and any("Merging" in m for m in messages)
    done = run_cli("run", bundle, "--prompt", "porch fan on", "--max-new-tokens", "8")
    assert done.returncode == 0 and done.stdout.strip(), done.stderr
