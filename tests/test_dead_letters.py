"""Dead letters: client messages the broker cannot process are answered with an error,
counted, kept (the newest dead_letters_max) with their context and their fields before any
payload, logged, and readable with `broker dead-letters`."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import deque

import msgspec
import pytest

from broker.errors import ErrorCode
from broker.messages import Err, Pub, encode
from broker.settings import load
from conftest import ROOT, Harness, RawSocketClient, eventually, free_ports, run, serve, serving, stop_process


def test_undecodable_messages_and_refused_publishes_are_kept_with_their_context():
    h = Harness()
    s = h.session("s")
    s.receive(b"\xc1\x00garbage")
    s.receive(msgspec.msgpack.encode([["pub", 7, "t", "text, not bin"], ["pub", 0, "ok", b"x"], ["nope", 8]]))
    s.receive(encode(Pub(9, "md.*", b"x")))
    written, _ = h.tick()
    assert sorted(e.id for e in written["s"] if type(e) is Err) == [0, 7, 8, 9]
    letters = list(h.router.requests.dead_letters)
    assert h.router.stats.dead_letters == 4 == len(letters)
    assert [(d.conn, d.request_id, d.code) for d in letters] == [
        ("s", 0, ErrorCode.BAD_MESSAGE),
        ("s", 7, ErrorCode.BAD_MESSAGE),
        ("s", 8, ErrorCode.UNKNOWN_TYPE),
        ("s", 9, ErrorCode.PATTERN_NOT_ALLOWED),
    ]
    assert letters[0].head == "c1"  # not MessagePack: its first byte only
    assert bytes.fromhex(letters[1].head) == b"\x94" + msgspec.msgpack.encode(["pub", 7, "t"])[1:]  # up to the payload
    assert "pattern" in letters[3].reason and letters[3].time <= time.time()


def test_a_refused_publish_is_kept_as_the_client_sent_it():
    """The head of a dead letter is cut from the message as received, up to its payload: not
    a re-encoding (which would add the default msg_id, or write integers in their shortest
    form), and the right message of a batch whose earlier elements were undecodable."""

    def up_to_payload(data: bytes) -> bytes:
        return data[: data.index(b"\xc4")]  # the payload's bin header

    h = Harness()
    s = h.session("s")
    sent = msgspec.msgpack.encode(["pub", 9, "md.*", b"x"])
    s.receive(sent)
    # id 10 written as uint 16, payload longer than the head
    wide = b"\x94\xa3pub\xcd\x00\x0a\xa4a..b\xc4\x28" + bytes(40)
    s.receive(wide)
    batch = [["nope", 1], ["pub", 2, "a..b", b"y"], ["pub", 0, "ok", b"z"], ["pub", 3, "md.>", b"w" * 40]]
    s.receive(msgspec.msgpack.encode(batch))
    h.tick()
    letters = [(d.request_id, bytes.fromhex(d.head)) for d in h.router.requests.dead_letters]
    assert letters == [
        (9, up_to_payload(sent)),
        (10, up_to_payload(wide)),
        (1, msgspec.msgpack.encode(batch[0])),
        (2, up_to_payload(msgspec.msgpack.encode(batch[1]))),
        (3, up_to_payload(msgspec.msgpack.encode(batch[3]))),
    ]


def test_only_the_newest_dead_letters_are_kept():
    h = Harness()
    h.router.requests.dead_letters = deque(maxlen=3)
    s = h.session("s")
    for i in range(1, 6):
        s.receive(msgspec.msgpack.encode(["nope", i]))
    assert [d.request_id for d in h.router.requests.dead_letters] == [3, 4, 5] and h.router.stats.dead_letters == 5


@pytest.mark.slow
def test_an_operator_reads_them_with_the_cli(tmp_path):
    (port,) = free_ports()
    path = tmp_path / "dead.jsonl"
    proc = serve("--port", str(port), "--dead-letter-file", str(path), "--log-level", "info")
    try:

        async def main():
            deadline = time.monotonic() + 10
            while True:
                try:
                    raw = await RawSocketClient.connect(port)
                    break
                except OSError:
                    assert time.monotonic() < deadline, "the broker did not start"
                    await asyncio.sleep(0.05)
            await raw.send(["pub", 5, "a..b", b"x"])
            assert (await raw.recv()).code == ErrorCode.INVALID_TOPIC
            await raw.send(["subscribe", 6, "x"])
            assert (await raw.recv()).code == ErrorCode.UNKNOWN_TYPE
            await eventually(lambda: path.exists() and len(path.read_text().splitlines()) == 2, 5, "the dead-letter file")
            raw.close()

        run(main())
        out = subprocess.run(
            [sys.executable, "-m", "broker", "dead-letters", "--file", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=30
        )
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert len(lines) == 2 and "id=5 code=3" in lines[0] and "id=6 code=2" in lines[1]
        sent = msgspec.msgpack.encode(["pub", 5, "a..b", b"x"])
        assert "head=" + sent[: sent.index(b"\xc4")].hex() in lines[0]  # as sent, up to the payload
        assert "head=" + msgspec.msgpack.encode(["subscribe", 6]).hex().replace("92", "93", 1) in lines[1]
        as_json = subprocess.run(
            [sys.executable, "-m", "broker", "dead-letters", "--file", str(path), "--json"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert [json.loads(line)["request_id"] for line in as_json.stdout.splitlines()] == [5, 6]
    finally:
        stop_process(proc)
    log = proc.stderr.read().decode()
    assert log.count("event=dead_letter ") == 2 and "head=" in log, log[-2000:]


def test_the_cli_says_when_there_are_none(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "broker", "dead-letters", "--file", str(tmp_path / "none.jsonl")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0 and out.stdout == "" and "no dead letters" in out.stderr


def test_each_worker_process_keeps_its_own_file_and_the_cli_reads_them_all(tmp_path, monkeypatch):
    from broker.server import Server

    server = Server(load({"port": 0, "dead_letter_file": str(tmp_path / "dead.jsonl")}, environ={}))
    server.port = 7399
    assert server.dead_letter_path() == str(tmp_path / "dead.jsonl")
    monkeypatch.setenv("BROKER_WORKER_INDEX", "1")
    assert server.dead_letter_path() == str(tmp_path / "dead-w1.jsonl")
    default = Server(load({"port": 0}, environ={}))
    default.port = 7399
    assert default.dead_letter_path().endswith("broker-dead-letters-7399-w1.jsonl")
    for worker, request_id in (("0", 3), ("1", 4)):
        letter = {"time": 0, "conn": 1, "peer": "p", "request_id": request_id, "code": 1, "reason": "r", "head": "00"}
        (tmp_path / f"dead-w{worker}.jsonl").write_text(json.dumps(letter) + "\n")
    out = subprocess.run(
        [sys.executable, "-m", "broker", "dead-letters", "--file", str(tmp_path / "dead.jsonl")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert ["id=3" in out.stdout.splitlines()[0], "id=4" in out.stdout.splitlines()[1]] == [True, True]


def test_the_default_file_in_the_shared_temporary_directory_is_made_safely(tmp_path, caplog):
    """The default path (/tmp/broker-dead-letters-PORT.jsonl) is predictable: the broker
    writes it as a new 0600 file renamed into place, and will not use a file another user put
    there first, or a symbolic link; `broker dead-letters` will not read those either."""
    import logging
    import os
    import stat
    import tempfile

    from broker.server.deadletters import default_path

    async def main():
        async with serving(log_level="info") as server:
            path = default_path(server.port)
            assert server.dead_letter_path() == path == os.path.join(tempfile.gettempdir(), f"broker-dead-letters-{server.port}.jsonl")
            try:
                victim = tmp_path / "victim"
                victim.write_text("keep me")
                outcomes = {}
                for case in ("foreign", "link", "own"):
                    if os.path.lexists(path):
                        os.unlink(path)
                    if case == "foreign":
                        with open(path, "w") as fh:
                            fh.write("planted\n")
                        os.chown(path, 12345, 12345)
                    elif case == "link":
                        os.symlink(victim, path)
                    raw = await RawSocketClient.connect(server.port)
                    await raw.send(["nope", 1])
                    assert (await raw.recv()).code == ErrorCode.UNKNOWN_TYPE
                    raw.close()
                    server.write_dead_letters()
                    if case == "own":
                        await eventually(lambda: os.path.exists(path) and os.path.getsize(path) > 0, 5, "the dead-letter file")
                        st = os.lstat(path)
                        outcomes[case] = (stat.S_ISREG(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid == os.geteuid())
                    else:
                        await asyncio.sleep(0.2)
                        outcomes[case] = (open(path).read(), os.path.islink(path))
                    outcomes[case + "-cli"] = subprocess.run(
                        [sys.executable, "-m", "broker", "dead-letters", "--port", str(server.port)],
                        cwd=ROOT,
                        capture_output=True,
                        text=True,
                        timeout=30,
                    )
                return path, outcomes
            finally:
                if os.path.lexists(path):
                    os.unlink(path)

    with caplog.at_level(logging.INFO, logger="broker"):
        path, outcomes = run(main())
    assert outcomes["foreign"] == ("planted\n", False)
    assert outcomes["link"] == ("keep me", True) and (tmp_path / "victim").read_text() == "keep me"
    assert outcomes["own"] == (True, 0o600, True)
    refusals = [r.fields for r in caplog.records if r.getMessage() == "dead_letter_file_refused"]
    assert [f["reason"] for f in refusals] == [
        f"{path} belongs to uid 12345, not to this process's user (uid {os.geteuid()})",
        f"{path} is a symbolic link",
    ]
    assert outcomes["foreign-cli"].returncode == 1 and f"not reading {path} belongs to uid 12345" in outcomes["foreign-cli"].stderr
    assert outcomes["link-cli"].returncode == 1 and f"not reading {path} is a symbolic link" in outcomes["link-cli"].stderr
    assert "keep me" not in outcomes["link-cli"].stdout and "planted" not in outcomes["foreign-cli"].stdout
    assert outcomes["own-cli"].returncode == 0 and "code=2" in outcomes["own-cli"].stdout
