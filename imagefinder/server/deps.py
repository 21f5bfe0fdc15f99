"""What routes share: the service behind the app, uploads read under the cap, and the
one error body."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from ..errors import EmptyUpload, TooLarge
from ..indexes import Indexes
from ..service import Found, Service


# async: FastAPI runs a plain-def dependency in the thread pool, which a flood of requests
# can fill; these must never wait behind one (/health depends on them).
async def get_indexes(request: Request) -> Indexes:
    indexes: Indexes = request.app.state.indexes
    return indexes


async def get_service(request: Request) -> Service:
    """The default index's service (routes that take no ``index``)."""
    indexes: Indexes = request.app.state.indexes
    return indexes.default


IndexesDep = Annotated[Indexes, Depends(get_indexes)]
ServiceDep = Annotated[Service, Depends(get_service)]


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"status": status, "code": code, "message": message}}, status_code=status
    )


async def read_upload(file: UploadFile, service: Service) -> bytes:
    cap = service.settings.max_upload_bytes
    data = await file.read(cap + 1)
    if len(data) > cap:
        raise TooLarge(f"upload over the limit of {cap:,} bytes")
    if not data:
        raise EmptyUpload("the uploaded file is empty")
    return data


async def answer(service: Service, search: Callable[..., Found], *args: Any) -> dict[str, Any]:
    """Run ``search`` and describe its results (both read the index) off the event loop."""
    return await run_in_threadpool(lambda: service.response(search(*args)))
