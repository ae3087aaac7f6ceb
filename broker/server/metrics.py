"""Prometheus metrics, read from the broker's own counters when scraped.

Nothing here runs on the delivery path: the router, the server and the backplane keep plain
integer counters they need anyway (or one addition per read or write of a connection, never
per message), and `Collector.collect` turns them into metric families at scrape time. Every
metric is listed with its meaning in docs/operations.md; a test checks that the two agree.
"""

from __future__ import annotations

import gc
import time
from collections import deque
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector as _Collector

from .. import __version__
from ..errors import CloseCode, ErrorCode
from .handshake import REFUSAL_STATUSES

# Upper bounds of the queue-bytes histogram: what a connection has waiting (in the broker and
# in its transport) when scraped.
QUEUE_BUCKETS = (0, 1 << 10, 16 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20)
# Upper bounds (s) of the garbage collector's pauses.
GC_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
# Upper bounds (s) of the event-loop lag histogram: how late the periodic sweep ran.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# The dashboard shows the worst lag of this many seconds.
RECENT_LAG_S = 5.0


class LoopLag:
    """How late the event loop ran the server's periodic sweep, each time it ran (a few times a
    second): a histogram that only grows, so that any number of scrapers (and a curl) read the
    same values, and the worst of the last RECENT_LAG_S seconds for the dashboard. Sans-I/O:
    the caller gives the loop's time."""

    __slots__ = ("counts", "count", "sum", "_recent")

    def __init__(self) -> None:
        self.counts = [0] * len(LAG_BUCKETS)  # per bucket, not cumulative
        self.count = 0
        self.sum = 0.0
        self._recent: deque[tuple[float, float]] = deque(maxlen=64)  # (time, lag)

    def observe(self, lag: float, now: float) -> None:
        lag = max(0.0, lag)
        self.count += 1
        self.sum += lag
        for i, bound in enumerate(LAG_BUCKETS):
            if lag <= bound:
                self.counts[i] += 1
                break
        self._recent.append((now, lag))

    def worst_recent(self, now: float) -> float:
        """The most the sweep ran late within the last RECENT_LAG_S seconds before `now`."""
        return max((lag for at, lag in self._recent if now - at <= RECENT_LAG_S), default=0.0)

    def buckets(self) -> list[tuple[str, int]]:
        """Cumulative (le, count) pairs, +Inf last, as a Prometheus histogram has them."""
        out, total = [], 0
        for bound, count in zip(LAG_BUCKETS, self.counts):
            total += count
            out.append((repr(bound), total))
        out.append(("+Inf", self.count))
        return out


