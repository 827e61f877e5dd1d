"""Seeded fuzzing of gfspy-blockd: thousands of random and mutated NBD and control frames
from many connections, while a well-behaved client keeps writing and verifying its own
export.  Replay a failure with GFSPY_FUZZ_SEED=<seed printed in the failure>.

Every fuzz connection is judged by the oracles in `fuzzing.py` against exactly the bytes
it sent; the server must answer by the protocol or hang up, and hang up on its own after
a fatal frame, within a timeout (never hang).  Some fuzzers open the export as victim
nodes that control-channel fuzzers fence mid-storm, so drains run under fire too."""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import socket
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import pytest
import trio

from gfspy.nbd import wire
from gfspy.nbd.wire import Cmd, CmdFlag, Opt, Rep

from . import fuzzing
from .conftest import make_image
from .harness import BlockdProcess, RawNbd

FUZZ_SIZE = 8 << 20  # fuzzers' sandbox (first export: the empty name opens it)
GOOD_SIZE = 4 << 20  # the well-behaved client's export; sizes differ on purpose
NBD_JOBS = 1200
CONTROL_JOBS = 300
NBD_WORKERS = 6
CONTROL_WORKERS = 2
REPLY_TIMEOUT = 20.0  # the server must answer and hang up by then, or it hangs
GOOD_EXTENT = 64 * 1024
SECTOR = 512


@dataclass
class Tally:
    """Totals over all fuzz connections, and every oracle failure with its replay key."""

    frames: int = 0
    answers: int = 0
    closed_by_server: int = 0
    fully_answered: int = 0
    sessions_fenced: int = 0
    connections: int = 0
    failures: list[str] = field(default_factory=list)
    writes: list[fuzzing.ModelRequest] = field(default_factory=list)

    def add(self, verdict: fuzzing.Verdict) -> None:
        self.connections += 1
        self.frames += verdict.frames
        self.answers += verdict.answers
        self.closed_by_server += verdict.closed_by_server
        self.fully_answered += verdict.fully_answered
        self.sessions_fenced += verdict.sessions_fenced
        self.writes += [r for name, r in verdict.writes if name == "fuzz"]


# --- one fuzz connection --------------------------------------------------------------


@dataclass
class Exchange:
    """A connection whose every received byte is kept; sending and receiving overlap so
    a server blocked on its replies never deadlocks against us."""

    stream: trio.SocketStream
    output: bytearray = field(default_factory=bytearray)
    reset: bool = False
    eof: bool = False

    async def receive_once(self) -> None:
        try:
            data = await self.stream.receive_some(1 << 20)
        except (trio.BrokenResourceError, ConnectionError):
            self.reset = self.eof = True
            return
        if not data:
            self.eof = True
        self.output += data

    async def receive_to_eof(self) -> None:
        while not self.eof:
            await self.receive_once()

    async def send_chunked(self, rng: random.Random, data: bytes) -> None:
        """Random split points, so frames arrive in pieces; stop if the server hung up."""
        pos = 0
        try:
            while pos < len(data):
                step = rng.choice([1, 7, 100, 4096, 65536, len(data)])
                await self.stream.send_all(data[pos : pos + step])
                pos += step
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def finish(self, rng: random.Random, data: bytes, ending: str) -> None:
        """Send `data`, then end the way `ending` says: "eof" (half-close; the server
        must finish and hang up), "wait" (the server must hang up by itself) or "abort"
        (vanish, sometimes with a reset, possibly mid-frame)."""
        if ending == "abort":
            await self.send_chunked(rng, data)
            if rng.random() < 0.5:
                linger = struct.pack("ii", 1, 0)  # close with RST
                self.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            await self.stream.aclose()
            return
        with trio.fail_after(REPLY_TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.receive_to_eof)
                await self.send_chunked(rng, data)
                if ending == "eof":
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await self.stream.send_eof()
        await self.stream.aclose()


def choose_ending(rng: random.Random, framing_end: str) -> str:
    if rng.random() < 0.25:
        return "abort"
    return "wait" if framing_end == "fatal" else "eof"


