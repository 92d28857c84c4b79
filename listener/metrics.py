"""The listener's Prometheus metrics and the HTTP endpoint that serves them.

Counters of what this process sees (associations, instances, bytes, refusals, rejections) live
in a registry of the ``Listener`` instance rather than prometheus_client's global one, so several
listeners in one process (the tests) never collide. The same endpoint also serves
``listener.worklist_gauges.WorklistCollector``: queue depth and the worker-side figures read from
the worklist. Label values are bounded sets (outcome names, status codes, reason kinds), never UIDs
or AE titles, so the series count stays fixed however many scanners and studies there are.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

log = logging.getLogger("hrct.listener")

# A-ASSOCIATE-RJ (source, diagnostic) pairs (PS3.8 9.3.4) as metric label values.
REJECTION_KINDS = {
    (1, 2): "application_context",
    (1, 3): "calling_ae",
    (1, 7): "called_ae",
    (2, 1): "user_identity",
    (3, 1): "congestion",
    (3, 2): "association_limit",
}


def rejection_kind(source: int, diagnostic: int) -> str:
    return REJECTION_KINDS.get((source, diagnostic), "other")


class ListenerMetrics:
    """What the Storage SCP counts; the handlers call these as events happen."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.associations = Counter(
            "hrct_associations",
            "Associations by how they ended (released, aborted, closed, rejected).",
            ["outcome"],
            registry=self.registry,
        )
        self.rejections = Counter(
            "hrct_association_rejections",
            "Associations refused with A-ASSOCIATE-RJ, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.instances = Counter(
            "hrct_instances_received",
            "Instances acknowledged with success (fsynced and in the worklist).",
            registry=self.registry,
        )
        self.received_bytes = Counter(
            "hrct_received_bytes",
            "Data set bytes of the instances acknowledged with success.",
            registry=self.registry,
        )
        self.refusals = Counter(
            "hrct_store_refusals",
            "C-STOREs answered with a failure status, by status and reason.",
            ["status", "reason"],
            registry=self.registry,
        )
        self.open_associations = Gauge(
            "hrct_associations_open", "Associations open now.", registry=self.registry
        )

    def track_open_associations(self, count: Callable[[], float]) -> None:
        """Read the open associations from the listener's own table at scrape time, so the
        gauge cannot drift from it when a close event is missed."""
        self.open_associations.set_function(count)


class MetricsServer:
    """``/metrics`` over HTTP on its own thread; a port clash is logged, never fatal, because
    receiving studies matters more than being observed receiving them."""

    def __init__(self, registry: CollectorRegistry, address: str, port: int) -> None:
        self.registry = registry
        self.address = address
        self.requested_port = port
        self.port: int | None = None
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        try:
            self._server, self._thread = start_http_server(
                self.requested_port, addr=self.address, registry=self.registry
            )
        except OSError as error:
            log.error(
                "metrics endpoint not started on %s:%d: %s (HRCT_METRICS_PORT)",
                self.address,
                self.requested_port,
                error.strerror,
            )
            return
        self.port = int(self._server.server_address[1])
        log.info("metrics on http://%s:%d/metrics", self.address, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