class GcPauses:
    """How long each run of Python's garbage collector held the process (the event loop with
    it), by generation: a histogram per generation, from `gc.callbacks`. A collection runs
    every few thousand allocations at most, so this costs two clock reads per collection,
    nothing per message."""

    def __init__(self) -> None:
        self.counts = [[0] * len(GC_BUCKETS) for _ in range(3)]
        self.count = [0, 0, 0]
        self.sum = [0.0, 0.0, 0.0]
        self._started = 0.0
        self._installed = False

    def install(self) -> None:
        """Start measuring (once per process)."""
        if not self._installed:
            self._installed = True
            gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        generation = min(2, max(0, int(info.get("generation", 0))))
        pause = time.perf_counter() - self._started
        self.count[generation] += 1
        self.sum[generation] += pause
        for i, bound in enumerate(GC_BUCKETS):
            if pause <= bound:
                self.counts[generation][i] += 1
                break

    def family(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(
            "broker_gc_pause_seconds",
            "how long each garbage collection held the process, by generation",
            labels=["generation"],
        )
        for generation in range(3):
            buckets, total = [], 0
            for bound, count in zip(GC_BUCKETS, self.counts[generation]):
                total += count
                buckets.append((repr(bound), total))
            buckets.append(("+Inf", self.count[generation]))
            family.add_metric([str(generation)], buckets, self.sum[generation])
        return family


GC_PAUSES = GcPauses()  # the process's one: gc.callbacks belong to the process


class Collector(_Collector):
    """Metric families of one Server, computed when Prometheus scrapes."""

    def __init__(self, server) -> None:
        self.server = server
        # process_*: resident and virtual memory, CPU seconds, open descriptors and their limit
        # (the limit caps the connections), start time; read from /proc when scraped (Linux)
        self.process = ProcessCollector(registry=None)
        GC_PAUSES.install()

    def collect(self) -> Iterator[Metric]:
        server = self.server
        stats = server.router.stats
        yield _gauge("broker_info", "the broker's version and fast path", 1, labels={"version": __version__, "fastpath": server.fastpath})
        yield _gauge("broker_connections", "connections open now (WebSocket and fallback streams)", len(server.connections))
        yield _gauge(
            "broker_connections_limit", "max_connections: connections the broker holds at once at most", server.config.max_connections
        )
        yield _counter(
            "broker_connections_opened",
            "connections that completed the handshake (WebSocket upgrades and new fallback streams)",
            server.opened,
        )
        yield _by(
            "broker_connections_closed_by_broker",
            "connections the broker closed, by close code",
            "code",
            _known(CloseCode, stats.closes),
            counter=True,
        )
        yield _by(
            "broker_handshakes_refused",
            "upgrade requests refused, by HTTP status",
            "status",
            _known(REFUSAL_STATUSES, server.refused_by_status),
            counter=True,
        )
        yield _counter("broker_bytes_in", "bytes read from client connections (WebSocket frames, after the handshake)", server.bytes_in)
        yield _counter("broker_bytes_out", "bytes written to client connections", server.bytes_out)
        yield _counter(
            "broker_writes",
            "writes to client connections (each one or more WebSocket frames: everything a connection gets in one loop iteration)",
            server.writes,
        )
        yield _counter("broker_ticks", "loop iterations that delivered or wrote something", server.ticks)
        yield _counter(
            "broker_messages_published", "messages accepted from this node's publishers (its clients and the admin API)", stats.published
        )
        yield _counter("broker_messages_delivered", "messages queued to subscribers (one per message per subscriber)", stats.delivered)
        yield _counter("broker_batches", "topic batches encoded (one per topic per tick with subscribers)", stats.batches)
        yield _counter("broker_messages_replayed", "messages sent from history (recovery and last values)", stats.replayed)
        yield _by(
            "broker_gaps",
            "gap notices sent, by cause: history (recovery past what history holds), ended (an epoch ended), backplane (a cluster node did not get messages from Redis)",
            "cause",
            stats.gap_causes,
            counter=True,
        )
        yield _by(
            "broker_recoveries",
            "subscriptions with since or last, by outcome: complete, awaited (a cluster node waits for a position it has not reached), or the cause of the first gap they got (history, ended)",
            "outcome",
            {"complete": 0, "awaited": 0, "history": 0, "ended": 0, **stats.recoveries},
            counter=True,
        )
        yield _counter("broker_duplicates", "publishes dropped as repeats of a msg_id", stats.duplicates)
        yield _by("broker_errors", "err replies sent, by error code", "code", _known(ErrorCode, stats.errors), counter=True)
        yield _counter("broker_denied", "subscribes, publishes and requests refused for want of a grant", stats.denied)
        yield _counter("broker_rate_limited", "publishes and requests refused by a rate limit (err 15)", stats.errors.get(15, 0))
        yield _by(
            "broker_slow_consumer_events",
            "connections behind max_pending_bytes, by outcome: disconnect (closed as slow consumers, policy disconnect), shed (their queue shed, policy drop or conflate)",
            "outcome",
            {"disconnect": stats.slow_consumers, "shed": stats.sheds},
            counter=True,
        )
        yield _counter(
            "broker_messages_dropped", "messages dropped for connections behind (policy drop), each announced by a gap", stats.dropped
        )
        yield _counter(
            "broker_messages_conflated",
            "messages skipped for connections behind (policy conflate), each announced by a gap",
            stats.conflated,
        )
        yield _counter("broker_dead_letters", "client messages that could not be processed", stats.dead_letters)
        yield _counter("broker_requests", "requests passed to a responder", stats.requests)
        yield _counter("broker_request_timeouts", "requests that got no reply in time", stats.timeouts)
        yield _gauge("broker_topics", "concrete topics the broker keeps state for", len(server.router.topics))
        yield _counter("broker_topics_retired", "topics forgotten after staying quiet", stats.retired)
        yield _gauge("broker_history_bytes", "bytes counted over every topic's history", server.backplane.total)
        yield _gauge("broker_pending_bytes", "bytes queued for connections that are behind, in all", server.pending_total)
        yield _gauge("broker_holding", "1 while publishers are not read (max_total_pending_bytes passed)", int(server.holding))
        yield _queue_histogram(server)
        lag = server.loop_lag
        yield HistogramMetricFamily(
            "broker_event_loop_lag_seconds",
            "how late the periodic sweep (a few times a second) ran, each time it ran",
            buckets=lag.buckets(),
            sum_value=lag.sum,
        )
        yield GC_PAUSES.family()
        yield from self.process.collect()
        cluster = server.cluster
        if cluster is not None:
            b = cluster.stats
            yield _gauge(
                "broker_backplane_connected",
                "1 while Redis answers this node's reads and takes its writes, for every shard",
                int(cluster.connected),
            )
            yield _counter("broker_backplane_writes", "writes sent to Redis (one round trip each)", b.writes)
            yield _counter(
                "broker_backplane_scripts",
                "numbering script calls (one per write, with every shard of the write; also sent again after a lost reply)",
                b.scripts,
            )
            yield _counter("broker_backplane_entries_written", "stream entries appended", b.entries_written)
            yield _counter("broker_backplane_messages_written", "messages appended", b.messages_written)
            yield _counter("broker_backplane_bytes_written", "payload bytes appended", b.bytes_written)
            yield _counter("broker_backplane_reads", "XREAD and XRANGE commands", b.reads)
            yield _counter("broker_backplane_entries_read", "stream entries read", b.entries_read)
            yield _counter("broker_backplane_messages_read", "messages delivered from the streams", b.messages_read)
            yield _counter("broker_backplane_bytes_read", "bytes of entries read", b.bytes_read)
            yield _counter("broker_backplane_commands", "commands sent to Redis", b.commands)
            yield _counter("broker_backplane_reconnects", "Redis commands that failed for the connection (then retried)", b.reconnects)
            yield _counter("broker_backplane_resent", "blocks sent again after their reply was lost", b.in_doubt)
            yield _counter("broker_backplane_failed", "messages not published: Redis did not take them within redis_timeout_s", b.failed)
            yield _counter(
                "broker_backplane_unknown", "messages Redis did not confirm within redis_timeout_s (published once or never)", b.unknown
            )
            yield _counter("broker_backplane_refused", "publishes refused at once (buffer full, or Redis away)", b.refused)
            yield _gauge("broker_backplane_buffered_bytes", "payload bytes staged or being written", cluster.buffered)
            yield _by(
                "broker_backplane_lag_seconds",
                "per shard: how old the newest entry read was when it was read (0: nothing new); while reads fail or are late, the seconds since one came back",
                "shard",
                {str(i): lag for i, lag in enumerate(cluster.lags_s())},
            )
            yield _by(
                "broker_backplane_read_failures",
                "per shard: reads of its stream that failed in a row, now (0: reading)",
                "shard",
                {str(i): n for i, n in enumerate(b.read_failures)},
            )
            yield _gauge(
                "broker_backplane_write_failures",
                "the attempts (writes, and checks while its shards refuse publishes) that failed in a row, now, of the writer that fails most (0: writing)",
                b.write_failures,
            )
            yield _counter(
                "broker_backplane_epoch_changes",
                "shard epochs that ended because Redis lost entries of them or went back in time",
                b.epoch_changes,
            )
            yield _counter(
                "broker_backplane_unreplicated",
                "messages written on a Redis master that WAIT did not confirm on redis_min_replicas replicas within redis_timeout_s (answered err 18: delivered unless the master fails first)",
                b.unreplicated,
            )
            yield _counter(
                "broker_backplane_repeats",
                "publishes Redis recognised by their msg_id as published before through any node: acknowledged with the first one's numbers, not published again",
                b.repeats,
            )
            yield _counter(
                "broker_backplane_unknown_topics",
                "batches read from the streams for topics this node cannot hold (past max_topics): not delivered here",
                stats.unknown_topics,
            )
            yield _counter(
                "broker_backplane_rollbacks",
                "times this node found a shard holding less than it had seen (Redis went back in time)",
                b.rollbacks,
            )


def _gauge(name: str, text: str, value: float, labels: dict | None = None) -> GaugeMetricFamily:
    if labels is None:
        return GaugeMetricFamily(name, text, value=value)
    family = GaugeMetricFamily(name, text, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


def _counter(name: str, text: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, text, value=value)


def _by(name: str, text: str, label: str, values: dict, counter: bool = False) -> Metric:
    family = (CounterMetricFamily if counter else GaugeMetricFamily)(name, text, labels=[label])
    for key, value in sorted(values.items(), key=lambda item: str(item[0])):
        family.add_metric([str(key)], value)
    return family


def _known(values, counts: dict) -> dict:
    """`counts` (by code or status) with a 0 for each of `values` it lacks: a labelled counter
    has a series for every value it may take from the start, so that `rate()` and `increase()`
    see its first event."""
    return {**{int(value): 0 for value in values}, **counts}


def _queue_histogram(server) -> HistogramMetricFamily:
    counts = [0] * len(QUEUE_BUCKETS)
    total = 0
    for conn in list(server.connections.values()):
        box = conn.box
        if box is None:
            continue
        size = box.pending
        total += size
        for i, bound in enumerate(QUEUE_BUCKETS):
            if size <= bound:
                counts[i] += 1
    buckets = [(str(bound), count) for bound, count in zip(QUEUE_BUCKETS, counts)]
    buckets.append(("+Inf", len(server.connections)))
    return HistogramMetricFamily(
        "broker_queue_bytes",
        "bytes each connection has waiting, in the broker and its transport, over connections",
        buckets=buckets,
        sum_value=total,
    )
