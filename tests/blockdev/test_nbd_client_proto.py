"""The sans-IO NBD client machine, fed server bytes by hand (good and hostile)."""

from __future__ import annotations

import errno
import struct

import pytest

from gfspy.blockdev.nbd_client_proto import (
    NEED_DATA,
    ClientConnection,
    ConnectionClosed,
    NbdNegotiationError,
    NbdProtocolError,
    Negotiated,
    Reply,
    StartTLS,
)
from gfspy.nbd import wire
from gfspy.nbd.wire import Cmd, InfoType, Opt, Rep, TransmissionFlag

FLAGS = int(
    TransmissionFlag.HAS_FLAGS
    | TransmissionFlag.SEND_FLUSH
    | TransmissionFlag.SEND_FUA
    | TransmissionFlag.SEND_TRIM
    | TransmissionFlag.SEND_WRITE_ZEROES
)


def info(payload: bytes) -> bytes:
    return wire.encode_option_reply(Opt.GO, Rep.INFO, payload)


BLOCK_4K = wire.BlockSize(4096, 4096, 1 << 20)


def negotiated_client(*, block=BLOCK_4K, desc="wwid=W1; session=s7"):
    """A client that has been through a full GO handshake."""
    c = ClientConnection("lun0@node1:abc")
    c.receive_data(wire.encode_greeting())
    assert c.next_event() is NEED_DATA
    sent = c.data_to_send()
    assert sent[:4] == wire.encode_client_flags()
    header = wire.decode_option_header(sent[4:20])
    assert header.opt == Opt.GO
    name, codes = wire.decode_info_request(sent[20:])
    assert name == "lun0@node1:abc"
    assert InfoType.BLOCK_SIZE in codes
    c.receive_data(info(wire.encode_info_export(1 << 30, FLAGS)))
    if block is not None:
        c.receive_data(info(wire.encode_info_block_size(block)))
    if desc is not None:
        c.receive_data(info(wire.encode_info_description(desc)))
    c.receive_data(wire.encode_option_reply(Opt.GO, Rep.ACK))
    event = c.next_event()
    assert isinstance(event, Negotiated)
    return c, event


@pytest.mark.timeout(10)
def test_handshake_reports_export_properties():
    _, nego = negotiated_client()
    assert nego.size == 1 << 30
    assert nego.block_size == wire.BlockSize(4096, 4096, 1 << 20)
    assert nego.block_size_reported
    assert nego.description == "wwid=W1; session=s7"
    assert nego.can(TransmissionFlag.SEND_FUA) and not nego.read_only


@pytest.mark.timeout(10)
def test_handshake_byte_by_byte():
    c = ClientConnection("x")
    stream = (
        wire.encode_greeting()
        + info(wire.encode_info_export(8192, FLAGS))
        + wire.encode_option_reply(Opt.GO, Rep.ACK)
    )
    events = []
    for i in range(len(stream)):
        c.receive_data(stream[i : i + 1])
        ev = c.next_event()
        if ev is not NEED_DATA:
            events.append(ev)
    assert len(events) == 1 and events[0].size == 8192
    assert not events[0].block_size_reported


@pytest.mark.timeout(10)
def test_pipelined_replies_out_of_order():
    c, _ = negotiated_client()
    read_cookie, read_bytes = c.request(Cmd.READ, 4096, 8192)
    write_cookie, write_bytes = c.request(Cmd.WRITE, 0, payload=b"a" * 4096)
    req = wire.decode_request(write_bytes[:28])
    assert (req.type, req.length, req.cookie) == (Cmd.WRITE, 4096, write_cookie)
    assert write_bytes[28:] == b"a" * 4096
    assert wire.decode_request(read_bytes).offset == 4096
    assert c.inflight_count == 2
    # The write is answered first, then the read, whose payload arrives in pieces.
    c.receive_data(wire.encode_simple_reply(0, write_cookie))
    c.receive_data(wire.encode_simple_reply(0, read_cookie) + b"r" * 100)
    ev = c.next_event()
    assert isinstance(ev, Reply) and ev.cookie == write_cookie and ev.command == Cmd.WRITE
    assert c.next_event() is NEED_DATA
    c.receive_data(b"r" * 8092)
    ev = c.next_event()
    assert isinstance(ev, Reply) and ev.cookie == read_cookie and ev.data == b"r" * 8192
    assert c.inflight_count == 0


@pytest.mark.timeout(10)
def test_read_error_reply_carries_no_payload():
    c, _ = negotiated_client()
    cookie, _ = c.request(Cmd.READ, 0, 4096)
    c.receive_data(wire.encode_simple_reply(wire.NbdErrno.EPERM, cookie))
    ev = c.next_event()
    assert isinstance(ev, Reply) and ev.error == errno.EPERM and ev.data == b""
    assert c.next_event() is NEED_DATA


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "reply_type, err",
    [
        (Rep.ERR_POLICY, errno.EPERM),
        (Rep.ERR_UNKNOWN, errno.ENOENT),
        (Rep.ERR_TLS_REQD, errno.EACCES),
    ],
)
def test_refused_export_is_a_clean_error(reply_type, err):
    c = ClientConnection("lun0")
    c.receive_data(wire.encode_greeting())
    c.next_event()
    c.receive_data(wire.encode_option_reply(Opt.GO, reply_type, b"fenced"))
    with pytest.raises(NbdNegotiationError) as info_:
        c.next_event()
    assert info_.value.errno == err and "fenced" in str(info_.value)
    with pytest.raises(NbdProtocolError):
        c.next_event()  # the machine stays failed


