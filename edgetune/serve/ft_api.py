"""OpenAI's files and fine-tuning endpoints over the store and the job runner.

    POST /v1/files (multipart: file, purpose)      GET /v1/files[/{id}[/content]]    DELETE /v1/files/{id}
    POST /v1/fine_tuning/jobs                       GET /v1/fine_tuning/jobs[/{id}]
    POST /v1/fine_tuning/jobs/{id}/cancel           GET /v1/fine_tuning/jobs/{id}/events | /checkpoints

A ``fine-tune`` upload is validated line by line by the trainer's own parser
(``edgetune.data.load_examples``): a bad line is a 400 naming line and field, and nothing is
stored. edgetune's own training choices ride in an ``edgetune`` object of the job request
(``extra_body={"edgetune": {...}}`` with the openai client): ``method`` (qlora, qdora, lora,
dora; default lora), ``rank`` (16), ``alpha`` (32), ``learning_rate`` (the rate a multiplier
of 1 means; 2e-4), ``max_steps`` (instead of epochs), ``save_every`` (checkpoint interval in
steps; 10), ``device`` (auto), ``export_bundle`` (also merge and export an int4 bundle; the
job object's ``edgetune.bundle`` gives its path).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import Response
from pydantic import Field

from ..errors import DataError
from .errors import APIError, bad_request, model_not_found
from .finetune import JobRunner
from .schemas import Strict
from .store import Store

PURPOSES = ("fine-tune", "fine-tune-results", "assistants", "batch", "user_data", "evals")
METHODS = ("qlora", "qdora", "lora", "dora")


class Hyperparameters(Strict):
    n_epochs: int | Literal["auto"] = "auto"
    batch_size: int | Literal["auto"] = "auto"
    learning_rate_multiplier: float | Literal["auto"] = "auto"


class Supervised(Strict):
    hyperparameters: Hyperparameters | None = None


class Method(Strict):
    type: Literal["supervised"]
    supervised: Supervised | None = None


class EdgetuneChoices(Strict):
    method: Literal["qlora", "qdora", "lora", "dora"] = "lora"
    rank: int = Field(default=16, ge=1, le=256)
    alpha: float = Field(default=32.0, gt=0)
    learning_rate: float = Field(default=2e-4, gt=0, le=1)
    max_steps: int | None = Field(default=None, ge=1)
    save_every: int = Field(default=10, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    export_bundle: bool = False


class JobRequest(Strict):
    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = Field(default=None, max_length=64, pattern=r"^[A-Za-z0-9_.-]*$")
    seed: int | None = None
    metadata: dict[str, str] | None = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    integrations: list[Any] | None = None
    edgetune: EdgetuneChoices = EdgetuneChoices()


def file_object(row: dict) -> dict:
    return {
        "id": row["id"],
        "object": "file",
        "bytes": row["bytes"],
        "created_at": row["created_at"],
        "filename": row["filename"],
        "purpose": row["purpose"],
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


def _job_object(row: dict, bundle: Path | None = None) -> dict:
    """OpenAI's job object; ``edgetune`` holds the job's own choices and, once exported,
    the int4 bundle's path (``edgetune run`` loads it)."""
    req = json.loads(row["request"])
    return {
        "object": "fine_tuning.job",
        "id": row["id"],
        "created_at": row["created_at"],
        "model": req["model"],
        "training_file": req["training_file"],
        "validation_file": req.get("validation_file"),
        "hyperparameters": req["hyperparameters"],
        "method": {
            "type": "supervised",
            "supervised": {"hyperparameters": req["hyperparameters"]},
        },  # fmt: skip
        "seed": req["seed"],
        "suffix": req.get("suffix"),
        "user_provided_suffix": req.get("suffix"),
        "metadata": req.get("metadata"),
        "status": row["status"],
        "started_at": row["started_at"],
        "finished_at": row["finished_at"],
        "trained_tokens": row["trained_tokens"],
        "error": json.loads(row["error"]) if row["error"] else None,
        "fine_tuned_model": row["fine_tuned_model"],
        "result_files": json.loads(row["result_files"]),
        "organization_id": "edgetune",
        "estimated_finish": None,
        "integrations": [],
        "edgetune": {**req["edgetune"], "bundle": str(bundle) if bundle else None},
    }


def event_object(row: dict) -> dict:
    return {
        "object": "fine_tuning.job.event",
        "id": row["id"],
        "created_at": row["created_at"],
        "level": row["level"],
        "message": row["message"],
        "data": json.loads(row["data"]) if row["data"] else {},
        "type": row["type"],
    }


def checkpoint_object(row: dict, model: str) -> dict:
    return {
        "object": "fine_tuning.job.checkpoint",
        "id": row["id"],
        "created_at": row["created_at"],
        "fine_tuning_job_id": row["job_id"],
        "fine_tuned_model_checkpoint": f"{model}:ckpt-step-{row['step']}",
        "step_number": row["step"],
        "metrics": json.loads(row["metrics"]),
    }


def page(data: list[dict], has_more: bool) -> dict:
    return {"object": "list", "data": data, "has_more": has_more}


