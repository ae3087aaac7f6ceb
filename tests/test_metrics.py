"""The admin HTTP server: Prometheus metrics read from the broker's counters, and health."""

from __future__ import annotations

import asyncio
import gc
import re
import resource
import time

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from broker.client import Client
from broker.errors import CloseCode, ErrorCode, RequestError
from broker.server.handshake import REFUSAL_STATUSES
from conftest import ROOT, RawSocketClient, free_port, run, serving, url


def samples(text: str) -> dict:
    """{(sample name, labels as a sorted tuple): value} of a Prometheus text exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


# /metrics wants the admin key, as Prometheus sends it (authorization: credentials)
KEY = "metrics-key-of-this-test"


async def get(port: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {KEY}"}) as response:
            return response.status, await response.text()


def test_metrics_count_connections_messages_bytes_and_errors():
    async def main():
        port = free_port()
        async with serving(admin_port=port, admin_api_key=KEY, history_max_messages=10) as server:
            assert (await get(port, "/healthz"))[0] == 200
            status, body = await get(port, "/readyz")
            assert status == 200 and '"ready": true' in body
            async with Client(url(server)) as publisher, Client(url(server)) as subscriber:
                sub = await subscriber.subscribe("m.t")
                for i in range(50):
                    publisher.publish("m.t", b"%d" % i)
                got = 0
                async for _ in sub:
                    got += 1
                    if got == 50:
                        break
                epoch = server.router.topics["m.t"].epoch
                for since in [(epoch, 45), (epoch, 5), (epoch + 1, 3)]:  # complete, history gap, ended
                    async with Client(url(server)) as recovering:
                        await recovering.subscribe("m.t", since=since)
                raw = await RawSocketClient.connect(server.port)
                await raw.send(["pub", 5, "a..b", b"x"])
                assert (await raw.recv()).code == ErrorCode.INVALID_TOPIC
                raw.close()
                status, text = await get(port, "/metrics")
                assert status == 200
                m = samples(text)
                assert m[("broker_connections_opened_total", ())] == 6
                for outcome, count in {"complete": 1, "history": 1, "ended": 1, "awaited": 0}.items():
                    assert m[("broker_recoveries_total", (("outcome", outcome),))] == count, outcome
                assert m[("broker_messages_published_total", ())] == 50
                assert m[("broker_messages_delivered_total", ())] == 50
                assert m[("broker_errors_total", (("code", str(int(ErrorCode.INVALID_TOPIC))),))] == 1
                assert m[("broker_bytes_in_total", ())] > 50 and m[("broker_bytes_out_total", ())] > 50
                assert m[("broker_writes_total", ())] >= 3 and m[("broker_ticks_total", ())] >= 1
                assert m[("broker_topics", ())] == 1
                connections = m[("broker_connections", ())]
                assert connections in (2, 3)  # the raw one may be gone already
                assert m[("broker_queue_bytes_count", ())] == connections
                assert m[("broker_queue_bytes_bucket", (("le", "+Inf"),))] == connections
                assert ("broker_event_loop_lag_seconds_count", ()) in m
                assert not any(name.startswith("broker_backplane") for name, _ in m)
        async with serving() as plain:
            assert plain.admin is None  # off unless admin_port is set

    run(main())


def test_readyz_says_when_the_backplane_does_not_take_publishes(own_redis):
    async def main():
        port = free_port()
        async with serving(admin_port=port, admin_api_key=KEY, redis_url=own_redis.url, redis_prefix="r", redis_timeout_s=0.5) as server:
            assert (await get(port, "/readyz"))[0] == 200
            async with Client(url(server)) as client:
                assert (await client.publish_acked("r.t", b"x")).seq == 1
                m = samples((await get(port, "/metrics"))[1])
                assert m[("broker_backplane_connected", ())] == 1 and m[("broker_backplane_messages_written_total", ())] == 1
                own_redis.stop()
                try:
                    await client.publish_acked("r.t", b"y")
                except RequestError as exc:
                    assert exc.code == ErrorCode.UNAVAILABLE
                status, body = await get(port, "/readyz")
                assert status == 503 and '"backplane": false' in body
                assert (await get(port, "/healthz"))[0] == 200  # alive all the same

    run(main())


def test_a_node_nobody_publishes_on_reports_redis_gone_and_back_within_seconds(own_redis):
    """A subscriber-only node: /readyz, broker_backplane_connected and the lag follow Redis
    within the documented bound (3 s) when it stops, comes back, and is paused, though no
    client publishes and the node sends Redis nothing but its blocking reads."""
    import asyncio
    import time

    bound = 3.0

    async def state(port: int) -> tuple[int, float, float]:
        status, _ = await get(port, "/readyz")
        m = samples((await get(port, "/metrics"))[1])
        lag = max(value for (name, _), value in m.items() if name == "broker_backplane_lag_seconds")
        return status, m[("broker_backplane_connected", ())], lag

    async def until(port: int, status: int, connected: float, within: float) -> tuple[float, float]:
        """Seconds until /readyz answers `status` and the gauge is `connected`; the lag then."""
        started = time.monotonic()
        while True:
            now, gauge, lag = await state(port)
            if now == status and gauge == connected:
                return time.monotonic() - started, lag
            assert time.monotonic() - started < within, f"/readyz {now}, connected {gauge} after {within} s"
            await asyncio.sleep(0.05)

    async def main():
        port = free_port()
        async with serving(admin_port=port, admin_api_key=KEY, redis_url=own_redis.url, redis_prefix="q", redis_timeout_s=1.0) as server:
            async with Client(url(server)) as client:
                await client.subscribe("q.>")
                await until(port, 200, 1, bound)
                own_redis.stop()
                await until(port, 503, 0, bound)
                await asyncio.sleep(2.0)
                assert (await state(port))[2] >= 2.0  # the lag grows while Redis is away
                own_redis.start()
                _, lag = await until(port, 200, 1, bound + 2)  # readers retry at most 1 s apart
                assert lag < 1.0
                own_redis.pause()
                try:
                    await until(port, 503, 0, bound + 0.2)
                finally:
                    own_redis.resume()
                await until(port, 200, 1, bound)
                # the node noticed all this with its blocking reads (and the checks that follow a failed one)
                assert server.router.stats.published == 0 and server.cluster.stats.writes == 0

    run(main(), timeout=60)


def test_every_metric_is_documented_and_every_documented_metric_exists(own_redis):
    async def main():
        port = free_port()
        async with serving(admin_port=port, admin_api_key=KEY, redis_url=own_redis.url, redis_prefix="d") as server:
            names = {family.name for family in text_string_to_metric_families((await get(port, "/metrics"))[1])}
            assert server.admin is not None
            return names

    names = run(main())
    section = (ROOT / "docs" / "operations.md").read_text().split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `((?:broker|process)_[a-z_]+)`", section, re.M))
    # process_cpu_seconds_total is a counter: its family is process_cpu_seconds
    names = {"process_cpu_seconds_total" if name == "process_cpu_seconds" else name for name in names}
    assert names == documented, (sorted(names - documented), sorted(documented - names))


def test_reading_metrics_takes_nothing_from_the_next_reader():
    """The event-loop lag is a histogram that only grows: a second scraper (or a curl) reads
    the late sweep the first one read, rather than a value reset by the first read."""

    async def main():
        port = free_port()
        async with serving(admin_port=port, admin_api_key=KEY):
            time.sleep(1.2)  # block the loop past the sweep's due time (it runs about once a second)
            await asyncio.sleep(0.1)
            first = samples((await get(port, "/metrics"))[1])
            second = samples((await get(port, "/metrics"))[1])
        for m in (first, second):
            late = m[("broker_event_loop_lag_seconds_count", ())] - m[("broker_event_loop_lag_seconds_bucket", (("le", "0.1"),))]
            assert late >= 1, m
            assert m[("broker_event_loop_lag_seconds_sum", ())] >= 0.1

    run(main())


def test_labelled_counters_have_a_series_for_each_known_value_from_the_start():
    async def main():
        port = free_port()
        async with serving(admin_port=port, admin_api_key=KEY):
            return samples((await get(port, "/metrics"))[1])

    m = run(main())
    for code in ErrorCode:
        assert m[("broker_errors_total", (("code", str(int(code))),))] == 0, code
    for code in CloseCode:
        assert m[("broker_connections_closed_by_broker_total", (("code", str(int(code))),))] == 0, code
    for status in (400, 401, 403, 404, 429, 503):
        assert m[("broker_handshakes_refused_total", (("status", str(status)),))] == 0, status


def test_every_status_a_refused_upgrade_may_get_has_its_series():
    """Each HTTP status the code refuses an upgrade with is one of REFUSAL_STATUSES."""
    source = "\n".join(p.read_text() for p in (ROOT / "broker").rglob("*.py"))
    used = {int(s) for s in re.findall(r"(?:HandshakeError|AuthError|_refuse|Refused)\((\d{3})\b", source)}
    used |= {int(s) for s in re.findall(r"LimitRefused\((\d{3})", source)}
    limits = (ROOT / "broker" / "limits.py").read_text()
    used |= {int(s) for s in re.findall(r"self\._refuse\((\d{3})", limits)}
    assert used and used <= set(REFUSAL_STATUSES), sorted(used - set(REFUSAL_STATUSES))


def test_process_and_runtime_metrics():
    """Memory, CPU, descriptors against their limit, start time, garbage-collector pauses and
    the connection limit, as an operator coming from NATS or Centrifugo expects them."""

    async def main():
        port = free_port()
        async with serving(admin_port=port, admin_api_key=KEY, max_connections=777):
            gc.collect()  # a generation-2 collection, measured
            return samples((await get(port, "/metrics"))[1])

    m = run(main())
    assert m[("process_resident_memory_bytes", ())] > 10 << 20
    assert m[("process_cpu_seconds_total", ())] > 0
    assert 0 < m[("process_open_fds", ())] <= m[("process_max_fds", ())]
    assert m[("process_max_fds", ())] == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert time.time() - 3600 < m[("process_start_time_seconds", ())] <= time.time()
    assert m[("broker_gc_pause_seconds_count", (("generation", "2"),))] >= 1
    assert m[("broker_gc_pause_seconds_bucket", (("generation", "2"), ("le", "+Inf")))] >= 1
    assert m[("broker_connections_limit", ())] == 777
