"""The indexes one server serves (``IMAGEFINDER_DB``), one ``Service`` each, by name."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

from .config import Settings
from .errors import ModelUnavailable, StoreError, UnknownIndex
from .service import Service

log = logging.getLogger("imagefinder")


class Indexes:
    """The indexes a server serves, by name (``IMAGEFINDER_DB``); the first is the default."""

    def __init__(self, settings: Settings, services: Sequence[Service] = ()):
        self.settings = settings
        self._services = {s.name: s for s in services} or {
            name: Service(settings, name=name, location=location)
            for name, location in settings.indexes
        }

    @property
    def default(self) -> Service:
        return next(iter(self._services.values()))

    def get(self, name: str | None = None) -> Service:
        if not name:
            return self.default
        try:
            return self._services[name]
        except KeyError:
            raise UnknownIndex(
                f"no index named {name!r} on this server; choose one of: "
                f"{', '.join(self._services)}"
            ) from None

    def __iter__(self) -> Iterator[Service]:
        return iter(self._services.values())

    def __len__(self) -> int:
        return len(self._services)

    def load_models(self) -> list[tuple[str, Exception]]:
        """Load every index's model now; the problems, by index name (served anyway)."""
        problems: list[tuple[str, Exception]] = []
        for service in self:
            try:
                service.load_model()
            except (StoreError, ModelUnavailable) as e:
                problems.append((service.name, e))
        return problems

    def warm(self) -> None:
        """Read each index's search structures into memory (``Store.warm``). A server
        runs this in the background at start-up: searches are answered meanwhile, the
        first ones at disk speed. A failure only costs speed, so it is logged."""
        for service in self:
            start = time.perf_counter()
            try:
                read = service.store.warm()
            except Exception as e:  # noqa: BLE001 (warming is an optimisation)
                log.warning("could not warm index %r: %s", service.name, e)
                continue
            if read:
                log.info(
                    "index %r warm: %.0f MB of its inverted file read in %.1f s",
                    service.name,
                    read / 1e6,
                    time.perf_counter() - start,
                )

    def health(self, public: bool = False) -> dict[str, Any]:
        """The default index's health at the top level (as with one index), and every
        index's under ``indexes``."""
        each = [{"name": s.name, **(s.public_health() if public else s.health())} for s in self]
        top = {k: v for k, v in each[0].items() if k != "name"}
        return {**top, "indexes": each}

    def public_health(self) -> dict[str, Any]:
        """``health()`` as an anonymous client may see it (``Service.public_health``)."""
        return self.health(public=True)

    def close(self) -> None:
        for service in self:
            service.close()