async def go_fuzz_export(conn: Exchange, name: str) -> int | None:
    """A correct handshake and GO; the export size from the server's INFO, or None
    when a fenced victim node was refused."""
    await conn.stream.send_all(
        wire.encode_client_flags() + wire.encode_option(Opt.GO, wire.encode_info_request(name))
    )
    while True:
        out = fuzzing.Reader(bytes(conn.output), truncated_ok=True)
        if out.take(wire.GREETING_SIZE, "greeting") is not None:
            final, size = fuzzing.option_replies(out, Opt.GO)
            if final == Rep.ERR_POLICY and name != "fuzz":
                return None
            if final is not None:
                assert final == Rep.ACK and size == FUZZ_SIZE, (final, size)
                return size
        if conn.eof:
            raise AssertionError("server closed during a correct GO")
        await conn.receive_once()


async def nbd_job(port: int, rng: random.Random, facts: fuzzing.ExportFacts, tally: Tally) -> None:
    kind = rng.choices(["random", "handshake", "stepwise", "transmission"], [10, 20, 20, 50])[0]
    if kind == "stepwise":
        await stepwise_handshake_job(port, rng, facts, tally)
        return
    conn = Exchange(await trio.open_tcp_stream("127.0.0.1", port))
    verdict = fuzzing.Verdict()
    prefix = b""
    fenceable = False
    if kind in ("random", "handshake"):
        if kind == "random":
            body, frames = rng.randbytes(rng.randrange(1, 2048)), 1
        else:
            body, frames = fuzzing.handshake_stream(rng)
        ending = choose_ending(rng, fuzzing.handshake_framing_end(body, facts.maximum_payload))
    else:
        name = "fuzz"
        if rng.random() < 0.2:
            fenceable = True
            name = f"fuzz@{rng.choice(fuzzing.VICTIM_NODES)}:{rng.randrange(1, 4):x}"
        with trio.fail_after(REPLY_TIMEOUT):
            size = await go_fuzz_export(conn, name)
        if size is None:
            await conn.stream.aclose()
            tally.add(fuzzing.Verdict(frames=1, answers=1))
            return
        prefix = wire.encode_client_flags() + wire.encode_option(
            Opt.GO, wire.encode_info_request(name)
        )
        body, frames = fuzzing.request_stream(rng, facts, size)
        _, framing_end = fuzzing.frame_requests(body, facts.maximum_payload)
        if framing_end == "clean" and rng.random() < 0.8:
            body += wire.encode_request(wire.Request(0, Cmd.DISC, 0, 0, 0))
        ending = choose_ending(rng, framing_end)
        if framing_end == "partial" and rng.random() < 0.5:
            ending = "abort"  # vanish in the middle of a payload
    await conn.finish(rng, body, ending)
    sent = prefix + body
    if ending == "abort":
        # Unjudged, but the server may have carried out its writes.
        if kind == "transmission":
            requests, _ = fuzzing.frame_requests(body, facts.maximum_payload)
            verdict.writes += [("fuzz", r) for r in requests if r.req.type == Cmd.WRITE]
        verdict.frames = frames
    else:
        verdict.closed_by_server = ending == "wait"
        fuzzing.check_nbd_exchange(
            sent, bytes(conn.output), facts, reset=conn.reset, verdict=verdict, fenceable=fenceable
        )
        verdict.frames = max(verdict.frames, frames)
    tally.add(verdict)


async def stepwise_handshake_job(
    port: int, rng: random.Random, facts: fuzzing.ExportFacts, tally: Tally
) -> None:
    """Mutated options sent one at a time, as the protocol says, each after the final
    reply to the one before: then every option the server framed MUST be answered."""
    conn = Exchange(await trio.open_tcp_stream("127.0.0.1", port))
    flags, frames = fuzzing.handshake_frames(rng)
    sent, waited_at = b"", set()
    with trio.fail_after(REPLY_TIMEOUT):
        try:
            for frame in [flags, *frames]:
                await conn.stream.send_all(frame)
                sent += frame
                waited_at.add(len(sent))
                framed, _ = fuzzing.frame_options(sent) if len(sent) >= 4 else ([], "")
                while True:
                    answered, switched = fuzzing.answered_options(bytes(conn.output))
                    if conn.eof or switched or answered >= len(framed):
                        break
                    await conn.receive_once()
                if conn.eof or switched:
                    break
            await conn.stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        await conn.receive_to_eof()
    await conn.stream.aclose()
    verdict = fuzzing.Verdict()
    fuzzing.check_nbd_exchange(
        sent, bytes(conn.output), facts, reset=conn.reset, verdict=verdict, waited_at=waited_at
    )
    verdict.frames = max(verdict.frames, len(frames) + 1)
    tally.add(verdict)