@pytest.mark.timeout(10)
def test_server_without_go_falls_back_to_export_name():
    c = ClientConnection("old")
    c.receive_data(wire.encode_greeting(wire.HandshakeFlag.FIXED_NEWSTYLE))
    c.next_event()
    assert wire.decode_client_flags(c.data_to_send()[:4]) == wire.ClientFlag.C_FIXED_NEWSTYLE
    c.receive_data(wire.encode_option_reply(Opt.GO, Rep.ERR_UNSUP))
    assert c.next_event() is NEED_DATA
    sent = c.data_to_send()
    assert wire.decode_option_header(sent[:16]).opt == Opt.EXPORT_NAME and sent[16:] == b"old"
    c.receive_data(wire.encode_export_name_reply(1 << 20, FLAGS, no_zeroes=False))
    ev = c.next_event()
    assert isinstance(ev, Negotiated) and ev.size == 1 << 20


BAD_HANDSHAKES = {
    "wrong greeting magic": b"NOTMAGIC" + struct.pack(">QH", wire.IHAVEOPT, 3),
    "oldstyle server": struct.pack(">QQ", wire.NBDMAGIC, 0x00420281861253) + b"\0\0",
    "no fixed newstyle": wire.encode_greeting(0),
    "wrong option reply magic": wire.encode_greeting() + struct.pack(">QIII", 1, Opt.GO, Rep.ACK, 0),
    "reply to another option": wire.encode_greeting() + wire.encode_option_reply(Opt.LIST, Rep.ACK),
    "ack without export info": wire.encode_greeting() + wire.encode_option_reply(Opt.GO, Rep.ACK),
    "huge option reply": wire.encode_greeting() + struct.pack(">QIII", wire.OPTION_REPLY_MAGIC, Opt.GO, Rep.INFO, 1 << 30),
    "truncated info export": wire.encode_greeting() + info(b"\0\0\0\0"),
    "bad block size": wire.encode_greeting() + info(wire.encode_info_block_size(wire.BlockSize(3, 4096, 1 << 20))),
    "flags without HAS_FLAGS": wire.encode_greeting() + info(wire.encode_info_export(4096, 0)) + wire.encode_option_reply(Opt.GO, Rep.ACK),
}  # fmt: skip


@pytest.mark.timeout(10)
@pytest.mark.parametrize("case", sorted(BAD_HANDSHAKES))
def test_malformed_handshake_is_a_clean_error(case):
    c = ClientConnection("x")
    c.receive_data(BAD_HANDSHAKES[case])
    with pytest.raises(NbdProtocolError):
        for _ in range(10):
            c.next_event()


@pytest.mark.timeout(10)
def test_eof_during_handshake_is_an_error_not_a_hang():
    c = ClientConnection("x")
    c.receive_data(wire.encode_greeting()[:10])
    assert c.next_event() is NEED_DATA
    c.receive_data(b"")
    with pytest.raises(NbdProtocolError, match="closed"):
        c.next_event()


@pytest.mark.timeout(10)
def test_wrong_reply_magic():
    c, _ = negotiated_client()
    cookie, _ = c.request(Cmd.FLUSH)
    c.receive_data(struct.pack(">IIQ", 0xDEADBEEF, 0, cookie))
    with pytest.raises(NbdProtocolError, match="magic"):
        c.next_event()


@pytest.mark.timeout(10)
def test_unknown_cookie():
    c, _ = negotiated_client()
    c.request(Cmd.FLUSH)
    c.receive_data(wire.encode_simple_reply(0, 0x999))
    with pytest.raises(NbdProtocolError, match="unknown cookie"):
        c.next_event()


@pytest.mark.timeout(10)
def test_structured_reply_that_was_never_negotiated():
    c, _ = negotiated_client()
    cookie, _ = c.request(Cmd.READ, 0, 4096)
    c.receive_data(struct.pack(">IHHQI", wire.STRUCTURED_REPLY_MAGIC, 1, 1, cookie, 0))
    with pytest.raises(NbdProtocolError, match="structured"):
        c.next_event()


@pytest.mark.timeout(10)
def test_truncated_read_payload_then_eof():
    c, _ = negotiated_client()
    cookie, _ = c.request(Cmd.READ, 0, 4096)
    c.receive_data(wire.encode_simple_reply(0, cookie) + b"x" * 1000)
    assert c.next_event() is NEED_DATA
    c.receive_data(b"")
    with pytest.raises(NbdProtocolError, match="mid-read"):
        c.next_event()


