"""Ingestion jobs over the API, behind the bearer token: ``POST /jobs`` (a ``csv`` of
``url,id`` rows, or one or more image ``files``), ``GET /jobs/{id}``, ``GET /jobs``,
``DELETE /jobs/{id}``.

Everything a client sends is bounded before it costs much: the token is checked before
the body is read; the body as a whole by ``IMAGEFINDER_JOB_MAX_BYTES`` (``BodyLimits``);
the form by the number of files and fields as it is parsed, with file parts spooled to
disk beyond 64 KB; each file by the upload cap; a CSV by its bytes and rows; and the
jobs waiting at once by ``IMAGEFINDER_JOB_QUEUE``. Jobs run one at a time in the server
(``runner.py``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import PurePosixPath
from typing import Any

from fastapi import APIRouter, Query, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from ..catalog import id_problem, parse_catalog
from ..config import Settings
from ..errors import (
    InvalidRequest,
    JobFinished,
    JobTooLarge,
    TooLarge,
    TooManyJobs,
    unknown_job,
)
from ..jobs import StagedFile, files_source, new_job, staging_dir
from ..service import Service
from ..store.jobtable import FINISHED, Job
from .gate import gate_of
from .schemas import errors
from .writes import check_token

# File parts beyond this many bytes go to a temporary file while the form is parsed
# (Starlette keeps up to 1 MB of each in memory: a thousand files would be a gigabyte).
SPOOL_BYTES = 64 * 1024
# A form field (an ``id``) is short.
MAX_FIELD_BYTES = 1024


class TokenRoute(APIRoute):
    """Checks the token before FastAPI reads the body (no gate place: a job's upload
    may take a while and must not hold one)."""

    def get_route_handler(self) -> Any:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Any:
            check_token(request)
            return await handler(request)

        return checked


router = APIRouter(
    route_class=TokenRoute,
    dependencies=[Security(HTTPBearer(auto_error=False))],
    tags=["jobs"],
)

JOB_ERRORS = errors(
    _401="Missing or wrong bearer token",
    _403="Writes disabled: no IMAGEFINDER_API_TOKEN",
    _404="No job with this id",
)
JOB_EXAMPLE = {
    "id": "3f0c9a...",
    "state": "running",
    "total": 500,
    "done": 120,
    "skipped": 3,
    "failed": 1,
    "errors": [{"id": "cat-17", "reason": "HTTP 404"}],
    "created_at": "2026-11-29T19:00:00.000Z",
    "started_at": "2026-11-29T19:00:01.250Z",
    "finished_at": None,
}
JOB_BODY: dict[int | str, dict[str, Any]] = {
    200: {"description": "The job", "content": {"application/json": {"example": JOB_EXAMPLE}}}
}
POST_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "csv": {
                            "type": "string",
                            "format": "binary",
                            "description": "A CSV with a header 'url,id'",
                        },
                        "files": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "Images; ids from their file names",
                        },
                        "id": {
                            "type": "array",
                            "items": {"type": "string"},
                            "description": "An id per file, in order (optional)",
                        },
                    },
                }
            }
        },
    }
}


class _SmallSpool(MultiPartParser):
    spool_max_size = SPOOL_BYTES


def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


def _wake(request: Request) -> None:
    runner = getattr(request.app.state, "runner", None)
    if runner is not None:
        runner.wake()


async def _form(request: Request, settings: Settings) -> FormData:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequest("send multipart/form-data with a 'csv' file or 'files'")
    parser = _SmallSpool(
        request.headers,
        request.stream(),
        max_files=settings.job_max_files + 1,  # the csv
        max_fields=settings.job_max_files,
        max_part_size=MAX_FIELD_BYTES,
    )
    try:
        return await parser.parse()
    except MultiPartException as e:
        if "Too many files" in e.message:
            raise JobTooLarge(
                f"more than {settings.job_max_files:,} files in one job; split them"
            ) from None
        raise InvalidRequest(f"malformed form: {e.message}") from None


def _file_id(upload: UploadFile) -> str:
    """An uploaded file's id: its file name's stem (any client-side folder dropped)."""
    name = (upload.filename or "").replace("\\", "/")
    return PurePosixPath(name).stem if name else ""


def _check_csv(data: bytes, settings: Settings) -> tuple[str, int]:
    """The CSV's text and row count, or an error naming what is wrong with it."""
    if len(data) > settings.job_max_csv_bytes:
        raise TooLarge(f"CSV over the limit of {settings.job_max_csv_bytes:,} bytes")
    rows = parse_catalog(data, name="csv")  # a bad header or encoding: 400 now
    if not rows:
        raise InvalidRequest("the CSV has a header but no rows")
    if len(rows) > settings.job_max_rows:
        raise JobTooLarge(
            f"{len(rows):,} rows, over the limit of {settings.job_max_rows:,} per job; "
            "split the CSV",
            code="too_many_rows",
        )
    return data.decode("utf-8-sig"), len(rows)