def validate_upload(path: Path, filename: str) -> None:
    """The trainer's own check of a training file; errors name the uploaded file's name."""
    from ..data import load_examples

    try:
        examples = load_examples(path)
    except DataError as e:
        raise bad_request(str(e).replace(str(path), filename), param="file") from None
    if not examples:
        raise bad_request(f"{filename}: no examples", param="file")


def add_routes(app: FastAPI, store: Store, runner: JobRunner, base: str, max_upload: int) -> None:
    def job_object(row: dict) -> dict:
        bundle = store.job_dir(row["id"]) / "bundle"
        return _job_object(row, bundle if (bundle / "edgetune.json").is_file() else None)

    def job_or_404(job_id: str) -> dict:
        row = store.job(job_id)
        if row is None:
            raise APIError(404, f"No fine-tuning job with id {job_id!r}", param="fine_tuning_job_id",
                           code="not_found")  # fmt: skip
        return row

    def file_or_404(file_id: str) -> dict:
        row = store.file(file_id)
        if row is None:
            raise APIError(404, f"No such file: {file_id!r}", param="file_id", code="not_found")
        return row

    @app.post("/v1/files")
    async def upload(file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]):
        if purpose not in PURPOSES:
            raise bad_request(f"purpose: one of {', '.join(PURPOSES)}", param="purpose")
        name = os.path.basename(file.filename or "upload.jsonl")[:255] or "upload.jsonl"
        fd, tmp_name = tempfile.mkstemp(dir=store.root, prefix=".upload-")
        tmp = Path(tmp_name)
        try:
            size = 0
            with os.fdopen(fd, "wb") as out:
                while block := await file.read(1 << 20):
                    size += len(block)
                    if size > max_upload:
                        from .errors import too_large

                        raise too_large(max_upload)
                    out.write(block)
            if purpose == "fine-tune":
                validate_upload(tmp, name)
            row = store.add_file(tmp, name, purpose)
        finally:
            tmp.unlink(missing_ok=True)
        return file_object(row)

    @app.get("/v1/files")
    async def list_files(purpose: str | None = None):
        return page([file_object(r) for r in store.files(purpose)], False)

    @app.get("/v1/files/{file_id}")
    async def get_file(file_id: str):
        return file_object(file_or_404(file_id))

    @app.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str):
        row = file_or_404(file_id)
        return Response(store.blob_path(row["sha256"]).read_bytes(),
                        media_type="application/octet-stream")  # fmt: skip

    @app.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str):
        file_or_404(file_id)
        store.delete_file(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    @app.post("/v1/fine_tuning/jobs")
    async def create_job(body: JobRequest):
        if body.model != base:
            raise model_not_found(body.model, [base])
        for key in ("training_file", "validation_file"):
            fid = getattr(body, key)
            if fid is None:
                continue
            row = store.file(fid)
            if row is None:
                raise bad_request(f"{key}: no file {fid!r}", param=key, code="invalid_file")
            if row["purpose"] != "fine-tune":
                raise bad_request(f"{key}: file {fid} has purpose {row['purpose']!r}, not "
                                  "'fine-tune'", param=key, code="invalid_file")  # fmt: skip
        hp = (body.method and body.method.supervised and body.method.supervised.hyperparameters
              ) or body.hyperparameters or Hyperparameters()  # fmt: skip
        resolved = {
            "n_epochs": 3 if hp.n_epochs == "auto" else hp.n_epochs,
            "batch_size": 4 if hp.batch_size == "auto" else hp.batch_size,
            "learning_rate_multiplier": 1.0
            if hp.learning_rate_multiplier == "auto"
            else hp.learning_rate_multiplier,
        }
        request = {
            "model": body.model,
            "training_file": body.training_file,
            "validation_file": body.validation_file,
            "suffix": body.suffix,
            "seed": body.seed if body.seed is not None else 42,
            "metadata": body.metadata,
            "hyperparameters": resolved,
            "edgetune": body.edgetune.model_dump(),
        }
        row = store.add_job(request)
        store.add_event(row["id"], f"Created fine-tuning job: {row['id']}")
        return job_object(row)

    @app.get("/v1/fine_tuning/jobs")
    async def list_jobs(after: str | None = None, limit: int = 20):
        rows, more = store.jobs(after, max(1, min(limit, 100)))
        return page([job_object(r) for r in rows], more)

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    async def get_job(job_id: str):
        return job_object(job_or_404(job_id))

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    async def cancel_job(job_id: str, request: Request):
        row = job_or_404(job_id)
        if not runner.cancel(job_id):
            raise bad_request(f"job {job_id} is {row['status']}: only a job that has not "
                              "ended can be cancelled", param="fine_tuning_job_id")  # fmt: skip
        return job_object(job_or_404(job_id))

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    async def job_events(job_id: str, after: str | None = None, limit: int = 20):
        job_or_404(job_id)
        rows, more = store.events(job_id, after, max(1, min(limit, 1000)))
        return page([event_object(r) for r in rows], more)

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    async def job_checkpoints(job_id: str, after: str | None = None, limit: int = 10):
        job = job_or_404(job_id)
        rows, more = store.checkpoints(job_id, after, max(1, min(limit, 100)))
        model = job["fine_tuned_model"] or f"ft:{base}::{job_id}"
        return page([checkpoint_object(r, model) for r in rows], more)
