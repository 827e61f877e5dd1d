"""The sans-IO server machine: feed bytes, check events and the bytes it wants to send."""

from __future__ import annotations

import struct

import pytest

from gfspy.nbd import server_proto as sp
from gfspy.nbd import wire
from gfspy.nbd.wire import Cmd, CmdFlag, NbdErrno, Opt, Rep, TransmissionFlag

BLOCK = wire.BlockSize(4096, 4096, 1 << 20)
SIZE = 1 << 20
FLAGS = TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA


def events(conn: sp.ServerConnection, data: bytes = b"") -> list:
    conn.receive_data(data)
    out = []
    while (event := conn.next_event()) is not sp.NEED_DATA:
        out.append(event)
    return out


def replies(raw: bytes) -> list[tuple[int, int, bytes]]:
    """Split option replies into (opt, type, data)."""
    out = []
    while raw:
        head = wire.decode_option_reply_header(raw[:20])
        out.append((head.opt, head.reply_type, raw[20 : 20 + head.length]))
        raw = raw[20 + head.length :]
    return out


def haggling(tls: sp.TLSMode = sp.TLSMode.NONE) -> sp.ServerConnection:
    conn = sp.ServerConnection(tls_mode=tls)
    assert conn.data_to_send() == wire.encode_greeting()
    assert events(conn, wire.encode_client_flags()) == []
    assert conn.state is sp.State.OPTIONS
    return conn


def transmitting(flags: int = FLAGS) -> sp.ServerConnection:
    conn = haggling()
    [event] = events(conn, wire.encode_option(Opt.GO, wire.encode_info_request("d", [])))
    assert isinstance(event, sp.ExportRequested)
    conn.accept_export(SIZE, flags, BLOCK)
    conn.data_to_send()
    assert conn.state is sp.State.TRANSMISSION
    return conn


def request(cmd: int, offset: int = 0, length: int = 0, flags: int = 0, cookie: int = 1) -> bytes:
    return wire.encode_request(wire.Request(flags, cmd, cookie, offset, length))


@pytest.mark.timeout(10)
def test_go_answers_export_and_block_size_then_ack():
    conn = haggling()
    go = wire.encode_option(Opt.GO, wire.encode_info_request("lun@n1:ff", [3, 1, 2]))
    # Bytes may arrive one at a time: nothing happens until the option is complete.
    for byte in go[:-1]:
        assert events(conn, bytes([byte])) == []
    [event] = events(conn, go[-1:])
    assert event == sp.ExportRequested(Opt.GO, "lun@n1:ff", (3, 1, 2))
    assert conn.state is sp.State.AWAIT_DECISION
    conn.accept_export(SIZE, FLAGS, BLOCK, canonical_name="lun", description="wwid=x")
    got = replies(conn.data_to_send())
    assert [t for _, t, _ in got] == [Rep.INFO] * 4 + [Rep.ACK]
    items = [wire.decode_info(d) for _, t, d in got if t == Rep.INFO]
    assert items[0] == wire.ExportInfo(SIZE, FLAGS | TransmissionFlag.HAS_FLAGS)
    assert items[1] == BLOCK
    assert (wire.InfoType.NAME, "lun") in items and (wire.InfoType.DESCRIPTION, "wwid=x") in items
    assert conn.state is sp.State.TRANSMISSION


@pytest.mark.timeout(10)
def test_info_returns_to_haggling_and_refusals_keep_the_connection():
    conn = haggling()
    [event] = events(conn, wire.encode_option(Opt.INFO, wire.encode_info_request("x", [])))
    conn.accept_export(SIZE, FLAGS, BLOCK)
    assert replies(conn.data_to_send())[-1][1] == Rep.ACK
    assert conn.state is sp.State.OPTIONS
    events(conn, wire.encode_option(Opt.GO, wire.encode_info_request("x", [])))
    conn.refuse_export(Rep.ERR_POLICY, "fenced: node n1 is fenced")
    [(opt, kind, text)] = replies(conn.data_to_send())
    assert (opt, kind) == (Opt.GO, Rep.ERR_POLICY) and text.startswith(b"fenced")
    assert conn.state is sp.State.OPTIONS