def _stage(
    settings: Settings, job_id: str, files: list[UploadFile], ids: list[str]
) -> list[StagedFile]:
    """Copy the uploads to the job's staging folder (same filesystem as the catalogue
    folder: a file is later renamed into place, never copied twice)."""
    folder = staging_dir(settings, job_id)
    folder.mkdir(parents=True, exist_ok=True)
    staged = []
    try:
        for n, (upload, image_id) in enumerate(zip(files, ids, strict=True)):
            name = f"{n:06d}"
            upload.file.seek(0)
            with open(folder / name, "wb") as out:
                shutil.copyfileobj(upload.file, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
            staged.append(StagedFile(image_id, name))
    except OSError:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return staged


def _check_files(files: list[UploadFile], ids: list[str], settings: Settings) -> list[str]:
    if len(files) > settings.job_max_files:
        raise JobTooLarge(f"more than {settings.job_max_files:,} files in one job; split them")
    if ids and len(ids) != len(files):
        raise InvalidRequest(
            f"{len(ids)} ids for {len(files)} files; send one id per file, or none"
        )
    ids = ids or [_file_id(f) for f in files]
    seen: dict[str, int] = {}
    for n, (upload, image_id) in enumerate(zip(files, ids, strict=True)):
        shown = upload.filename or f"file {n + 1}"
        problem = id_problem(image_id)
        if problem:
            raise InvalidRequest(f"{shown}: {problem}", code="invalid_id")
        if image_id in seen:
            raise InvalidRequest(
                f"{shown}: id {image_id!r} also belongs to file {seen[image_id] + 1}",
                code="invalid_id",
            )
        seen[image_id] = n
        if (upload.size or 0) > settings.max_upload_bytes:
            raise TooLarge(f"{shown}: over the limit of {settings.max_upload_bytes:,} bytes")
        if not upload.size:
            raise InvalidRequest(f"{shown}: the file is empty")
    return ids


@router.post(
    "/jobs",
    status_code=202,
    responses={
        **errors(
            _400="The CSV cannot be read (header, encoding)",
            _401="Missing or wrong bearer token",
            _403="Writes disabled: no IMAGEFINDER_API_TOKEN",
            _413="Too many files or rows, a file over the upload cap, or the body over the job cap",
            _422="Neither 'csv' nor 'files', a bad id, or a malformed form",
            _429="Too many jobs queued or running",
            _503="The model cannot be loaded, or the server is busy",
        ),
        202: {
            "description": "The job, queued",
            "headers": {"Location": {"schema": {"type": "string"}, "description": "/jobs/{id}"}},
            "content": {"application/json": {"example": JOB_EXAMPLE}},
        },
    },
    openapi_extra=POST_BODY,
    summary="Start a job putting a catalogue (CSV of url,id) or uploaded images into the index",
)
async def post_job(request: Request) -> JSONResponse:
    service = _service(request)
    settings = service.settings
    form = await _form(request, settings)
    try:
        csv_part = form.get("csv")
        files = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
        ids = [i for i in form.getlist("id") if isinstance(i, str)]
        if isinstance(csv_part, UploadFile) == bool(files):
            raise InvalidRequest("send either a 'csv' file of url,id rows or one or more 'files'")
        if isinstance(csv_part, UploadFile):
            data = await csv_part.read(settings.job_max_csv_bytes + 1)
            source, count = _check_csv(data, settings)
            job = new_job("csv", count)
        else:
            ids = _check_files(files, ids, settings)
            job = new_job("files", len(files))
        table = service.store.jobs()
        # The first job may create the index, and loading the model is inference work.
        gate = gate_of(request)
        with gate.admit():
            await gate.run(service.ensure_index)
        if await run_in_threadpool(table.waiting) >= settings.job_queue:
            raise TooManyJobs(
                f"{settings.job_queue} jobs are queued or running; wait for one to finish"
            )
        if files:
            staged = await run_in_threadpool(_stage, settings, job.id, files, ids)
            source = files_source(staged)
        await run_in_threadpool(table.create, job, source)
    finally:
        await form.close()
    _wake(request)
    return JSONResponse(job.public(), status_code=202, headers={"Location": f"/jobs/{job.id}"})


def _job(service: Service, job_id: str) -> Job:
    job = service.store.jobs().get(job_id) if len(job_id) <= 64 else None
    if job is None:
        raise unknown_job(job_id)
    return job


@router.get(
    "/jobs/{job_id}",
    responses={**JOB_ERRORS, **JOB_BODY},
    summary="A job's state and counts, and its first 100 failures",
)
async def get_job(request: Request, job_id: str) -> JSONResponse:
    job = await run_in_threadpool(_job, _service(request), job_id)
    return JSONResponse(job.public())


@router.get(
    "/jobs",
    responses={
        **errors(
            _401="Missing or wrong bearer token",
            _403="Writes disabled: no IMAGEFINDER_API_TOKEN",
            _422="Invalid parameter",
        ),
        200: {
            "description": "The most recent jobs, newest first",
            "content": {"application/json": {"example": {"jobs": [JOB_EXAMPLE]}}},
        },
    },
    summary="The most recent jobs, newest first",
)
async def list_jobs(
    request: Request, limit: int = Query(50, ge=1, le=200, description="How many")
) -> JSONResponse:
    unknown = sorted(set(request.query_params) - {"limit"})
    if unknown:  # a misspelt parameter is an error, not silently the default
        raise InvalidRequest(f"unknown query parameter {unknown[0]!r}; this route takes 'limit'")
    jobs = await run_in_threadpool(_service(request).store.jobs().recent, limit)
    return JSONResponse({"jobs": [j.public() for j in jobs]})


@router.delete(
    "/jobs/{job_id}",
    responses={
        **JOB_ERRORS,
        **errors(_409="The job has already finished"),
        200: {
            "description": "Cancelled (a queued job), or cancelling (a running job stops "
            "after its current batch; what it indexed stays)",
            "content": {"application/json": {"example": JOB_EXAMPLE}},
        },
    },
    summary="Cancel a job",
)
async def cancel_job(request: Request, job_id: str) -> JSONResponse:
    service = _service(request)
    before = await run_in_threadpool(_job, service, job_id)
    if before.state in FINISHED:
        raise JobFinished(f"job {job_id} has already finished ({before.state})")
    job = await run_in_threadpool(service.store.jobs().cancel, job_id)
    if job is None:
        raise unknown_job(job_id)
    if job.state == "cancelled":
        await run_in_threadpool(shutil.rmtree, staging_dir(service.settings, job.id), True)
    _wake(request)
    return JSONResponse(job.public())