@pytest.mark.timeout(10)
def test_truncated_reply_header_then_eof():
    c, _ = negotiated_client()
    cookie, _ = c.request(Cmd.WRITE, 0, payload=bytes(4096))
    c.receive_data(wire.encode_simple_reply(0, cookie)[:7])
    c.receive_data(b"")
    with pytest.raises(NbdProtocolError, match="mid-reply"):
        c.next_event()


@pytest.mark.timeout(10)
def test_clean_eof_between_replies_reports_pending_requests():
    c, _ = negotiated_client()
    cookie, _ = c.request(Cmd.WRITE, 0, payload=bytes(4096))
    c.receive_data(b"")
    ev = c.next_event()
    assert isinstance(ev, ConnectionClosed) and ev.pending == (cookie,)


@pytest.mark.timeout(10)
def test_requests_refused_before_negotiation_and_after_disc():
    c = ClientConnection("x")
    with pytest.raises(NbdProtocolError):
        c.request(Cmd.READ, 0, 512)
    c, _ = negotiated_client()
    _, disc = c.request(Cmd.DISC)
    assert wire.decode_request(disc).type == Cmd.DISC
    with pytest.raises(NbdProtocolError):
        c.request(Cmd.READ, 0, 512)


@pytest.mark.timeout(10)
def test_fua_dropped_when_server_does_not_offer_it():
    c = ClientConnection("x")
    c.receive_data(wire.encode_greeting())
    c.next_event()
    c.receive_data(info(wire.encode_info_export(8192, TransmissionFlag.HAS_FLAGS)))
    c.receive_data(wire.encode_option_reply(Opt.GO, Rep.ACK))
    c.next_event()
    _, data = c.request(Cmd.WRITE, 0, flags=wire.CmdFlag.FUA, payload=bytes(512))
    assert wire.decode_request(data[:28]).flags == 0


@pytest.mark.timeout(10)
def test_starttls_comes_before_go():
    c = ClientConnection("x", tls=True)
    c.receive_data(wire.encode_greeting())
    assert c.next_event() is NEED_DATA
    sent = c.data_to_send()
    assert wire.decode_option_header(sent[4:20]).opt == Opt.STARTTLS and len(sent) == 20
    c.receive_data(wire.encode_option_reply(Opt.STARTTLS, Rep.ACK))
    assert isinstance(c.next_event(), StartTLS)
    assert c.next_event() is NEED_DATA and c.data_to_send() == b""  # nothing in clear text
    c.tls_established()
    assert c.next_event() is NEED_DATA
    assert wire.decode_option_header(c.data_to_send()[:16]).opt == Opt.GO


@pytest.mark.timeout(10)
def test_starttls_refused_or_followed_by_injected_bytes():
    c = ClientConnection("x", tls=True)
    c.receive_data(wire.encode_greeting() + wire.encode_option_reply(Opt.STARTTLS, Rep.ERR_POLICY))
    with pytest.raises(NbdNegotiationError) as e:
        c.next_event()
    assert e.value.errno == errno.EACCES
    c = ClientConnection("x", tls=True)
    c.receive_data(
        wire.encode_greeting()
        + wire.encode_option_reply(Opt.STARTTLS, Rep.ACK)
        + wire.encode_option_reply(Opt.GO, Rep.ACK)
    )
    with pytest.raises(NbdProtocolError, match="plaintext"):
        c.next_event()


@pytest.mark.timeout(60)
def test_random_server_bytes_only_ever_give_protocol_errors():
    """Garbage in any chunking: NEED_DATA, events, or our two error types, nothing else."""
    import random

    rng = random.Random(1234)
    for trial in range(300):
        handshake_done = trial % 2 == 0
        if handshake_done:
            c, _ = negotiated_client()
            for _ in range(rng.randrange(1, 4)):
                c.request(Cmd.READ, 0, rng.choice([512, 4096]))
                c.request(Cmd.WRITE, 0, payload=bytes(512))
        else:
            c = ClientConnection("x")
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        if rng.random() < 0.5:  # sometimes a valid prefix, then junk
            junk = wire.encode_greeting() + junk if not handshake_done else junk
        pos = 0
        try:
            while pos < len(junk):
                step = rng.randrange(1, 40)
                c.receive_data(junk[pos : pos + step])
                pos += step
                for _ in range(50):
                    if c.next_event() is NEED_DATA:
                        break
            c.receive_data(b"")
            for _ in range(50):
                ev = c.next_event()
                if ev is NEED_DATA or isinstance(ev, ConnectionClosed):
                    break
        except (NbdProtocolError, NbdNegotiationError):
            pass


@pytest.mark.timeout(10)
def test_large_write_payload_is_sent_as_its_own_buffer():
    c, _ = negotiated_client()
    big = memoryview(bytearray(1 << 20))
    cookie, parts = c.request_parts(Cmd.WRITE, 4096, payload=big)
    assert len(parts) == 2 and parts[1] is big
    req = wire.decode_request(parts[0])
    assert (req.cookie, req.offset, req.length) == (cookie, 4096, 1 << 20)
    _, small = c.request_parts(Cmd.WRITE, 0, payload=b"s" * 512)
    assert len(small) == 1 and small[0][28:] == b"s" * 512