@pytest.mark.timeout(10)
def test_options_the_machine_answers_itself():
    conn = haggling()
    data = (
        wire.encode_option(99, b"ignored")
        + wire.encode_option(Opt.STRUCTURED_REPLY)
        + wire.encode_option(Opt.STARTTLS)
        + wire.encode_option(Opt.LIST, b"junk")
        + wire.encode_option(Opt.GO, b"\x00\x00\x10\x00abc")
    )
    assert events(conn, data) == []
    kinds = [(o, t) for o, t, _ in replies(conn.data_to_send())]
    assert kinds == [
        (99, Rep.ERR_UNSUP),
        (Opt.STRUCTURED_REPLY, Rep.ERR_UNSUP),
        (Opt.STARTTLS, Rep.ERR_UNSUP),
        (Opt.LIST, Rep.ERR_INVALID),
        (Opt.GO, Rep.ERR_INVALID),
    ]
    [event] = events(conn, wire.encode_option(Opt.LIST))
    assert event == sp.ListRequested()
    conn.send_list([("a", "first"), ("b", "")])
    got = replies(conn.data_to_send())
    assert [wire.decode_rep_server(d) for _, t, d in got if t == Rep.SERVER] == [
        ("a", "first"),
        ("b", ""),
    ]
    assert got[-1][1] == Rep.ACK


@pytest.mark.timeout(10)
def test_abort_acks_and_stops_reading():
    conn = haggling()
    assert events(conn, wire.encode_option(Opt.ABORT, b"x") + b"trailing junk") == [
        sp.AbortRequested()
    ]
    assert replies(conn.data_to_send()) == [(Opt.ABORT, Rep.ACK, b"")]
    assert conn.state is sp.State.DONE
    assert events(conn, b"more") == []


@pytest.mark.timeout(10)
def test_forced_tls_refuses_everything_but_starttls():
    conn = haggling(sp.TLSMode.FORCED)
    events(conn, wire.encode_option(Opt.LIST) + wire.encode_option(Opt.GO, b""))
    assert [t for _, t, _ in replies(conn.data_to_send())] == [Rep.ERR_TLS_REQD] * 2
    assert events(conn, wire.encode_option(Opt.STARTTLS)) == [sp.StartTLSRequested()]
    assert replies(conn.data_to_send()) == [(Opt.STARTTLS, Rep.ACK, b"")]
    assert conn.state is sp.State.AWAIT_TLS
    conn.tls_established()
    events(conn, wire.encode_option(Opt.STARTTLS))
    assert replies(conn.data_to_send())[0][1] == Rep.ERR_INVALID  # already on
    [event] = events(conn, wire.encode_option(Opt.LIST))
    assert event == sp.ListRequested()
    # A client that does not wait for the ACK before its TLS hello breaks the protocol.
    eager = haggling(sp.TLSMode.FORCED)
    [event] = events(eager, wire.encode_option(Opt.STARTTLS) + b"\x16\x03\x01")
    assert isinstance(event, sp.ProtocolError)
    # EXPORT_NAME cannot carry an error, so without TLS it can only hang up.
    plain = haggling(sp.TLSMode.FORCED)
    [event] = events(plain, wire.encode_option(Opt.EXPORT_NAME, b"d"))
    assert isinstance(event, sp.ProtocolError)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "client_bytes",
    [
        struct.pack(">I", 0xFFFF_FFFF),  # unknown client flag bits
        struct.pack(">I", 1 << 2),
        struct.pack(">I", 0),  # no fixed newstyle
        struct.pack(">I", 3) + b"NOTMAGIC" + b"\x00" * 8,
        struct.pack(">I", 3) + wire.encode_option(Opt.GO)[:12] + struct.pack(">I", 1 << 20),
    ],
)
def test_handshake_violations_are_protocol_errors(client_bytes):
    conn = sp.ServerConnection()
    conn.data_to_send()
    got = events(conn, client_bytes)
    assert len(got) == 1 and isinstance(got[0], sp.ProtocolError)
    assert conn.state is sp.State.DONE
    assert events(conn, wire.encode_option(Opt.LIST)) == []


@pytest.mark.timeout(10)
def test_export_name_reply_and_refusal():
    conn = sp.ServerConnection()
    conn.data_to_send()
    events(conn, struct.pack(">I", 1))  # no NO_ZEROES: 124 bytes of padding
    [event] = events(conn, wire.encode_option(Opt.EXPORT_NAME, b"lun"))
    assert event == sp.ExportRequested(Opt.EXPORT_NAME, "lun")
    conn.accept_export(SIZE, FLAGS, BLOCK)
    out = conn.data_to_send()
    assert len(out) == 134 and out[10:] == bytes(124)
    assert wire.decode_export_name_reply(out[:10]).size == SIZE
    refused = haggling()
    events(refused, wire.encode_option(Opt.EXPORT_NAME, b"nope"))
    refused.refuse_export(Rep.ERR_UNKNOWN, "no such export")
    assert refused.data_to_send() == b"" and refused.state is sp.State.DONE