async def control_job(address: str, rng: random.Random, tally: Tally) -> None:
    host, port = address.rsplit(":", 1)
    conn = Exchange(await trio.open_tcp_stream(host, int(port)))
    body, frames = fuzzing.control_stream(rng)
    _, framing_end = fuzzing.frame_control(body)
    ending = choose_ending(rng, framing_end)
    await conn.finish(rng, body, ending)
    verdict = fuzzing.Verdict(frames=frames, closed_by_server=ending == "wait")
    if ending != "abort":
        fuzzing.check_control_exchange(body, bytes(conn.output), reset=conn.reset, verdict=verdict)
        verdict.frames = max(verdict.frames, frames)
    tally.add(verdict)


async def run_jobs(name: str, jobs: list[int], seed: int, tally: Tally, job) -> None:
    """Run jobs one after another; record failures with the key that replays them."""
    for index in jobs:
        rng = random.Random(f"{seed}:{name}:{index}")
        try:
            await job(rng)
        except (AssertionError, wire.WireError, trio.TooSlowError, OSError) as e:
            what = "no answer and no hang-up" if isinstance(e, trio.TooSlowError) else repr(e)
            tally.failures.append(f"seed {seed} {name} job {index}: {what}")


# --- the well-behaved client ----------------------------------------------------------


