"""Prometheus metrics of one gateway process (prometheus-client, text exposition format).

Each :class:`GatewayMetrics` has its own registry, so several gateways in one
process (tests) do not share counters. The gateway calls :meth:`observe` with
each message-log record (a ``ProxyContext`` observer).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from mxguard.storage.messagelog import LogRecord

#: Seconds; from a LAN delivery (milliseconds) to a slow filter or downstream (a minute).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

__all__ = ["GatewayMetrics", "CONTENT_TYPE_LATEST"]


class GatewayMetrics:
    """Counters and histograms fed from message-log records, plus gauges read at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.messages = Counter("mxguard_messages", "SMTP transactions by disposition",
                                ["disposition"], registry=r)
        self.by_direction = Counter("mxguard_messages_by_direction",
                                    "SMTP transactions by direction (inbound: from the internet; outbound: "
                                    "relayed for an organization) and disposition",
                                    ["direction", "disposition"], registry=r)
        self.relay_refusals = Counter("mxguard_relay_refusals", "Relay attempts refused, by reason "
                                      "(stranger, auth_failed, sender_domain, auth_required)", ["reason"], registry=r)
        self.inbound = Counter("mxguard_inbound_transactions", "Transactions by inbound TLS (STARTTLS used)",
                               ["tls"], registry=r)
        self.downstream = Counter("mxguard_downstream_connections",
                                  "Transactions with a downstream connection, by TLS and certificate verification",
                                  ["tls", "verified"], registry=r)
        self.total_seconds = Histogram("mxguard_transaction_seconds", "MAIL to final reply, seconds",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.connect_seconds = Histogram("mxguard_downstream_connect_seconds",
                                         "Downstream TCP connect + greeting + EHLO per transaction, seconds",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.relay_seconds = Histogram("mxguard_relay_seconds", "End of DATA to the downstream's final reply, seconds",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.smtp_refusals = Counter("mxguard_smtp_refusals", "Command lines the front door refused unread, "
                                     "by reason (bare_lf: a line ended by LF alone)", ["reason"], registry=r)
        self.engine_errors = Counter("mxguard_engine_errors", "Filtering engine errors", ["engine"], registry=r)
        self.config_generation = Gauge("mxguard_config_generation", "Configuration generation loaded",
                                       registry=r)
        self.spool_depth = Gauge("mxguard_spool_depth", "Messages held in the spool, by domain", ["domain"],
                                 registry=r)

    def relay_refusal(self, reason: str) -> None:
        """Count one refused relay attempt (``stranger``, ``auth_failed``, ``sender_domain``, ``auth_required``)."""
        self.relay_refusals.labels(reason).inc()

    def observe(self, record: LogRecord) -> None:
        """Count one finished transaction (never raises into the SMTP session)."""
        self.messages.labels(record.disposition).inc()
        self.by_direction.labels(record.direction, record.disposition).inc()
        self.inbound.labels("yes" if record.inbound_tls else "no").inc()
        if record.downstream_tls is not None:
            self.downstream.labels("yes" if record.downstream_tls else "no",
                                   "yes" if record.downstream_verified else "no").inc()
        if record.total_ms is not None:
            self.total_seconds.observe(record.total_ms / 1000)
        if record.connect_ms:
            self.connect_seconds.observe(record.connect_ms / 1000)
        if record.relay_ms is not None:
            self.relay_seconds.observe(record.relay_ms / 1000)

    def smtp_refusal(self, reason: str) -> None:
        """Count a command line the front door refused (called by the SMTP session)."""
        self.smtp_refusals.labels(reason).inc()

    def engine_error(self, engine: str) -> None:
        """Count an error of a filtering engine (called by the filter pipeline)."""
        self.engine_errors.labels(engine).inc()

    async def render(self, generation: Callable[[], Awaitable[int]] | None = None,
                     spool: Callable[[], Awaitable[dict[str, int] | None]] | None = None) -> bytes:
        """The exposition text; gauges are refreshed from the given callables first."""
        if generation is not None:
            self.config_generation.set(await generation())
        if spool is not None:
            depth = await spool()
            if depth is not None:
                self.spool_depth.clear()
                for domain, count in depth.items():
                    self.spool_depth.labels(domain).set(count)
        return generate_latest(self.registry)
