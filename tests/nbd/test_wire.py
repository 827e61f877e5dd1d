"""Wire encoders and decoders: layouts, round trips and refusal of malformed bytes."""

from __future__ import annotations

import struct

import pytest

from gfspy.nbd import wire
from gfspy.nbd.wire import Cmd, InfoType, Opt, Rep, WireError


@pytest.mark.timeout(10)
def test_greeting_bytes_are_the_protocol_constants():
    greeting = wire.encode_greeting()
    assert greeting == b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"
    assert wire.decode_greeting(greeting) == 3
    with pytest.raises(WireError, match="oldstyle"):
        wire.decode_greeting(b"NBDMAGIC" + struct.pack(">QH", 0x00420281861253, 0)[:10])
    with pytest.raises(WireError, match="NBDMAGIC"):
        wire.decode_greeting(b"X" * 18)


@pytest.mark.timeout(10)
def test_option_and_reply_framing():
    raw = wire.encode_option(Opt.GO, b"abc")
    assert raw[:8] == b"IHAVEOPT" and len(raw) == 19
    assert wire.decode_option_header(raw[:16]) == wire.OptionHeader(Opt.GO, 3)
    reply = wire.encode_option_reply(Opt.GO, Rep.ERR_POLICY, b"fenced")
    header = wire.decode_option_reply_header(reply[:20])
    assert (header.opt, header.reply_type, header.length) == (Opt.GO, Rep.ERR_POLICY, 6)
    assert wire.is_error_reply(header.reply_type) and not wire.is_error_reply(Rep.ACK)
    with pytest.raises(WireError):
        wire.decode_option_reply_header(b"\x00" * 20)


@pytest.mark.timeout(10)
def test_info_request_roundtrip_and_length_checks():
    data = wire.encode_info_request("disk@n1:ab", [InfoType.BLOCK_SIZE, InfoType.NAME])
    assert wire.decode_info_request(data) == ("disk@n1:ab", [3, 1])
    with pytest.raises(WireError):
        wire.decode_info_request(data[:-1])  # count says 2 requests, 1.5 follow
    with pytest.raises(WireError):
        wire.decode_info_request(struct.pack(">I", 99) + b"disk\x00\x00")
    with pytest.raises(WireError):
        wire.decode_info_request(struct.pack(">I", 2) + b"\xff\xfe\x00\x00")  # not UTF-8


@pytest.mark.timeout(10)
def test_info_items_decode():
    assert wire.decode_info(wire.encode_info_export(1 << 30, 0x16D)) == wire.ExportInfo(
        1 << 30, 0x16D
    )
    bs = wire.BlockSize(4096, 4096, 1 << 25)
    assert wire.decode_info(wire.encode_info_block_size(bs)) == bs
    assert wire.decode_info(wire.encode_info_description("wwid=x")) == (
        InfoType.DESCRIPTION,
        "wwid=x",
    )
    assert wire.decode_info(b"\x00\x63abc") == (0x63, b"abc")  # unknown: passed through
    with pytest.raises(WireError):
        wire.decode_info(wire.encode_info_export(1, 1)[:-1])


@pytest.mark.timeout(10)
def test_requests_replies_and_export_name_reply():
    req = wire.Request(1, Cmd.WRITE, 0xDEADBEEF, 4096, 512)
    raw = wire.encode_request(req)
    assert len(raw) == 28 and raw[:4] == b"\x25\x60\x95\x13"
    assert wire.decode_request(raw) == req
    with pytest.raises(WireError):
        wire.decode_request(b"\x00" * 28)
    reply = wire.encode_simple_reply(1, 77)
    assert wire.peek_reply_magic(reply) == wire.SIMPLE_REPLY_MAGIC
    assert wire.decode_simple_reply(reply) == wire.SimpleReply(1, 77)
    assert len(wire.encode_export_name_reply(1, 1, no_zeroes=False)) == 10 + 124
    assert wire.decode_export_name_reply(wire.encode_export_name_reply(9, 3, True)) == (
        wire.ExportInfo(9, 3)
    )
    assert wire.decode_rep_server(wire.encode_rep_server("a", "desc")) == ("a", "desc")


@pytest.mark.timeout(10)
def test_export_name_identity_format():
    name = wire.format_export_name("lun0", "node3", 0xABCDEF)
    assert name == "lun0@node3:abcdef"
    assert wire.parse_export_name(name) == wire.ExportIdentity("lun0", "node3", 0xABCDEF)
    assert wire.parse_export_name("lun0") == wire.ExportIdentity("lun0")
    assert wire.parse_export_name("") == wire.ExportIdentity("")
    # The identity is split at the last '@', so an export name may itself hold one.
    assert wire.parse_export_name("a@b@n:1").export == "a@b"
    for bad in (
        "lun0@node3",
        "lun0@:1",
        "lun0@n:",
        "lun0@n:xyz",
        "lun0@n:-1",
        "lun0@n:1" + "0" * 16,
    ):
        with pytest.raises(ValueError):
            wire.parse_export_name(bad)
    for node in ("", "a:b", "a@b"):
        with pytest.raises(ValueError):
            wire.format_export_name("lun0", node, 1)