async def good_client(port: int, rng: random.Random, stop: trio.Event) -> tuple[bytearray, int]:
    """Pipelined writes and verified reads on distinct extents, until told to stop;
    returns the expected export content and how many requests it made."""
    client = await RawNbd.connect(port)
    await client.open("good")
    assert client.size == GOOD_SIZE
    shadow = bytearray(GOOD_SIZE)
    extents = GOOD_SIZE // GOOD_EXTENT
    requests = 0
    cookie = 0
    while not stop.is_set() or requests == 0:
        chosen = rng.sample(range(extents), 8)
        writes, lengths, expected = {}, {}, {}
        for i, extent in enumerate(chosen):
            cookie += 1
            base = extent * GOOD_EXTENT
            if i < 4:
                start = base + rng.randrange(16) * 4096
                length = rng.randrange(1, (base + GOOD_EXTENT - start) // 4096 + 1) * 4096
                data = rng.randbytes(length)
                flags = CmdFlag.FUA if rng.random() < 0.3 else 0
                await client.send_request(Cmd.WRITE, cookie, start, length, data, flags)
                writes[cookie] = (start, data)
            else:
                await client.send_request(Cmd.READ, cookie, base, GOOD_EXTENT)
                lengths[cookie] = GOOD_EXTENT
                expected[cookie] = bytes(shadow[base : base + GOOD_EXTENT])
        for _ in chosen:
            got, error, data = await client.read_reply(lengths)
            assert error == 0, f"good client request {got} failed with {error}"
            if got in expected:
                assert data == expected[got], "good client read back wrong data"
        for start, data in writes.values():
            shadow[start : start + len(data)] = data
        requests += len(chosen)
        if rng.random() < 0.2:
            assert (await client.call(Cmd.FLUSH))[0] == 0
            requests += 1
    for offset in range(0, GOOD_SIZE, 1 << 20):  # a last full check over the wire
        error, data = await client.call(Cmd.READ, offset, 1 << 20)
        assert error == 0 and data == shadow[offset : offset + (1 << 20)]
    await client.send_request(Cmd.DISC, 0, 0, 0)
    await client.aclose()
    return shadow, requests


async def real_tool_bystander(server: BlockdProcess, stop: trio.Event) -> int:
    """nbdinfo (libnbd, not our code) keeps connecting and listing during the storm;
    returns how many times it succeeded."""
    runs = 0
    while not stop.is_set() or runs == 0:
        with trio.fail_after(REPLY_TIMEOUT):
            listing = await trio.run_process(
                ["nbdinfo", "--list", "--json", server.uri()],
                capture_stdout=True,
                capture_stderr=True,
            )
        exports = {
            e["export-name"]: e["export-size"] for e in json.loads(listing.stdout)["exports"]
        }
        assert exports == {"fuzz": FUZZ_SIZE, "good": GOOD_SIZE}, exports
        runs += 1
    return runs


# --- checks after the storm -----------------------------------------------------------


def unexplained_fuzz_sectors(image: bytes, writes: list[fuzzing.ModelRequest]) -> list[int]:
    """Offsets of nonzero sectors no fuzz WRITE the server could have accepted carried."""
    carried: dict[int, set[bytes]] = {}
    for w in writes:
        if w.req.offset % SECTOR or w.req.offset + w.req.length > len(image):
            continue
        for pos in range(0, len(w.payload) - SECTOR + 1, SECTOR):
            carried.setdefault(w.req.offset + pos, set()).add(w.payload[pos : pos + SECTOR])
    zero = bytes(SECTOR)
    return [
        off
        for off in range(0, len(image), SECTOR)
        if image[off : off + SECTOR] != zero
        and image[off : off + SECTOR] not in carried.get(off, ())
    ]


def nbdinfo_size(uri: str) -> int:
    result = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


async def export_facts(port: int) -> fuzzing.ExportFacts:
    """Learn the block-size limits the way a client does, from GO's INFO replies."""
    client = await RawNbd.connect(port)
    await client.greet()
    replies = await client.option(Opt.GO, wire.encode_info_request("fuzz", [3]))
    await client.aclose()
    sizes = [wire.decode_info(body) for kind, body in replies if kind == Rep.INFO]
    block = next(item for item in sizes if isinstance(item, wire.BlockSize))
    return fuzzing.ExportFacts({FUZZ_SIZE: "fuzz", GOOD_SIZE: "good"}, block.minimum, block.maximum)


@pytest.mark.timeout(150)
async def test_fuzzed_frames_never_break_the_server_or_a_good_client(
    start_blockd, tmp_path: Path
) -> None:
    seed = int(os.environ.get("GFSPY_FUZZ_SEED", secrets.randbits(32)))
    print(f"fuzz seed {seed} (replay: GFSPY_FUZZ_SEED={seed})")
    fuzz_image = make_image(tmp_path / "fuzz.img", FUZZ_SIZE)
    good_image = make_image(tmp_path / "good.img", GOOD_SIZE)
    server: BlockdProcess = start_blockd({"fuzz": fuzz_image, "good": good_image})
    facts = await export_facts(server.nbd_port)
    tally = Tally()
    stop = trio.Event()
    outcome: dict[str, object] = {}

    async def nbd(rng: random.Random) -> None:
        await nbd_job(server.nbd_port, rng, facts, tally)

    async def control(rng: random.Random) -> None:
        await control_job(server.control, rng, tally)

    async def good() -> None:
        rng = random.Random(f"{seed}:good")
        outcome["good"] = await good_client(server.nbd_port, rng, stop)

    async def bystander() -> None:
        outcome["nbdinfo runs"] = await real_tool_bystander(server, stop)

    async def fuzz_all() -> None:
        async with trio.open_nursery() as nursery:
            for w in range(NBD_WORKERS):
                jobs = list(range(w, NBD_JOBS, NBD_WORKERS))
                nursery.start_soon(run_jobs, "nbd", jobs, seed, tally, nbd)
            for w in range(CONTROL_WORKERS):
                jobs = list(range(w, CONTROL_JOBS, CONTROL_WORKERS))
                nursery.start_soon(run_jobs, "control", jobs, seed, tally, control)
        stop.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(good)
        nursery.start_soon(bystander)
        nursery.start_soon(fuzz_all)

    shadow, good_requests = outcome["good"]
    print(
        f"fuzz seed {seed}: {tally.connections} connections, {tally.frames} frames, "
        f"{tally.answers} answers, {tally.closed_by_server} hung up by the server, "
        f"{tally.fully_answered} fully answered up to DISC, "
        f"{tally.sessions_fenced} live sessions fenced; "
        f"good client made {good_requests} requests, nbdinfo --list ran "
        f"{outcome['nbdinfo runs']} times"
    )
    assert not tally.failures, "\n".join(tally.failures[:20])
    assert tally.frames >= 2000 and tally.connections == NBD_JOBS + CONTROL_JOBS
    # The storm must have reached the server's logic, not just its framing checks.
    assert tally.answers >= 1000 and tally.fully_answered >= 25 and tally.closed_by_server
    assert server.alive(), f"seed {seed}: gfspy-blockd died"
    assert nbdinfo_size(server.uri("fuzz")) == FUZZ_SIZE
    assert nbdinfo_size(server.uri("good")) == GOOD_SIZE
    copy = tmp_path / "good-copy.img"
    subprocess.run(
        ["nbdcopy", server.uri("good"), str(copy)], check=True, capture_output=True, timeout=60
    )
    assert copy.read_bytes() == shadow, f"seed {seed}: nbdcopy of the good export differs"
    assert good_image.read_bytes() == shadow, f"seed {seed}: the good export changed"
    fuzzed = fuzz_image.read_bytes()
    assert len(fuzzed) == FUZZ_SIZE, f"seed {seed}: the fuzz export changed size"
    stray = unexplained_fuzz_sectors(fuzzed, tally.writes)
    written = sum(fuzzed[o : o + SECTOR] != bytes(SECTOR) for o in range(0, FUZZ_SIZE, SECTOR))
    print(f"fuzz seed {seed}: {written} sectors of the fuzz export hold fuzz data")
    assert not stray, f"seed {seed}: sectors at {stray[:10]} hold data no WRITE carried"
    log = server.log_text()
    assert "Traceback" not in log and "internal error" not in log, f"seed {seed}:\n{log[-3000:]}"


@pytest.mark.timeout(10)
def test_the_oracle_rejects_a_server_that_breaks_the_protocol() -> None:
    """The fuzz test is only as good as its judge: feed it replies a broken server
    would send, without any server, and check each one is caught."""
    facts = fuzzing.ExportFacts({FUZZ_SIZE: "fuzz"}, 512, 32 << 20)
    go = wire.encode_option(Opt.GO, wire.encode_info_request("fuzz"))
    greeting_and_go = (
        wire.encode_greeting()
        + wire.encode_option_reply(Opt.GO, Rep.INFO, wire.encode_info_export(FUZZ_SIZE, 1))
        + wire.encode_option_reply(Opt.GO, Rep.ACK)
    )
    misaligned = wire.encode_request(wire.Request(0, Cmd.READ, 9, 1, 512))
    disc = wire.encode_request(wire.Request(0, Cmd.DISC, 0, 0, 0))
    sent = wire.encode_client_flags() + go + misaligned + disc
    broken_outputs = {
        "accepted a misaligned READ": wire.encode_simple_reply(0, 9) + bytes(512),
        "answered a cookie never sent": wire.encode_simple_reply(22, 10),
        "left a request unanswered after DISC": b"",
        "invented an errno": wire.encode_simple_reply(99, 9),
    }
    for why, tail in broken_outputs.items():
        with pytest.raises(fuzzing.OracleError):
            fuzzing.check_nbd_exchange(
                sent, greeting_and_go + tail, facts, reset=False, verdict=fuzzing.Verdict()
            )
            pytest.fail(f"the oracle missed a server that {why}")
    # And the correct answer passes.
    fuzzing.check_nbd_exchange(
        sent,
        greeting_and_go + wire.encode_simple_reply(22, 9),
        facts,
        reset=False,
        verdict=fuzzing.Verdict(),
    )
    # A control channel answering an unknown op with OK is caught too.
    body = msgpack.packb({"op": "NOPE"})
    request = struct.pack(">I", len(body)) + body
    answer = msgpack.packb({"status": "OK"})
    with pytest.raises(fuzzing.OracleError):
        fuzzing.check_control_exchange(
            request,
            struct.pack(">I", len(answer)) + answer,
            reset=False,
            verdict=fuzzing.Verdict(),
        )
    # Data at an offset no accepted WRITE carried it to is caught as well.
    carried = fuzzing.ModelRequest(wire.Request(0, Cmd.WRITE, 1, 512, 512), b"\x07" * 512)
    image = bytearray(4 * SECTOR)
    image[512:1024] = carried.payload
    assert unexplained_fuzz_sectors(bytes(image), [carried]) == []
    image[1536:2048] = carried.payload
    assert unexplained_fuzz_sectors(bytes(image), [carried]) == [1536]
