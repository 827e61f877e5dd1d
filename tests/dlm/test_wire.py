"""Codecs and links: strict decoding, bad input over real TCP, resend after reconnect."""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys

import msgpack
import pytest
import trio

from gfspy.dlm.messages import (
    FrameDecoder,
    FrameType,
    MessageError,
    MsgType,
    decode_message,
    encode_data_frame,
    encode_frame,
    encode_message,
)
from gfspy.dlm.modes import Mode
from gfspy.dlm.transport import Transport

from .cluster_helper import LoopbackCluster, eventually


def test_message_roundtrip_and_strict_rejection():
    raw = encode_message(MsgType.REQUEST, b"fs", 2, 77, 3, b"inode-5", 9, 5, 8, True, bytes(32))
    msg = decode_message(raw)
    assert (msg.type, msg.from_node, msg.epoch, msg.name, msg.lkid, msg.wants_bast) == (
        MsgType.REQUEST, 2, 3, b"inode-5", 9, True,
    )  # fmt: skip
    bad = [
        raw[:-5],  # truncated
        b"\xc1",  # reserved msgpack byte
        msgpack.packb({"a": 1}),  # not an array
        encode_message(
            MsgType.REQUEST, b"fs", 2, 77, 3, b"inode-5", 9, 5, 8, True
        ),  # field missing
        encode_message(
            MsgType.REQUEST, b"fs", 2, 77, 3, "inode-5", 9, 5, 8, True, None
        ),  # str name
        encode_message(MsgType.REQUEST, b"fs", 2, 77, 3, b"x", 9, 9, 8, True, None),  # mode 9
        encode_message(MsgType.REQUEST, b"fs", 2, 77, 3, b"x", 9, 5, 8, True, b"short"),  # LVB
        encode_message(MsgType.REQUEST, b"fs", 2, 77, 3, b"x" * 65, 9, 5, 8, True, None),
        encode_message(MsgType.RLOCKS, b"fs", 2, 77, 3, b"x", [[1, 2, 3]]),
        msgpack.packb([99, 1, b"fs", 2, 77, 3]),  # protocol version
        msgpack.packb([1, 200, b"fs", 2, 77, 3]),  # message type
    ]
    for payload in bad:
        with pytest.raises(MessageError):
            decode_message(payload)


def test_frame_decoder_reassembles_and_rejects():
    frames = encode_frame(FrameType.DATA, 1, b"abc") + encode_frame(FrameType.ACK, 1)
    dec = FrameDecoder()
    got = []
    for i in range(len(frames)):  # one byte at a time
        got += dec.feed(frames[i : i + 1])
    assert got == [(FrameType.DATA, [1, b"abc"]), (FrameType.ACK, [1])]
    with pytest.raises(MessageError):
        FrameDecoder().feed(b"\xff\xff\xff\xff")
    with pytest.raises(MessageError):
        FrameDecoder().feed(encode_frame(FrameType.DATA, "x", b""))


async def _raw_link(transport: Transport, node_id: int, incarnation: int):
    host, port = transport.host, transport.port
    stream = await trio.open_tcp_stream(host, port)
    await stream.send_all(encode_frame(FrameType.HELLO, node_id, incarnation, transport.node_id))
    dec = FrameDecoder()
    frames = []
    while not frames:
        frames = dec.feed(await stream.receive_some(4096))
    assert frames[0][0] == FrameType.HELLO_ACK
    return stream


@pytest.mark.timeout(30)
async def test_bad_input_is_dropped_with_a_log_line_and_node_stays_up(caplog):
    caplog.set_level(logging.INFO)
    async with trio.open_nursery() as nursery:
        c = LoopbackCluster(nursery)
        await c.add_nodes(1, 2)
        await c.change_view()
        t1 = c.transports[1]
        inc2 = c.transports[2].incarnation
        # 1. garbage instead of a HELLO: the connection is closed
        s = await trio.open_tcp_stream(t1.host, t1.port)
        await s.send_all(b"\xff\xff\xff\xffgarbage")
        assert await s.receive_some(100) == b""
        # 2. a stranger (node 9) with a well-formed request; 3. a stale incarnation of
        # node 2; 4. an unknown lockspace; 5. malformed payload; 6. a header claiming
        # another node; 7. a frame cut in the middle.
        stranger = await _raw_link(t1, 9, 1)
        req = encode_message(MsgType.REQUEST, b"fs", 9, 1, 1, b"victim", 1, Mode.EX, 0, False, None)
        await stranger.send_all(encode_data_frame(1, req))
        stale = await _raw_link(t1, 2, inc2 + 1)
        req = encode_message(
            MsgType.REQUEST, b"fs", 2, inc2 + 1, 1, b"victim", 1, Mode.EX, 0, False, None
        )
        await stale.send_all(encode_data_frame(1, req))
        other_ls = encode_message(MsgType.LOOKUP, b"nosuchfs", 9, 1, 1, b"victim")
        liar = encode_message(MsgType.LOOKUP, b"fs", 2, inc2, 1, b"victim")
        await stranger.send_all(
            encode_data_frame(2, other_ls)
            + encode_frame(FrameType.DATA, 3, b"\x93\x01")
            + encode_data_frame(4, liar)
            + encode_frame(FrameType.DATA, 5, b"x" * 10)[:9]
        )
        await trio.sleep(0.1)  # let the acks for the whole frames go out first
        await stranger.aclose()
        await stale.aclose()
        expected = [
            "dropped REQUEST from non-member node 9",
            f"dropped REQUEST from non-member node 2 (incarnation {inc2 + 1})",
            "unknown lockspace b'nosuchfs'",
            "dropped malformed message from node 9",
            "claiming node 2",
            "closed mid-frame",
            "protocol error",
        ]
        await eventually(lambda: all(line in caplog.text for line in expected))
        text = caplog.text
        assert "dropped REQUEST from non-member node 9" in text
        assert f"dropped REQUEST from non-member node 2 (incarnation {inc2 + 1})" in text
        assert "unknown lockspace b'nosuchfs'" in text
        assert "dropped malformed message from node 9" in text
        assert "claiming node 2" in text
        assert "closed mid-frame" in text
        assert "protocol error" in text
        assert b"victim" not in c.spaces[1].masters
        # the agent still works
        h = await c.spaces[2].lock(b"victim", Mode.EX)
        assert h.mode == Mode.EX
        await c.close()
        nursery.cancel_scope.cancel()


