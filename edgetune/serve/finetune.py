"""The fine-tuning service's worker: runs queued jobs as ``edgetune train`` child processes.

A thread in the server polls the store. It starts the oldest queued job (up to
``max_concurrent`` at once) as ``python -m edgetune.cli train ...`` in its own process (then,
with ``export_bundle``, ``edgetune merge`` and ``edgetune export``: phases read back from the
job's files, so a restart picks up at the phase it was in), so
training never blocks inference beyond sharing the cores (the child gets ``train_threads``
torch threads; the server's kernels keep theirs). The child dies with the server
(``PR_SET_PDEATHSIG``), so a killed server leaves no orphan that could finish a job twice.

While a job runs, the thread reads its ``metrics.jsonl`` (an event per logged step, with
loss) and its ``checkpoints/`` (a checkpoint row per save). When the child ends: exit 0 ->
the metrics CSV becomes a result file, the adapter is loaded into the running server as
``ft:<base>:<suffix>:<job-id>`` and the job is ``succeeded``; otherwise ``failed`` with the
trainer's own one-line error. A cancel kills the child (SIGTERM, SIGKILL after 5 s).

On start-up, jobs that were ``running`` or ``validating_files`` when the server died are
queued again; a job with a checkpoint resumes from it (``--resume``: the trainer restores
weights, optimizer, schedule, RNG and data order, so the result equals an uninterrupted
run's), one without starts over from an empty run dir.
"""

from __future__ import annotations

import csv
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .store import Store


def _die_with_parent() -> None:  # runs in the child, before exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # not glibc: the child may outlive a killed server (it resumes anyway)
        pass
    os.setsid()


@dataclass(frozen=True)
class RunnerConfig:
    base_model: str
    """The Hugging Face model dir the served bundle was exported from (what jobs train; a
    Hub id's snapshot in the Hub cache, which the jobs' runs record as id and commit)."""
    base_name: str
    """The base's model id in the API."""
    max_concurrent: int = 1
    train_threads: int | None = None
    """torch threads of each training child (default: all cores, shared with inference)."""
    poll_s: float = 0.5


def fine_tuned_name(base: str, suffix: str | None, job_id: str) -> str:
    return f"ft:{base}:{suffix or ''}:{job_id}"


def train_args(request: dict, data: Path, valid: Path | None, out: Path, base: str) -> list[str]:
    """The ``edgetune train`` command line of a job request (its defaults resolved)."""
    hp = request["hyperparameters"]
    et = request["edgetune"]
    args = [
        "--model", base, "--data", str(data), "--out", str(out),
        "--method", et["method"], "--rank", str(et["rank"]), "--alpha", str(et["alpha"]),
        "--seed", str(request["seed"]), "--batch-size", str(hp["batch_size"]),
        "--lr", str(et["learning_rate"] * hp["learning_rate_multiplier"]),
        "--save-every", str(et["save_every"]), "--keep-checkpoints", "1000",
        "--device", et["device"],
    ]  # fmt: skip
    if et.get("max_steps"):
        args += ["--max-steps", str(et["max_steps"])]
    else:
        args += ["--epochs", str(hp["n_epochs"])]
    if valid is not None:
        args += ["--eval-data", str(valid), "--eval-every", str(et["save_every"])]
    return args


