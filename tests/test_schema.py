"""Schemathesis against the app's own OpenAPI schema, in-process (ASGI, no network),
over a small real index (embedded with the tests' fake model): generated requests, valid and invalid, to every operation.

No answer may be a 5xx, and every answer must match what the schema promises
(status codes, content types, bodies, headers). Bounded: 25 examples per operation.
"""

from __future__ import annotations

import fake_model
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode, checks
from support import image_bytes

from imagefinder.config import Settings
from imagefinder.indexer import index_folder
from imagefinder.server.app import create_app
from imagefinder.service import Service
from imagefinder.store import open_store

TOKEN = "schema-test-token"
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
    checks.negative_data_rejection,
]


@pytest.fixture(scope="module")
def app(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("schema")
    folder = root / "images"
    (folder / "sub").mkdir(parents=True)
    (folder / "red.jpg").write_bytes(image_bytes((80, 60), (220, 30, 30)))
    (folder / "green.png").write_bytes(image_bytes((60, 80), (30, 200, 40), fmt="PNG"))
    (folder / "sub" / "blue.gif").write_bytes(image_bytes((64, 64), (20, 40, 230), fmt="GIF"))
    settings = Settings(
        db=str(root / "index.db"),
        images_dir=str(folder),
        model=fake_model.NAME,
        api_token=TOKEN,
        max_upload_bytes=256 * 1024,
    )
    store = open_store(settings.db)
    assert index_folder(folder, store, model).indexed == 3
    store.close()
    service = Service(settings)
    service.embedder = model
    yield create_app(service=service)
    service.close()


def failures_of(app, mode: GenerationMode, headers: dict, examples: int) -> list[str]:
    """Run every operation of the app's schema; one line per operation that broke."""
    # Schemathesis' own pytest integration predates pytest 9, so Hypothesis drives it here.
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    broken = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {
        "POST /similarity-search",
        "GET /health",
        "POST /images",
        "DELETE /images/{image_id}",
    }
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(case):
            case.call_and_validate(headers=headers, checks=CHECKS)

        try:
            run()
        except Unsatisfiable:
            pass  # no invalid request exists (no parameters, or any string is a valid path)
        except Exception as e:  # a check failed: keep going, report every operation
            broken.append(f"{operation.label} ({mode.value}): {e}")
    return broken


@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda m: m.value)
def test_no_operation_answers_5xx_or_breaks_its_schema(app, mode):
    broken = failures_of(app, mode, {"Authorization": f"Bearer {TOKEN}"}, examples=25)
    assert not broken, "\n\n".join(broken)


def test_without_the_token_nothing_breaks_either(app):
    broken = failures_of(app, GenerationMode.POSITIVE, {}, examples=10)
    assert not broken, "\n\n".join(broken)
