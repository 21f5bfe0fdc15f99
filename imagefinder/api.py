"""The HTTP API. Routes are thin: decoding, embedding and KNN live in ``service``.

Every error, including FastAPI's own validation errors, leaves in one shape:
``{"error": {"status": 413, "code": "too_large", "message": "..."}}``.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager, suppress
from typing import Annotated

from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__
from .config import Settings
from .embed import ModelUnavailable
from .images import ImageError
from .service import Service, ServiceError
from .store import StoreError

log = logging.getLogger("imagefinder")

# Multipart framing and the small form fields ride on top of the file itself.
BODY_SLACK = 64 * 1024


class Neighbour(BaseModel):
    id: str
    distance: float


class SearchResponse(BaseModel):
    model: str
    metric: str
    results: list[Neighbour]


class ErrorDetail(BaseModel):
    status: int
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: str
    index: str
    model: str | None = None
    metric: str | None = None
    dim: int | None = None
    vectors: int = 0
    model_loaded: bool = False
    detail: str | None = None


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"status": status, "code": code, "message": message}}, status_code=status
    )


ERRORS = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "Not an image, or a corrupt or truncated one",
        413: "Upload over the byte cap or the pixel cap",
        422: "Invalid parameter",
        503: "The index is missing or empty",
    }.items()
}


class _BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    """Refuse bodies over the cap while they stream in, never buffering them whole."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            response = error_response(413, "too_large", self._message())
            return await response(scope, receive, send)
        seen = 0
        too_large = started = False

        async def limited_receive():
            nonlocal seen, too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    too_large = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message):
            nonlocal started
            if too_large:
                return  # whatever the app makes of the aborted body, ours is the answer
            started = started or message["type"] == "http.response.start"
            await send(message)

        with suppress(_BodyTooLarge):
            await self.app(scope, limited_receive, guarded_send)
        if too_large and not started:
            await error_response(413, "too_large", self._message())(scope, receive, send)

    def _message(self) -> str:
        return f"request body over the limit of {self.max_bytes - BODY_SLACK:,} bytes"


def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


async def read_upload(file: UploadFile, service: Service) -> bytes:
    cap = service.settings.max_upload_bytes
    data = await file.read(cap + 1)
    if len(data) > cap:
        raise ServiceError(413, "too_large", f"upload over the limit of {cap:,} bytes")
    if not data:
        raise ServiceError(400, "empty_upload", "the uploaded file is empty")
    return data


def search_response(service: Service, results: list[tuple[str, float]]) -> dict:
    meta = service.store.meta()
    return {
        "model": meta.get("model", ""),
        "metric": meta.get("metric", ""),
        "results": [{"id": i, "distance": d} for i, d in results],
    }


def create_app(settings: Settings | None = None, service: Service | None = None) -> FastAPI:
    settings = settings or (service.settings if service else Settings.from_env())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        svc = service or Service(settings)
        app.state.service = svc
        # Load the model once, now, if the index says which one; otherwise on the
        # first search after an index appears.
        try:
            await run_in_threadpool(svc.load_model)
        except (StoreError, ModelUnavailable) as e:
            # A database server still starting, or a weights file gone: serve anyway,
            # loudly; searches answer 503 with this message until it is fixed.
            log.error("cannot serve searches yet: %s", e)
        try:
            yield
        finally:
            svc.close()

    app = FastAPI(
        title="ImageFinder",
        version=__version__,
        description="Find the catalogue images that look most like an uploaded photo.",
        lifespan=lifespan,
    )
    if service is not None:
        app.state.service = service

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError):
        return error_response(exc.status, exc.code, exc.message)

    @app.exception_handler(ImageError)
    async def _image_error(request: Request, exc: ImageError):
        return error_response(exc.status, exc.code, str(exc))

    @app.exception_handler(ModelUnavailable)
    async def _model_unavailable(request: Request, exc: ModelUnavailable):
        return error_response(503, "model_unavailable", str(exc))

    @app.exception_handler(StoreError)
    async def _store_error(request: Request, exc: StoreError):
        return error_response(503, "index_unusable", str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query"))
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return error_response(422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal error; see the server log")

    @app.post(
        "/similarity-search",
        response_model=SearchResponse,
        responses=ERRORS,
        summary="The k catalogue images nearest to an uploaded image",
    )
    async def similarity_search(
        service: ServiceDep,
        file: Annotated[UploadFile, File(description="An image (JPEG, PNG, GIF, WebP, BMP, TIFF)")],
        k: Annotated[int, Form(ge=1, le=100, description="How many neighbours")] = 3,
    ):
        data = await read_upload(file, service)
        results = await run_in_threadpool(service.search_bytes, data, k)
        return search_response(service, results)

    @app.get("/health", response_model=Health, summary="Status, model and vector count")
    async def health(service: ServiceDep):
        return await run_in_threadpool(service.health)

    from .writes import router as writes_router  # here: writes imports from this module

    app.include_router(writes_router)

    from .web import install as install_web  # here too: web imports from this module

    install_web(app)

    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes + BODY_SLACK)
    return app