class JobRunner:
    """Runs the store's queued jobs; ``on_model(name, adapter_dir)`` publishes a result."""

    def __init__(self, store: Store, cfg: RunnerConfig, on_model, log=print):
        self.store = store
        self.cfg = cfg
        self.on_model = on_model
        self.log = log
        self._procs: dict[str, tuple[subprocess.Popen, str]] = {}  # job id -> (child, phase)
        self._following: dict[str, _Followed] = {}  # job id -> what its files told so far
        self._stop = threading.Event()
        self.recover()
        self._thread = threading.Thread(target=self._loop, name="edgetune-jobs", daemon=True)
        self._thread.start()

    # -- start-up -------------------------------------------------------------------------------

    def recover(self) -> None:
        """Requeue what a killed server left running; publish the succeeded jobs' models."""
        for job in self.store.jobs_with_status("running", "validating_files"):
            self.store.update_job(job["id"], status="queued")
            self.store.add_event(job["id"], "Server restarted: job requeued, resumes from its "
                                 "last checkpoint")  # fmt: skip
        for job in self.store.jobs_with_status("succeeded"):
            adapter = self.store.job_dir(job["id"]) / "run" / "adapter"
            if job["fine_tuned_model"] and adapter.is_dir():
                self.on_model(job["fine_tuned_model"], adapter)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for proc, _ in list(self._procs.values()):
            _kill(proc)

    # -- the loop -------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.wait(self.cfg.poll_s):
            try:
                self._tick()
            except Exception as e:  # noqa: BLE001 - the loop must outlive one bad job
                self.log(f"edgetune serve: job runner: {type(e).__name__}: {e}")

    def _tick(self) -> None:
        for job in self.store.jobs_with_status("validating_files"):
            self._validate(job)
        for job_id, (proc, phase) in list(self._procs.items()):
            self._follow(job_id)
            if proc.poll() is not None:
                self._finished(job_id, proc, phase)
        for job in self.store.jobs_with_status("cancelled"):
            if job["id"] in self._procs:
                _kill(self._procs.pop(job["id"])[0])
        queued = self.store.jobs_with_status("queued")
        while queued and len(self._procs) < self.cfg.max_concurrent:
            job = queued.pop(0)
            try:
                self._start(job)
            except Exception as e:  # noqa: BLE001 - this job fails, the next one runs
                error = {"code": "start_failed", "message": str(e), "param": None}
                self._end(job["id"], "failed", error=error)

    def _validate(self, job: dict) -> None:
        request = json.loads(job["request"])
        for key in ("training_file", "validation_file"):
            fid = request.get(key)
            if fid and self.store.file(fid) is None:
                error = {"code": "invalid_file", "message": f"{key} {fid} no longer exists",
                         "param": key}  # fmt: skip
                self._end(job["id"], "failed", error=error)
                return
        if self.store.update_job(job["id"], only_if=("validating_files",), status="queued"):
            self.store.add_event(job["id"], "Files validated, job queued")

    def _phase(self, job_id: str, request: dict) -> str | None:
        """What the job has left to do, read from its files: train, merge, export, or None."""
        work = self.store.job_dir(job_id)
        if not (work / "run" / "adapter").is_dir():
            return "train"
        if not request["edgetune"].get("export_bundle"):
            return None
        if not (work / "merged.done").is_file():
            return "merge"
        if not (work / "bundle" / "edgetune.json").is_file():
            return "export"
        return None

    def _start(self, job: dict) -> None:
        request = json.loads(job["request"])
        self.store.job_dir(job["id"]).mkdir(parents=True, exist_ok=True)
        if not self.store.update_job(job["id"], only_if=("queued",), status="running",
                                     started_at=job["started_at"] or int(time.time())):  # fmt: skip
            return  # cancelled in the meantime
        self._next(job["id"], request, restarted=True)

    def _next(self, job_id: str, request: dict, restarted: bool = False) -> None:
        """Launch the job's next phase, or finish it when nothing is left."""
        phase = self._phase(job_id, request)
        if phase is None:
            job = self.store.job(job_id)
            assert job is not None
            self._succeeded(job)
            return
        work = self.store.job_dir(job_id)
        base = self.cfg.base_model
        what = {"merge": "Merging the adapter into the base",
                "export": "Exporting the merged model to an int4 bundle"}.get(phase, "")  # fmt: skip
        if phase == "train":
            run = work / "run"
            data = self._blob(request["training_file"])
            valid = (
                self._blob(request["validation_file"]) if request.get("validation_file") else None
            )
            args = train_args(request, data, valid, run, base)
            ckpts = run / "checkpoints"
            resume = ckpts.is_dir() and any(p.name.startswith("step-") for p in ckpts.iterdir())
            if resume:
                args.append("--resume")
            elif run.exists():  # killed before its first checkpoint: start over
                shutil.rmtree(run)
            self._following.pop(job_id, None)  # the trainer rewrites metrics.jsonl
            what = "Resumed from the last checkpoint" if resume else "Fine-tuning job started"
        elif phase == "merge":
            args = ["--model", base, "--adapter", str(work / "run" / "adapter"),
                    "--out", str(work / "merged"), "--force"]  # fmt: skip
        else:
            args = [str(work / "merged"), "--out", str(work / "bundle"), "--force"]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        if self.cfg.train_threads:
            env["OMP_NUM_THREADS"] = str(self.cfg.train_threads)
        with open(work / f"{phase}.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "edgetune.cli", phase, *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                preexec_fn=_die_with_parent,
            )
        self._procs[job_id] = (proc, phase)
        self.store.add_event(job_id, what)

    def _blob(self, file_id: str) -> Path:
        row = self.store.file(file_id)
        if row is None:
            raise RuntimeError(f"file {file_id} is gone")
        return self.store.blob_path(row["sha256"])

    def _follow(self, job_id: str) -> None:
        """Turn new metrics lines into events and new checkpoints into rows. Reads only what
        the trainer appended since the last tick; the store is written only for news."""
        f = self._following.get(job_id)
        if f is None:  # first look since the server started: the store says what is known
            f = self._following[job_id] = _Followed(
                seen=self.store.last_metrics_step(job_id),
                checkpoints=self.store.checkpoint_steps(job_id),
            )
        run = self.store.job_dir(job_id) / "run"
        for rec in f.read(run / "metrics.jsonl"):
            f.losses[rec["step"]] = rec["loss"]
            if rec["step"] > f.seen:
                data = {"step": rec["step"], "train_loss": rec["loss"]}
                if "eval_loss" in rec:
                    data["valid_loss"] = rec["eval_loss"]
                msg = f"Step {rec['step']}: training loss={rec['loss']:.4f}"
                self.store.add_event(job_id, msg, data=data)
                f.seen = rec["step"]
        ckpts = run / "checkpoints"
        if not ckpts.is_dir():
            return
        for d in sorted(ckpts.iterdir()):
            if not d.name.startswith("step-") or not (d / "meta.json").is_file():
                continue
            step = int(d.name.split("-")[1])
            if step in f.checkpoints:
                continue
            f.checkpoints.add(step)
            metrics = {"step": step, "train_loss": f.losses.get(step)}
            if self.store.add_checkpoint(job_id, step, metrics):
                self.store.add_event(job_id, f"Checkpoint saved at step {step}")

    def _finished(self, job_id: str, proc: subprocess.Popen, phase: str) -> None:
        del self._procs[job_id]
        job = self.store.job(job_id)
        if job is None or job["status"] != "running":
            return
        work = self.store.job_dir(job_id)
        if proc.returncode == 0:
            if phase == "merge":
                (work / "merged.done").write_text("ok\n")
            if phase == "export":
                shutil.rmtree(work / "merged", ignore_errors=True)
            self._next(job_id, json.loads(job["request"]))
            return
        prefix = f"edgetune {phase}: error: "
        tail = (work / f"{phase}.log").read_text(errors="replace").splitlines()
        message = next((line[len(prefix):] for line in reversed(tail)
                        if line.startswith(prefix)), None)  # fmt: skip
        code = "invalid_training_file" if message and ".jsonl" in message else f"{phase}_failed"
        if message is None:
            message = f"edgetune {phase} exited with code {proc.returncode}: " + " | ".join(
                tail[-3:]
            )
        self._end(job_id, "failed", error={"code": code, "message": message, "param": None})

    def _succeeded(self, job: dict) -> None:
        request = json.loads(job["request"])
        job_id = job["id"]
        run = self.store.job_dir(job_id) / "run"
        metrics = read_metrics(run / "metrics.jsonl")
        fd, tmp = tempfile.mkstemp(dir=self.store.root, prefix=".metrics-", suffix=".csv")
        with os.fdopen(fd, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "train_loss", "valid_loss", "tokens"])
            for r in metrics:
                w.writerow([r["step"], r["loss"], r.get("eval_loss", ""), r.get("tokens", "")])
        result = self.store.add_file(Path(tmp), "step_metrics.csv", "fine-tune-results")
        name = fine_tuned_name(self.cfg.base_name, request.get("suffix"), job_id)
        try:
            self.on_model(name, run / "adapter")
        except Exception as e:  # noqa: BLE001 - the job fails, the server goes on
            self._end(job_id, "failed",
                      error={"code": "model_load_failed", "message": str(e), "param": None})  # fmt: skip
            return
        tokens = sum(int(r.get("tokens", 0)) for r in metrics)
        self._end(job_id, "succeeded", fine_tuned_model=name, trained_tokens=tokens,
                  result_files=[result["id"]])  # fmt: skip

    def _end(self, job_id: str, status: str, **fields: Any) -> None:
        if fields.get("error") is not None:
            fields["error"] = json.dumps(fields["error"])
        changed = self.store.update_job(
            job_id, only_if=("validating_files", "queued", "running"), status=status,
            finished_at=int(time.time()), **fields,
        )  # fmt: skip
        if changed:
            level = "error" if status == "failed" else "info"
            text = {"succeeded": "The job has successfully completed",
                    "failed": "The job failed"}.get(status, f"The job is {status}")  # fmt: skip
            if status == "failed":
                text += ": " + json.loads(fields["error"])["message"]
            self.store.add_event(job_id, text, level=level)

    def cancel(self, job_id: str) -> bool:
        """Mark cancelled (only an active job) and stop its child now."""
        if not self.store.update_job(job_id, only_if=("validating_files", "queued", "running"),
                                     status="cancelled", finished_at=int(time.time())):  # fmt: skip
            return False
        self.store.add_event(job_id, "The job was cancelled")
        running = self._procs.pop(job_id, None)
        if running is not None:
            threading.Thread(target=_kill, args=(running[0],), daemon=True).start()
        return True


@dataclass
class _Followed:
    """A running job's files as the runner has read them."""

    seen: int  # the last step turned into an event
    checkpoints: set[int]  # steps with a checkpoint row
    losses: dict[int, float] = field(default_factory=dict)
    offset: int = 0  # bytes of metrics.jsonl read

    def read(self, path: Path) -> list[dict]:
        """The complete lines appended since the last read."""
        if not path.is_file():
            return []
        with open(path, "rb") as fh:
            fh.seek(self.offset)
            chunk = fh.read()
        end = chunk.rfind(b"\n") + 1  # a torn last line waits for the next read
        self.offset += end
        return [json.loads(line) for line in chunk[:end].splitlines() if line.strip()]


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
    except ProcessLookupError:
        pass


def read_metrics(path: Path) -> list[dict]:
    """The complete lines of a metrics.jsonl being written (a torn last line is skipped)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out