@pytest.mark.timeout(10)
def test_pipelined_requests_and_write_payload_framing():
    conn = transmitting()
    payload = b"\xab" * 8192
    data = (
        request(Cmd.WRITE, 4096, 8192, CmdFlag.FUA, cookie=1)
        + payload
        + request(Cmd.READ, 0, 4096, cookie=2)
        + request(Cmd.FLUSH, cookie=3)
        + request(Cmd.WRITE_ZEROES, 0, 4096, CmdFlag.NO_HOLE, cookie=4)
    )
    got = events(conn, data[:100])  # the write payload is incomplete
    assert got == []
    got = events(conn, data[100:])
    assert [type(e) for e in got] == [sp.Command] * 4
    assert got[0].payload == payload and got[0].request.flags == CmdFlag.FUA
    assert [e.request.cookie for e in got] == [1, 2, 3, 4]
    assert events(conn, request(Cmd.DISC) + b"ignored after DISC") == [sp.DisconnectRequested()]


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("cmd", "offset", "length", "flags", "error"),
    [
        (42, 0, 0, 0, NbdErrno.EINVAL),
        (Cmd.CACHE, 0, 4096, 0, NbdErrno.EINVAL),
        (Cmd.READ, 0, 4096, CmdFlag.DF, NbdErrno.EINVAL),
        (Cmd.READ, 0, 4096, 1 << 12, NbdErrno.EINVAL),
        (Cmd.WRITE_ZEROES, 0, 4096, CmdFlag.FAST_ZERO, NbdErrno.EINVAL),
        (Cmd.READ, 512, 4096, 0, NbdErrno.EINVAL),
        (Cmd.READ, 0, 1000, 0, NbdErrno.EINVAL),
        (Cmd.READ, SIZE, 4096, 0, NbdErrno.EINVAL),
        (Cmd.READ, 0, 2 << 20, 0, NbdErrno.EINVAL),
        (Cmd.TRIM, SIZE - 4096, 8192, 0, NbdErrno.EINVAL),
        (Cmd.WRITE_ZEROES, SIZE, 4096, 0, NbdErrno.ENOSPC),
    ],
)
def test_invalid_requests_are_rejected_with_the_right_error(cmd, offset, length, flags, error):
    conn = transmitting()
    [event] = events(conn, request(cmd, offset, length, flags))
    assert isinstance(event, sp.CommandRejected) and event.error == error
    assert conn.state is sp.State.TRANSMISSION


@pytest.mark.timeout(10)
def test_write_errors_consume_the_payload_and_read_only_gives_eperm():
    conn = transmitting()
    bad = request(Cmd.WRITE, SIZE, 4096) + b"x" * 4096 + request(Cmd.READ, 0, 4096, cookie=9)
    rejected, ok = events(conn, bad)
    assert rejected.error == NbdErrno.ENOSPC and ok.request.cookie == 9
    ro = transmitting(FLAGS | TransmissionFlag.READ_ONLY)
    [event] = events(ro, request(Cmd.WRITE, 0, 4096) + b"y" * 4096)
    assert event.error == NbdErrno.EPERM
    [event] = events(ro, request(Cmd.READ, 0, 4096))
    assert isinstance(event, sp.Command)


@pytest.mark.timeout(10)
def test_bad_magic_and_oversized_write_end_transmission():
    conn = transmitting()
    [event] = events(conn, b"\x00" * 28)
    assert isinstance(event, sp.ProtocolError) and conn.state is sp.State.DONE
    conn = transmitting()
    [event] = events(conn, request(Cmd.WRITE, 0, 64 << 20))
    assert isinstance(event, sp.ProtocolError) and "maximum" in event.reason


@pytest.mark.timeout(10)
def test_answering_without_a_pending_request_is_a_bug():
    conn = haggling()
    with pytest.raises(RuntimeError):
        conn.accept_export(SIZE, FLAGS, BLOCK)
    with pytest.raises(RuntimeError):
        conn.tls_established()
