"""Hostile and broken clients: each gets an NBD error or a closed socket, and the server
keeps serving everyone else."""

from __future__ import annotations

import struct
import subprocess

import pytest
import trio

from gfspy.nbd import wire
from gfspy.nbd.wire import Cmd, CmdFlag, NbdErrno, Opt, Rep

from .conftest import make_image
from .harness import BlockdProcess, RawNbd

SIZE = 1 << 20


async def connect(port: int) -> RawNbd:
    client = await RawNbd.connect(port)
    wire.decode_greeting(await client.recv_exact(wire.GREETING_SIZE))
    return client


async def closed_by_server(client: RawNbd) -> bool:
    with trio.fail_after(10):
        return await client.at_eof()


def assert_still_serving(server) -> None:
    result = subprocess.run(
        ["nbdinfo", "--size", server.uri("disk")], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(SIZE)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the whole module: "disk" must never be written, "rw" may be."""
    workdir = tmp_path_factory.mktemp("bad-input")
    exports = {
        "disk": make_image(workdir / "disk.img", SIZE),
        "rw": make_image(workdir / "rw.img", SIZE),
    }
    process = BlockdProcess(workdir / "blockd", exports)
    process.start()
    yield process
    process.stop()
    assert "Traceback" not in process.log_text()


def pristine(server) -> bool:
    return server.exports["disk"].read_bytes() == bytes(SIZE)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "first_bytes",
    [
        pytest.param(struct.pack(">I", 0xFFFF_FFFF), id="unknown-client-flags"),
        pytest.param(struct.pack(">I", 0), id="not-fixed-newstyle"),
        pytest.param(
            struct.pack(">I", 3) + b"NOTMAGIC" + struct.pack(">II", 7, 0), id="bad-option-magic"
        ),
        pytest.param(
            struct.pack(">I", 3) + wire.encode_option(Opt.GO)[:12] + b"\xff\xff\xff\xff",
            id="huge-option-length",
        ),
        pytest.param(
            struct.pack(">I", 3) + wire.encode_option(Opt.EXPORT_NAME, b"nope"),
            id="export-name-unknown",
        ),
        pytest.param(
            struct.pack(">I", 3) + wire.encode_option(Opt.EXPORT_NAME, b"\xff\xfe"),
            id="export-name-not-utf8",
        ),
    ],
)
async def test_handshake_violations_close_the_connection(server, first_bytes):
    client = await connect(server.nbd_port)
    await client.stream.send_all(first_bytes)
    assert await closed_by_server(client)
    assert_still_serving(server)


@pytest.mark.timeout(60)
async def test_option_errors_keep_the_haggling_going(server):
    client = await connect(server.nbd_port)
    await client.stream.send_all(wire.encode_client_flags())
    # Unknown option, structured replies, STARTTLS without TLS: ERR_UNSUP.
    for opt, data in ((99, b"xyz"), (Opt.STRUCTURED_REPLY, b""), (Opt.STARTTLS, b"")):
        assert (await client.option(opt, data))[-1][0] == Rep.ERR_UNSUP
    # LIST with data and GO data whose lengths do not add up: ERR_INVALID.
    assert (await client.option(Opt.LIST, b"x"))[-1][0] == Rep.ERR_INVALID
    broken_go = struct.pack(">I", 1000) + b"disk" + struct.pack(">H", 0)
    assert (await client.option(Opt.GO, broken_go))[-1][0] == Rep.ERR_INVALID
    bad_count = wire.encode_info_request("disk", [3])[:-2]
    assert (await client.option(Opt.INFO, bad_count))[-1][0] == Rep.ERR_INVALID
    # A malformed identity suffix and an unknown export are refused, not fatal.
    kind, _ = await client.go("disk@node-without-incarnation")
    assert kind == Rep.ERR_INVALID
    kind, _ = await client.go("nope")
    assert kind == Rep.ERR_UNKNOWN
    # After all that the same connection still opens the export.
    kind, _ = await client.go("disk")
    assert kind == Rep.ACK
    assert await client.call(Cmd.READ, 0, 512) == (0, bytes(512))
    await client.aclose()


@pytest.mark.timeout(60)
async def test_export_name_with_and_without_zero_padding(server):
    for client_flags, pad in ((3, 0), (1, 124)):
        client = await connect(server.nbd_port)
        await client.stream.send_all(struct.pack(">I", client_flags))
        await client.stream.send_all(wire.encode_option(Opt.EXPORT_NAME, b"disk"))
        info = wire.decode_export_name_reply(await client.recv_exact(10))
        assert info.size == SIZE
        assert await client.recv_exact(pad) == bytes(pad)
        assert await client.call(Cmd.READ, 0, 512) == (0, bytes(512))
        await client.aclose()


@pytest.mark.timeout(60)
async def test_invalid_requests_get_nbd_errors_and_nothing_is_written(server):
    client = await RawNbd.connect(server.nbd_port)
    await client.open("disk")
    cases = [
        (dict(cmd=42), NbdErrno.EINVAL),  # unknown command
        (dict(cmd=Cmd.CACHE, length=512), NbdErrno.EINVAL),  # not advertised
        (dict(cmd=Cmd.BLOCK_STATUS, length=512), NbdErrno.EINVAL),
        (dict(cmd=Cmd.READ, length=512, flags=CmdFlag.DF), NbdErrno.EINVAL),  # bad flag
        (dict(cmd=Cmd.READ, length=512, flags=1 << 9), NbdErrno.EINVAL),  # unknown flag
        (dict(cmd=Cmd.WRITE_ZEROES, length=512, flags=CmdFlag.FAST_ZERO), NbdErrno.EINVAL),
        (dict(cmd=Cmd.READ, offset=1, length=512), NbdErrno.EINVAL),  # misaligned
        (dict(cmd=Cmd.READ, offset=SIZE, length=512), NbdErrno.EINVAL),  # past the end
        (dict(cmd=Cmd.READ, length=1 << 30), NbdErrno.EINVAL),  # above maximum payload
        (dict(cmd=Cmd.TRIM, offset=SIZE - 512, length=1024), NbdErrno.EINVAL),
        (dict(cmd=Cmd.WRITE_ZEROES, offset=SIZE, length=512), NbdErrno.ENOSPC),
        (dict(cmd=Cmd.WRITE, offset=SIZE, length=512, payload=b"\xaa" * 512), NbdErrno.ENOSPC),
        (dict(cmd=Cmd.WRITE, offset=100, length=512, payload=b"\xaa" * 512), NbdErrno.EINVAL),
        (dict(cmd=Cmd.WRITE, offset=0, length=100, payload=b"\xaa" * 100), NbdErrno.EINVAL),
    ]
    for case, expected in cases:
        error, _ = await client.call(**case)
        assert error == expected, case
    # FUA is accepted on every command (the spec says so when SEND_FUA is offered).
    assert (await client.call(Cmd.READ, 0, 512, flags=CmdFlag.FUA))[0] == 0
    assert (await client.call(Cmd.FLUSH, flags=CmdFlag.FUA))[0] == 0
    await client.aclose()
    assert pristine(server)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "tail",
    [
        pytest.param(b"\x00" * 28, id="bad-request-magic"),
        pytest.param(
            wire.encode_request(wire.Request(0, Cmd.WRITE, 1, 0, 64 << 20)), id="oversized-write"
        ),
        pytest.param(
            wire.encode_request(wire.Request(0, Cmd.WRITE, 1, 0, 4096)) + b"\xbb" * 1000,
            id="truncated-write-payload",
        ),
        pytest.param(
            wire.encode_request(wire.Request(0, Cmd.READ, 1, 0, 512))[:20], id="truncated-header"
        ),
    ],
)
async def test_broken_transmission_closes_only_that_connection(server, tail):
    client = await RawNbd.connect(server.nbd_port)
    await client.open("disk")
    await client.stream.send_all(tail)
    if tail.startswith(b"\x00") or len(tail) == 28:
        assert await closed_by_server(client)
    await client.aclose()
    assert_still_serving(server)
    assert pristine(server)


@pytest.mark.timeout(60)
async def test_read_write_trim_zero_roundtrip_and_disc(server):
    client = await RawNbd.connect(server.nbd_port)
    await client.open("rw")
    data = bytes(range(256)) * 16
    assert (await client.call(Cmd.WRITE, 4096, 4096, data, flags=CmdFlag.FUA))[0] == 0
    assert await client.call(Cmd.READ, 4096, 4096) == (0, data)
    assert (await client.call(Cmd.WRITE_ZEROES, 4096, 2048, flags=CmdFlag.NO_HOLE))[0] == 0
    assert await client.call(Cmd.READ, 4096, 4096) == (0, bytes(2048) + data[2048:])
    assert (await client.call(Cmd.WRITE_ZEROES, 6144, 2048))[0] == 0
    assert await client.call(Cmd.READ, 4096, 4096) == (0, bytes(4096))
    assert (await client.call(Cmd.TRIM, 0, 65536))[0] == 0
    assert (await client.call(Cmd.FLUSH))[0] == 0
    # Pipelined requests are all answered, matched by cookie.
    lengths = {}
    for cookie in range(100, 132):
        await client.send_request(Cmd.WRITE, cookie, cookie * 4096, 4096, bytes([cookie]) * 4096)
    for cookie in range(200, 232):
        await client.send_request(Cmd.READ, cookie, (cookie - 100) * 4096, 4096)
        lengths[cookie] = 4096
    answers = {}
    for _ in range(64):
        cookie, error, payload = await client.read_reply(lengths)
        answers[cookie] = (error, payload)
    assert sorted(answers) == list(range(100, 132)) + list(range(200, 232))
    assert all(error == 0 for error, _ in answers.values())
    await client.send_request(Cmd.DISC, 999, 0, 0)
    assert await closed_by_server(client)
    image = server.exports["rw"].read_bytes()
    for cookie in range(100, 132):
        assert image[cookie * 4096 : (cookie + 1) * 4096] == bytes([cookie]) * 4096


@pytest.mark.timeout(60)
async def test_garbage_and_silent_clients_do_not_block_others(server):
    junk = await trio.open_tcp_stream("127.0.0.1", server.nbd_port)
    await junk.send_all(b"GET / HTTP/1.1\r\n\r\n" * 10)
    silent = await trio.open_tcp_stream("127.0.0.1", server.nbd_port)  # never speaks
    assert_still_serving(server)
    await junk.aclose()
    await silent.aclose()
    assert_still_serving(server)
