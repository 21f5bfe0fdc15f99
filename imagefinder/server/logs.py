"""The server's log: one line per request (method, route, status, duration and the
request id also sent back in ``X-Request-ID``), as text or, with
``IMAGEFINDER_LOG_FORMAT=json``, one JSON object per line, uvicorn's own lines included.

Every record logged while a request is handled (an error's traceback too) carries that
request's id, through a context variable set by the middleware (``observe.py``).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar
from typing import Any

from ..config import Settings

REQUEST_LOGGER = "imagefinder.request"
# The fields of a request line, in the order the text format shows them.
REQUEST_FIELDS = ("method", "path", "route", "status", "duration_ms", "client", "code")
request_id: ContextVar[str | None] = ContextVar("imagefinder_request_id", default=None)

# uvicorn's own loggers: in JSON mode they speak JSON too. Its access log is switched
# off: the request line here says everything it did, and more.
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error")


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id.get()
        return True


def _escape(text: str) -> str:
    """A client-chosen path can hold anything: one log line stays one line."""
    return text.encode("unicode_escape").decode("ascii").replace('"', '\\"')


class TextFormatter(logging.Formatter):
    """``INFO:     POST /similarity-search 200 12.3ms route=... id=...``, like uvicorn's."""

    def format(self, record: logging.LogRecord) -> str:
        fields = record.__dict__
        if fields.get("status") is not None:
            line = (
                f'"{fields["method"]} {_escape(fields["path"])}" {fields["status"]} '
                f"{fields['duration_ms']:.1f}ms route={fields['route']} client={fields['client']}"
            )
            if fields.get("code"):
                line += f" code={fields['code']}"
        else:
            line = record.getMessage()
        rid = getattr(record, "request_id", None)
        if rid:
            line += f" id={rid}"
        prefix = f"{record.levelname}:".ljust(10)
        text = prefix + line
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the request fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in (*REQUEST_FIELDS, "request_id"):
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def formatter(settings: Settings) -> logging.Formatter:
    return JsonFormatter() if settings.log_format == "json" else TextFormatter()


def configure(settings: Settings) -> None:
    """Send the package's records to stderr in the configured format, unless logging is
    configured already (an application embedding the app, pytest): then they propagate
    to its handlers. Switch uvicorn's access log off and, for JSON, give uvicorn's
    handlers the JSON formatter."""
    logger = logging.getLogger("imagefinder")
    for old in [h for h in logger.handlers if getattr(h, "_imagefinder", False)]:
        logger.removeHandler(old)
    if not logger.handlers and not logging.getLogger().handlers:
        ours = logging.StreamHandler(sys.stderr)
        ours._imagefinder = True  # type: ignore[attr-defined]
        ours.setFormatter(formatter(settings))
        logger.addHandler(ours)
        # Without root handlers nothing else prints them; no duplicates either way.
        logger.propagate = False
    # On the logger too: records logged on it reach other handlers (an application's,
    # pytest's) with their request id as well.
    for where in (logger, *logger.handlers):
        if not any(isinstance(f, RequestIdFilter) for f in where.filters):
            where.addFilter(RequestIdFilter())
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    logging.getLogger("uvicorn.access").disabled = True
    if settings.log_format == "json":
        for name in UVICORN_LOGGERS:
            for uvicorn_handler in logging.getLogger(name).handlers:
                uvicorn_handler.setFormatter(JsonFormatter())
                uvicorn_handler.addFilter(RequestIdFilter())


def uvicorn_log_config(settings: Settings) -> dict[str, Any]:
    """uvicorn's logging configuration for ``imagefinder serve``: its lines in the
    configured format, and no access log (the request line replaces it)."""
    fmt = "imagefinder.server.logs.JsonFormatter" if settings.log_format == "json" else None
    default: dict[str, Any] = (
        {"()": fmt}
        if fmt
        else {"()": "uvicorn.logging.DefaultFormatter", "fmt": "%(levelprefix)s %(message)s"}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": default},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "stream": "ext://sys.stderr",
            }
        },
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": "INFO", "propagate": False},
            "uvicorn.error": {"level": "INFO"},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        },
    }