@pytest.mark.timeout(30)
async def test_link_resends_after_reconnect_exactly_once_in_order():
    async with trio.open_nursery() as nursery:
        a = Transport(1, random.getrandbits(32), "127.0.0.1")
        b = Transport(2, random.getrandbits(32), "127.0.0.1")
        await a.start(nursery)
        await b.start(nursery)
        got: list[int] = []
        done = trio.Event()

        def on_msg(msg):
            got.append(msg.step)
            if len(got) == 3000:
                done.set()

        b.register(b"t", on_msg)
        a.set_peer(2, b.address)
        for i in range(3000):
            a.send(2, encode_message(MsgType.BARRIER, b"t", 1, a.incarnation, 1, i, []))
            if i % 500 == 250:
                await trio.sleep(0.005)
                await a.reset_link(2)  # the connection dies with messages in flight
        with trio.fail_after(20):
            await done.wait()
        assert got == list(range(3000))
        await a.aclose()
        await b.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.timeout(30)
async def test_peer_that_never_acknowledges_is_reported_once():
    async with trio.open_nursery() as nursery:
        a = Transport(1, random.getrandbits(32), "127.0.0.1")
        await a.start(nursery)
        # a listening socket that never answers stands in for a hung peer
        silent = trio.socket.socket()
        await silent.bind(("127.0.0.1", 0))
        silent.listen()
        reported = []
        a.max_unacked = 10
        a.hello_timeout = 0.05
        a.on_overflow = reported.append
        a.set_peer(2, f"127.0.0.1:{silent.getsockname()[1]}")
        for i in range(25):
            a.send(2, encode_message(MsgType.BARRIER, b"t", 1, a.incarnation, 1, i, []))
        assert reported == [2] and a.unacked(2) == 25  # reported once, nothing dropped
        # the silent peer never completes the handshake: the link keeps retrying, the
        # transport stays up and keeps serving others
        await trio.sleep(0.3)
        b = Transport(3, random.getrandbits(32), "127.0.0.1")
        await b.start(nursery)
        got = []
        b.register(b"t", got.append)
        a.set_peer(3, b.address)
        a.send(3, encode_message(MsgType.BARRIER, b"t", 1, a.incarnation, 1, 7, []))
        with trio.fail_after(5):
            while not got:
                await trio.sleep(0.01)
        assert got[0].step == 7 and a.unacked(2) == 25
        await b.aclose()
        silent.close()
        await a.aclose()
        nursery.cancel_scope.cancel()


def test_directory_node_is_stable_and_spread_over_members():
    from collections import Counter

    from gfspy.dlm.directory import Directory, directory_node, name_hash

    members = (1, 2, 5, 9)
    names = [f"inode-{i}".encode() for i in range(4000)]
    spread = Counter(directory_node(n, members) for n in names)
    assert set(spread) == set(members)
    assert min(spread.values()) > 4000 / len(members) / 2  # no member starved
    # every node must compute the same answer: not Python's per-process salted hash()
    other = subprocess.run(
        [sys.executable, "-c", "from gfspy.dlm.directory import name_hash; print(name_hash(b'inode-1'))"],
        env={**os.environ, "PYTHONHASHSEED": "12345"}, capture_output=True, text=True, check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )  # fmt: skip
    assert int(other.stdout) == name_hash(b"inode-1")
    d = Directory()
    assert d.lookup(b"x", 5) == 5 and d.lookup(b"x", 9) == 5  # first asker masters
