"""``GET /metrics``: the Prometheus text format, through ``prometheus_client``.

What it counts:

- ``imagefinder_http_requests_total{method, route, status}`` and
  ``imagefinder_http_request_duration_seconds{method, route, status}`` (a histogram);
  ``route`` is the route's template (``/images/{image_id}``), never the raw path, and
  unknown methods count as ``other``, so no client can grow the label sets.
- ``imagefinder_decode_refusals_total{reason}``: uploads refused as images, by error code
  (``not_an_image``, ``empty_upload``, ``too_large``, ``too_many_pixels``).
- ``imagefinder_inference_batch_size`` (a histogram of images per forward) and
  ``imagefinder_inference_queue_depth`` (requests waiting for the model).
- ``imagefinder_index_vectors{name, index, model}`` and ``imagefinder_model_loaded{name}``,
  for every index the server serves (``IMAGEFINDER_DB`` may name several).

Access (``IMAGEFINDER_METRICS``): ``token`` (the default) needs the API token, like the
writes; ``public`` opens it; ``off`` removes the route. Each app has a registry of its
own, so two apps in one process (tests) never mix their counts. With several uvicorn
workers, each answers for itself.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator

from fastapi import FastAPI, Request
from fastapi.security.utils import get_authorization_scheme_param
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.utils import floatToGoString
from starlette.responses import Response

from ..config import Settings
from ..errors import ImageError, ImageFinderError, MetricsDisabled, StoreError, Unauthorized

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def _codes(cls: type[ImageFinderError]) -> set[str]:
    return {cls.code} | {code for sub in cls.__subclasses__() for code in _codes(sub)}


# The error codes that mean "this upload is not an image we accept".
REFUSAL_CODES = frozenset(_codes(ImageError))


class Metrics:
    """The counters one app updates, and the registry ``/metrics`` renders."""

    def __init__(self, app: FastAPI):
        self.registry = CollectorRegistry(auto_describe=False)
        labels = ("method", "route", "status")
        self.requests = Counter(
            "imagefinder_http_requests",
            "HTTP requests answered, by method, route template and status.",
            labels,
            registry=self.registry,
        )
        self.latency = Histogram(
            "imagefinder_http_request_duration_seconds",
            "Time from a request's arrival to the end of its answer.",
            labels,
            registry=self.registry,
        )
        self.refusals = Counter(
            "imagefinder_decode_refusals",
            "Uploads refused as images, by reason (the error code).",
            ("reason",),
            registry=self.registry,
        )
        for code in sorted(REFUSAL_CODES):
            self.refusals.labels(code)  # every reason shows, at 0, from the start
        self.registry.register(ServiceCollector(app))

    def observe(self, method: str, route: str, status: int, seconds: float, code: str) -> None:
        method = method if method in METHODS else "other"
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route, str(status)).observe(seconds)
        if code in REFUSAL_CODES:
            self.refusals.labels(code).inc()


class ServiceCollector:
    """What the service knows, read at scrape time: the index and the model's batcher."""

    def __init__(self, app: FastAPI):
        self.app = app

    def describe(self) -> list[Metric]:
        return []  # read at scrape time only (registering must not touch the index)

    def collect(self) -> Iterator[Metric]:
        indexes = getattr(self.app.state, "indexes", None)
        services = list(indexes) if indexes is not None else []
        vectors = GaugeMetricFamily(
            "imagefinder_index_vectors",
            "Vectors in each index.",
            labels=("name", "index", "model"),
        )
        loaded = GaugeMetricFamily(
            "imagefinder_model_loaded", "1 once the index's model is loaded.", labels=("name",)
        )
        depth = GaugeMetricFamily(
            "imagefinder_inference_queue_depth", "Requests waiting for the model."
        )
        sizes = HistogramMetricFamily(
            "imagefinder_inference_batch_size", "Images per forward pass of the model."
        )
        counts: dict[int, int] = {}
        waiting = 0
        for service in services:
            try:
                meta = service.store.meta()
                if meta:
                    labels = (service.name, service.store.location, meta.get("model", ""))
                    vectors.add_metric(labels, service.store.count())
            except StoreError:
                pass  # /health says why; the scrape still answers
            batcher = getattr(service.embedder, "batcher", None)
            loaded.add_metric((service.name,), 1 if service.embedder is not None else 0)
            if batcher is not None:
                waiting += batcher.queue_depth()
                for size, n in batcher.batch_sizes().items():
                    counts[size] = counts.get(size, 0) + n
        # Each index's model has its own inference thread: the server's queue is the sum.
        depth.add_metric((), waiting)
        buckets: list[tuple[str, float]] = []
        for bound in BATCH_BUCKETS:
            buckets.append(
                (floatToGoString(bound), sum(n for size, n in counts.items() if size <= bound))
            )
        buckets.append(("+Inf", sum(counts.values())))
        sizes.add_metric((), buckets, sum(size * n for size, n in counts.items()))
        yield from (vectors, loaded, depth, sizes)


def _check_token(request: Request, settings: Settings) -> None:
    if not settings.api_token:
        raise MetricsDisabled(
            "/metrics needs the API token, and none is set: set IMAGEFINDER_API_TOKEN "
            "and scrape with it, or IMAGEFINDER_METRICS=public to open it"
        )
    scheme, given = get_authorization_scheme_param(request.headers.get("Authorization"))
    if scheme.lower() != "bearer" or not given:
        raise Unauthorized(
            "missing bearer token: send 'Authorization: Bearer <IMAGEFINDER_API_TOKEN>'"
        )
    if not hmac.compare_digest(given.encode(), settings.api_token.encode()):
        raise Unauthorized("wrong bearer token")


def install(app: FastAPI, settings: Settings) -> Metrics | None:
    """Add ``GET /metrics`` (unless ``IMAGEFINDER_METRICS=off``); the counters it shows."""
    if settings.metrics == "off":
        return None
    metrics = Metrics(app)

    async def scrape(request: Request) -> Response:
        if settings.metrics != "public":
            _check_token(request, settings)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_api_route("/metrics", scrape, methods=["GET"], include_in_schema=False, name="metrics")
    return metrics
