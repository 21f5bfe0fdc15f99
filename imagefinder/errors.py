"""Every error a user can act on, under one root with a stable ``code``.

The message says what went wrong and how to fix it; the ``code`` is what programs
key on (API clients, the web page, tests). Nothing here knows about HTTP or the
terminal: the server maps each code to a status in one table
(``server/app.py``), and the CLI prints the message as one line.
"""

from __future__ import annotations


class ImageFinderError(Exception):
    """Root of the package's errors. ``code`` names the problem, ``message`` the fix."""

    code = "error"

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message


class ConfigError(ImageFinderError):
    """A setting (``IMAGEFINDER_*`` or an option) has a value that cannot work."""

    code = "invalid_setting"


class CatalogError(ImageFinderError):
    """The catalogue CSV as a whole cannot be used (bad header, not text)."""

    code = "invalid_catalog"


class InvalidRequest(ImageFinderError):
    """A request parameter is out of range or malformed (codes ``invalid_request``,
    ``invalid_id``)."""

    code = "invalid_request"


class ImageError(ImageFinderError):
    """The input cannot be used as an image."""

    code = "not_an_image"


class NotAnImage(ImageError):
    pass


class EmptyUpload(ImageError):
    code = "empty_upload"


class TooLarge(ImageError):
    """More bytes than the cap allows."""

    code = "too_large"


class TooManyPixels(ImageError):
    """More pixels than the cap, or more memory to decode than the cap allows."""

    code = "too_many_pixels"


class TooComplex(ImageError):
    """A file whose structure (segments, scans) would cost far more CPU than its pixels."""

    code = "too_complex"


class Busy(ImageFinderError):
    """The server cannot take this work now (every decoding slot taken and the queue
    full, or a duplicate report already being computed): try again shortly."""

    code = "busy"

    def __init__(self, message: str, *, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class TooManyJobs(ImageFinderError):
    """The server already holds as many queued and running jobs as it takes."""

    code = "too_many_jobs"


class JobTooLarge(ImageFinderError):
    """A job's source is over a limit: too many files (``too_many_files``) or CSV rows
    (``too_many_rows``)."""

    code = "too_many_files"


class JobFinished(ImageFinderError):
    """The job has finished: there is nothing left to cancel."""

    code = "job_finished"


class ModelUnavailable(ImageFinderError):
    """The model's weights cannot be loaded."""

    code = "model_unavailable"


class TextNotSupported(ImageFinderError):
    """A text query to an index whose model embeds images only."""

    code = "text_not_supported"


class NotCalibrated(ImageFinderError):
    """A duplicate level that needs a distance threshold the index's model (or its
    weights) has never been calibrated for."""

    code = "not_calibrated"


class StoreError(ImageFinderError):
    """The index cannot be opened, read or written."""

    code = "index_unusable"


class IndexMismatch(StoreError):
    """Vectors of another model, weights or preprocessing would be mixed into an index."""


class IndexNotReady(ImageFinderError):
    """There is no index yet (``index_missing``), or it holds no vectors (``index_empty``)."""

    code = "index_missing"


class NotFound(ImageFinderError):
    """An id that is not in the index (``unknown_id``), or whose file is gone
    (``file_missing``)."""

    code = "unknown_id"


class UnknownIndex(NotFound):
    """A request names an index the server does not serve."""

    code = "unknown_index"


class Unauthorized(ImageFinderError):
    """A write without the right bearer token."""

    code = "unauthorized"


class WritesDisabled(ImageFinderError):
    """A write to a server that has no token configured."""

    code = "writes_disabled"


class MetricsDisabled(ImageFinderError):
    """``GET /metrics`` behind the token, on a server that has no token configured."""

    code = "metrics_disabled"


class RemoteError(ImageFinderError):
    """A server asked over HTTP (``search --server``) could not be reached, or did not
    answer like an ImageFinder server. Its own error answers keep their codes."""

    code = "remote_error"


def unknown_id(image_id: str) -> NotFound:
    """The one "unknown id" error, wherever an id is looked up."""
    return NotFound(f"no image with id {image_id!r} in the index")


def unknown_job(job_id: str) -> NotFound:
    return NotFound(
        f"no job with id {job_id!r}; GET /jobs lists the recent ones", code="unknown_job"
    )
