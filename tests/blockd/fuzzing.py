"""Fuzz-frame generators and independent oracles for gfspy-blockd's two wire protocols.

Generators build hostile client byte streams from a seeded `random.Random`, so one seed
replays one run.  The oracles re-frame exactly the bytes a fuzzer sent (NBD options,
NBD requests, control frames) the way the protocol defines them, and then judge what the
server sent back: right magics, one final reply per option in order, one simple reply
per request cookie, nothing accepted that breaks a MUST, and nothing after a fatal
frame.  They never look at the server's code paths, only at bytes.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field

import msgpack

from gfspy.blockd.control_wire import MAX_FRAME, OPS
from gfspy.nbd import wire
from gfspy.nbd.wire import Cmd, CmdFlag, NbdErrno, Opt, Rep

U32 = (1 << 32) - 1
U64 = (1 << 64) - 1
_OPTION_HEADER = struct.Struct(">QII")
_REQUEST = struct.Struct(">IHHQQI")
_CONTROL_LENGTH = struct.Struct(">I")
KNOWN_NBD_ERRORS = {int(e) for e in NbdErrno}
CONTROL_STATUSES = {"OK", "CONFIRMED", "FAILED", "ERROR"}
# What a request may carry and still be served (the NBD spec's MUSTs for our export
# flags: FUA everywhere, NO_HOLE only on WRITE_ZEROES).
_SERVABLE_FLAGS = {
    Cmd.READ: CmdFlag.FUA,
    Cmd.WRITE: CmdFlag.FUA,
    Cmd.FLUSH: CmdFlag.FUA,
    Cmd.TRIM: CmdFlag.FUA,
    Cmd.WRITE_ZEROES: CmdFlag.FUA | CmdFlag.NO_HOLE,
}
# Node names the control fuzzer may fence: never the identity of the good client.
# Some NBD fuzzers open the export as a victim node, so fences hit live sessions.
FUZZ_NODE_PREFIX = "fz-ctl-"
VICTIM_NODES = ("fz-victim-0", "fz-victim-1")


class OracleError(AssertionError):
    """The server's bytes contradict the protocol for the bytes it was sent."""


@dataclass(frozen=True)
class ExportFacts:
    """What the fuzzers know about the exports, to judge replies."""

    sizes: dict[int, str]  # export size -> export name (sizes are distinct on purpose)
    minimum_block: int
    maximum_payload: int


@dataclass
class ModelRequest:
    req: wire.Request
    payload: bytes


@dataclass
class Verdict:
    """What one connection showed, for the test's totals."""

    frames: int = 0
    answers: int = 0
    closed_by_server: bool = False
    sessions_fenced: int = 0
    fully_answered: bool = False  # ended by DISC and every request got its reply
    writes: list[tuple[str, ModelRequest]] = field(default_factory=list)


# --- generators: NBD handshake ------------------------------------------------------

NAME_POOL: list[bytes] = [
    b"fuzz",
    b"",
    b"nope",
    b"fuzz@fz-nbd:1",
    b"fuzz@fz-nbd:zz",
    b"fuzz@:",
    b"fuzz@fz-nbd:" + b"f" * 40,
    b"\xff\xfefuzz",
    b"x" * 5000,
    b"fuzz\x00",
]


def _go_data(rng: random.Random, name: bytes) -> bytes:
    codes = [rng.choice([0, 1, 2, 3, rng.randrange(1 << 16)]) for _ in range(rng.randrange(4))]
    return (
        struct.pack(">I", len(name)) + name + struct.pack(">H", len(codes))
        + b"".join(struct.pack(">H", c) for c in codes)
    )  # fmt: skip


def option_template(rng: random.Random) -> bytes:
    """One option frame, well formed before mutation."""
    name = rng.choice(NAME_POOL)
    kind = rng.randrange(9)
    if kind == 0:
        return wire.encode_option(Opt.LIST)
    if kind in (1, 2):
        return wire.encode_option(rng.choice([Opt.INFO, Opt.GO]), _go_data(rng, name))
    if kind == 3:
        return wire.encode_option(Opt.EXPORT_NAME, name)
    if kind == 4:
        return wire.encode_option(Opt.ABORT)
    if kind == 5:
        opt = rng.choice([Opt.STARTTLS, Opt.STRUCTURED_REPLY, Opt.LIST_META_CONTEXT])
        return wire.encode_option(opt, rng.randbytes(rng.randrange(3) * 8))
    if kind == 6:
        return wire.encode_option(Opt.LIST, rng.randbytes(rng.randrange(1, 20)))
    opt = rng.choice([rng.randrange(12, 64), rng.randrange(1 << 32)])
    return wire.encode_option(opt, rng.randbytes(rng.randrange(64)))


def mutate_option(rng: random.Random, frame: bytes) -> bytes:
    """Bit flips, truncation, wrong or huge lengths, wrong magic, unknown ids."""
    head = bytearray(frame[:16])
    data = frame[16:]
    kind = rng.randrange(8)
    if kind == 0:
        return flip_bits(rng, frame, rng.randrange(1, 4))
    if kind == 1:
        return frame[: rng.randrange(len(frame))]
    if kind == 2:
        delta = rng.choice([-3, -1, 1, 2, 100])
        struct.pack_into(">I", head, 12, max(0, len(data) + delta))
    elif kind == 3:
        struct.pack_into(">I", head, 12, rng.choice([wire.MAX_OPTION_DATA + 1, U32, 1 << 31]))
    elif kind == 4:
        head[: 8] = rng.choice([b"IHAVEOPt", b"NBDMAGIC", rng.randbytes(8)])  # fmt: skip
    elif kind == 5:
        struct.pack_into(">I", head, 8, rng.randrange(1 << 32))
    elif kind == 6:
        return frame + rng.randbytes(rng.randrange(1, 40))
    else:
        return frame
    return bytes(head) + data


def flip_bits(rng: random.Random, data: bytes, count: int) -> bytes:
    if not data:
        return data
    out = bytearray(data)
    for _ in range(count):
        bit = rng.randrange(len(out) * 8)
        out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def handshake_frames(rng: random.Random) -> tuple[bytes, list[bytes]]:
    """Client flags (rarely wrong) and a run of (mostly mutated) option frames."""
    flags = wire.encode_client_flags()
    if rng.random() < 0.1:
        flags = struct.pack(">I", rng.choice([0, 2, 4, 0xFFFFFFFF, rng.randrange(1 << 32)]))
    frames = [option_template(rng) for _ in range(rng.randrange(1, 12))]
    return flags, [mutate_option(rng, f) if rng.random() < 0.6 else f for f in frames]


def handshake_stream(rng: random.Random) -> tuple[bytes, int]:
    """The same, pipelined into one byte stream; returns (bytes, frames)."""
    flags, frames = handshake_frames(rng)
    return flags + b"".join(frames), len(frames) + 1


# --- generators: NBD transmission ---------------------------------------------------


def request_template(rng: random.Random, facts: ExportFacts, size: int) -> bytes:
    """One request (with its WRITE payload), from well formed to nonsense."""
    block = facts.minimum_block
    cmd = rng.choice(
        [Cmd.READ] * 4 + [Cmd.WRITE] * 4
        + [Cmd.FLUSH, Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.CACHE, Cmd.BLOCK_STATUS]
        + [rng.randrange(8, 1 << 16)]
    )  # fmt: skip
    flags = rng.choice([0, 0, 0, CmdFlag.FUA, CmdFlag.NO_HOLE, CmdFlag.DF, rng.randrange(1 << 16)])
    cookie = rng.randrange(1 << 64)
    blocks = size // block
    offset = rng.choice(
        [
            rng.randrange(blocks) * block,
            rng.randrange(blocks) * block,
            rng.randrange(size),  # unaligned
            size - block,
            size,
            rng.randrange(size, U64),  # past the end, possibly overflowing
            U64 - block + 1,
        ]
    )
    length = rng.choices(
        [
            block * rng.randrange(1, 17),
            0,
            rng.randrange(1, 3 * block),  # unaligned
            facts.maximum_payload,
            facts.maximum_payload + block,  # a WRITE this big is fatal
            U32 - U32 % block,
            rng.randrange(U32),
        ],
        [60, 4, 15, 5, 3, 3, 4],
    )[0]
    header = _REQUEST.pack(wire.REQUEST_MAGIC, flags, cmd, cookie, offset, length)
    if rng.random() < 0.03:
        header = flip_bits(rng, header, 1)  # may hit the magic: a fatal frame
    if cmd != Cmd.WRITE:
        return header
    # Only modest payloads are really sent; big declared lengths end up truncated.
    sent = min(length, 256 * 1024)
    payload = payload_pattern(rng, sent)
    if rng.random() < 0.1:
        payload = payload[: rng.randrange(len(payload) + 1)]  # truncated payload
    return header + payload


def payload_pattern(rng: random.Random, length: int) -> bytes:
    """Recognisable nonzero data (a random byte per 512-byte sector)."""
    out = bytearray()
    while len(out) < length:
        out += bytes([rng.randrange(1, 256)]) * 512
    return bytes(out[:length])


def request_stream(rng: random.Random, facts: ExportFacts, size: int) -> tuple[bytes, int]:
    frames = [request_template(rng, facts, size) for _ in range(rng.randrange(1, 40))]
    if rng.random() < 0.05:
        frames.append(rng.randbytes(rng.randrange(1, 200)))  # trailing garbage
    return b"".join(frames), len(frames)


# --- generators: control channel ----------------------------------------------------


def _random_value(rng: random.Random, depth: int = 0) -> object:
    choices = [
        lambda: rng.randrange(-(1 << 63), 1 << 63),
        lambda: rng.randrange(1 << 64),
        lambda: rng.random() * 1e9,
        lambda: rng.choice([True, False, None, "all", ""]),
        lambda: FUZZ_NODE_PREFIX + rng.randbytes(4).hex(),
        lambda: rng.randbytes(rng.randrange(8)),
        lambda: "z" * rng.randrange(1, 2000),
    ]
    if depth < 3:
        choices.append(lambda: [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))])
        choices.append(lambda: {"k": _random_value(rng, depth + 1)})
    return rng.choice(choices)()


def control_request(rng: random.Random) -> object:
    """A msgpack-able request: right ops with wrong arguments, wrong ops, wrong types."""
    kind = rng.randrange(6)
    if kind == 0:
        return _random_value(rng)  # not a map at all (fatal)
    op = rng.choice([*OPS, "fence", "NOPE", "", 7, None])
    request: dict = {"op": op}
    for key in rng.sample(["node", "incarnation", "epoch", "session_id", "extra"], 3):
        if rng.random() < 0.7:
            request[key] = _random_value(rng)
    if kind in (1, 2) and op in OPS:
        # Well-typed arguments, so the real code paths run (on fuzz-only node names).
        request.update(
            node=rng.choice([FUZZ_NODE_PREFIX + str(rng.randrange(20)), *VICTIM_NODES]),
            incarnation=rng.choice([None, "all", rng.randrange(1 << 64), "abc"]),
            epoch=rng.randrange(100),
            session_id="no-such-session",
        )
        if op == "UNFENCE" and rng.random() < 0.7:
            del request["epoch"]  # operator override: lets fenced victims back in
    return request


def _control_frame(message: dict) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return _CONTROL_LENGTH.pack(len(body)) + body


def control_stream(rng: random.Random) -> tuple[bytes, int]:
    if rng.random() < 0.25:
        # A fence cycle on a victim node: drains and closes its live fuzz sessions.
        node = rng.choice(VICTIM_NODES)
        incarnation = rng.choice([None, 1, 2, 3])
        fence = {"op": "FENCE", "node": node, "incarnation": incarnation, "epoch": 1}
        return _control_frame(fence) + _control_frame({"op": "UNFENCE", "node": node}), 2
    frames = []
    for _ in range(rng.randrange(1, 10)):
        kind = rng.randrange(10)
        if kind < 6:
            body = msgpack.packb(control_request(rng), use_bin_type=True)
            frames.append(_CONTROL_LENGTH.pack(len(body)) + body)
        elif kind == 6:
            frames.append(rng.randbytes(rng.randrange(1, 64)))  # raw garbage
        elif kind == 7:
            body = rng.randbytes(rng.randrange(1, 64))  # framed, but not msgpack
            frames.append(_CONTROL_LENGTH.pack(len(body)) + body)
        elif kind == 8:
            huge = rng.choice([MAX_FRAME + 1, U32, MAX_FRAME])
            frames.append(_CONTROL_LENGTH.pack(huge) + rng.randbytes(rng.randrange(32)))
        else:
            body = msgpack.packb({"op": "STATUS"})
            frames.append(flip_bits(rng, _CONTROL_LENGTH.pack(len(body)) + body, 1))
    return b"".join(frames), len(frames)


# --- oracles ------------------------------------------------------------------------


class Reader:
    """The server's output, consumed front to back; `short` at an early end."""

    def __init__(self, data: bytes, truncated_ok: bool) -> None:
        self.data = data
        self.pos = 0
        self.truncated_ok = truncated_ok

    @property
    def at_end(self) -> bool:
        return self.pos >= len(self.data)

    def take(self, n: int, what: str) -> bytes | None:
        """n bytes, or None if the output ends first (only allowed after a reset)."""
        if self.pos + n > len(self.data):
            if self.truncated_ok:
                return None
            raise OracleError(f"server output ends inside {what} at byte {self.pos}")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def expect_end(self, why: str) -> None:
        if not self.at_end:
            rest = self.data[self.pos : self.pos + 32]
            raise OracleError(f"server sent {rest!r}... after {why}")


def check_nbd_exchange(
    sent: bytes,
    output: bytes,
    facts: ExportFacts,
    *,
    reset: bool,
    verdict: Verdict,
    waited_at: set[int] | None = None,
    fenceable: bool = False,
) -> None:
    """Judge a whole NBD connection: `sent` is every byte the client sent, then EOF.

    `reset` means the socket was reset, so the tail of `output` may be missing.
    `waited_at` holds the offsets in `sent` where the client stopped to wait for the
    final reply (None: it pipelined everything).  `fenceable` means the client opened
    the export as a node the control fuzzer may fence at any moment.
    """
    out = Reader(output, truncated_ok=reset)
    greeting = out.take(wire.GREETING_SIZE, "greeting")
    if greeting is None:
        return
    if greeting != wire.encode_greeting():
        raise OracleError(f"bad greeting {greeting!r}")
    if len(sent) < 4:
        out.expect_end("a short client-flags field")
        return
    (flags,) = struct.unpack_from(">I", sent, 0)
    if flags & ~3 or not flags & 1:
        out.expect_end(f"client flags {flags:#x}")
        return
    no_zeroes = bool(flags & 2)
    options, ending = frame_options(sent)
    one_at_a_time = waited_at is not None and all(end in waited_at for _, end in options)
    ends_early = ending == "fatal" or any(opt == Opt.EXPORT_NAME for opt, _ in options)
    if ends_early and not one_at_a_time:
        # Options pipelined ahead of a frame that ends the connection (a fatal one, or
        # an EXPORT_NAME the server may refuse only by hanging up) broke the client's
        # one-option-at-a-time rule, so the server may hang up without answering them.
        out.truncated_ok = True
    for opt, end in options:
        verdict.frames += 1
        if opt == Opt.EXPORT_NAME:
            if out.at_end:
                return  # refused: the only answer is closing
            reply = out.take(wire.EXPORT_NAME_REPLY_SIZE, "EXPORT_NAME reply")
            if reply is None:
                return
            info = wire.decode_export_name_reply(reply)
            if not no_zeroes and out.take(124, "zero padding") not in (bytes(124), None):
                raise OracleError("EXPORT_NAME padding is not zero")
            out.truncated_ok = reset  # what follows is judged as transmission
            _check_transmission(sent[end:], out, facts, info.size, verdict, fenceable)
            return
        final, size = option_replies(out, opt)
        if final is None:
            return
        verdict.answers += 1
        if final == Rep.ACK and opt == Opt.ABORT:
            out.expect_end("ABORT's ACK")
            return
        if final == Rep.ACK and opt == Opt.GO:
            if size is None:
                raise OracleError("GO acknowledged without NBD_INFO_EXPORT")
            out.truncated_ok = reset  # what follows is judged as transmission
            _check_transmission(sent[end:], out, facts, size, verdict, fenceable)
            return
        if final == Rep.ACK and opt not in (Opt.INFO, Opt.LIST):
            raise OracleError(f"option {opt} acknowledged, it should have been refused")
    out.expect_end(f"the last complete option ({ending} end)")


def handshake_framing_end(sent: bytes, maximum_payload: int) -> str:
    """How a haggling-phase stream ends for the server: "fatal" means it must hang up
    on its own, even if a GO or EXPORT_NAME before the fatal frame was accepted and
    the rest is read as requests."""
    if len(sent) < wire.CLIENT_FLAGS_SIZE:
        return "partial"
    (flags,) = struct.unpack_from(">I", sent, 0)
    if flags & ~3 or not flags & 1:
        return "fatal"
    options, ending = frame_options(sent)
    for opt, end in options:
        switches = opt in (Opt.GO, Opt.EXPORT_NAME)
        if switches and frame_requests(sent[end:], maximum_payload)[1] != "fatal":
            return "partial"  # e.g. too few bytes left for a request header
    return ending


def frame_options(sent: bytes) -> tuple[list[tuple[int, int]], str]:
    """Cut the haggling phase into options: ([(option, end offset)], how it ended).

    The end is "clean", "fatal" (bad magic, oversized, or a non-UTF-8 EXPORT_NAME: the
    server must hang up) or "partial" (EOF inside an option).
    """
    options: list[tuple[int, int]] = []
    pos = wire.CLIENT_FLAGS_SIZE
    while pos < len(sent):
        if len(sent) - pos < wire.OPTION_HEADER_SIZE:
            return options, "partial"
        magic, opt, length = _OPTION_HEADER.unpack_from(sent, pos)
        if magic != wire.IHAVEOPT or length > wire.MAX_OPTION_DATA:
            return options, "fatal"
        end = pos + wire.OPTION_HEADER_SIZE + length
        if end > len(sent):
            return options, "partial"
        if opt == Opt.EXPORT_NAME:
            try:
                sent[pos + wire.OPTION_HEADER_SIZE : end].decode("utf-8")
            except UnicodeDecodeError:
                return options, "fatal"
        options.append((opt, end))
        pos = end
    return options, "clean"


def answered_options(output: bytes) -> tuple[int, bool]:
    """For a client that waits: (final option replies so far, transmission started or
    the output is no longer option replies)."""
    out = Reader(output, truncated_ok=True)
    if out.take(wire.GREETING_SIZE, "greeting") is None:
        return 0, False
    magic = struct.pack(">Q", wire.OPTION_REPLY_MAGIC)
    finals = 0
    while True:
        if len(output) - out.pos >= 8 and output[out.pos : out.pos + 8] != magic:
            return finals, True
        head = out.take(wire.OPTION_REPLY_HEADER_SIZE, "option reply")
        if head is None:
            return finals, False
        reply = wire.decode_option_reply_header(head)
        if out.take(reply.length, "option reply data") is None:
            return finals, False
        if reply.reply_type == Rep.ACK or wire.is_error_reply(reply.reply_type):
            finals += 1
            if reply.reply_type == Rep.ACK and reply.opt == Opt.GO:
                return finals, True


def option_replies(out: Reader, opt: int) -> tuple[int | None, int | None]:
    """Read the replies to one option; (final reply type, export size from INFO)."""
    size = None
    while True:
        head = out.take(wire.OPTION_REPLY_HEADER_SIZE, f"reply to option {opt}")
        if head is None:
            return None, size
        reply = wire.decode_option_reply_header(head)  # raises on a bad magic
        if reply.opt != opt:
            raise OracleError(f"reply for option {reply.opt} while {opt} was pending")
        body = out.take(reply.length, "option reply data")
        if body is None:
            return None, size
        if reply.reply_type == Rep.ACK or wire.is_error_reply(reply.reply_type):
            if reply.reply_type == Rep.ACK and reply.length:
                raise OracleError("ACK carries data")
            return reply.reply_type, size
        if reply.reply_type == Rep.INFO and opt in (Opt.INFO, Opt.GO):
            item = wire.decode_info(body)
            if isinstance(item, wire.ExportInfo):
                size = item.size
        elif not (reply.reply_type == Rep.SERVER and opt == Opt.LIST):
            raise OracleError(f"reply type {reply.reply_type:#x} to option {opt}")


def frame_requests(stream: bytes, maximum_payload: int) -> tuple[list[ModelRequest], str]:
    """Cut a transmission byte stream into requests: (requests, how it ended).

    The end is "clean" (all bytes used), "disc", "fatal" (bad magic or an oversized
    WRITE: the server must hang up) or "partial" (EOF inside a request).
    """
    requests: list[ModelRequest] = []
    pos = 0
    while pos < len(stream):
        if len(stream) - pos < wire.REQUEST_HEADER_SIZE:
            return requests, "partial"
        magic, flags, kind, cookie, offset, length = _REQUEST.unpack_from(stream, pos)
        if magic != wire.REQUEST_MAGIC:
            return requests, "fatal"
        pos += wire.REQUEST_HEADER_SIZE
        payload = b""
        if kind == Cmd.WRITE:
            if length > maximum_payload:
                return requests, "fatal"
            if pos + length > len(stream):
                return requests, "partial"
            payload = stream[pos : pos + length]
            pos += length
        if kind == Cmd.DISC:
            return requests, "disc"
        requests.append(ModelRequest(wire.Request(flags, kind, cookie, offset, length), payload))
    return requests, "clean"


def servable(req: wire.Request, facts: ExportFacts, size: int) -> bool:
    """May the server carry this request out (else it MUST answer with an error)?"""
    allowed = _SERVABLE_FLAGS.get(req.type)
    if allowed is None or req.flags & ~int(allowed):
        return False
    if req.type == Cmd.FLUSH:
        return True
    block = facts.minimum_block
    if req.offset % block or req.length % block or req.offset + req.length > size:
        return False
    return not (req.type == Cmd.READ and req.length > facts.maximum_payload)


def _check_transmission(
    stream: bytes, out: Reader, facts: ExportFacts, size: int, verdict: Verdict, fenceable: bool
) -> None:
    export = facts.sizes.get(size)
    if export is None:
        raise OracleError(f"transmission on an export of unknown size {size}")
    requests, ending = frame_requests(stream, facts.maximum_payload)
    if ending in ("fatal", "partial") or fenceable:
        # The server may drop replies it owes a broken client, or a fenced one.
        out.truncated_ok = True
    verdict.frames += len(requests) + (ending == "disc")
    verdict.writes += [(export, r) for r in requests if r.req.type == Cmd.WRITE]
    pending: dict[int, list[ModelRequest]] = {}
    for r in requests:
        pending.setdefault(r.req.cookie, []).append(r)
    if any(len(v) > 1 for v in pending.values()):
        return  # a mutation duplicated a cookie: replies cannot be told apart
    while not out.at_end:
        raw = out.take(wire.SIMPLE_REPLY_SIZE, "simple reply")
        if raw is None:
            return
        reply = wire.decode_simple_reply(raw)  # raises on a bad magic
        waiting = pending.pop(reply.cookie, None)
        if not waiting:
            raise OracleError(f"reply for cookie {reply.cookie:#x}, which nothing awaits")
        req = waiting[0].req
        ok = servable(req, facts, size)
        if reply.error not in KNOWN_NBD_ERRORS | {0}:
            raise OracleError(f"unknown NBD error {reply.error} for {req}")
        fenced = fenceable and reply.error == NbdErrno.EPERM
        if bool(reply.error) == ok and not fenced:
            raise OracleError(f"error {reply.error} for {req} (servable: {ok})")
        verdict.answers += 1
        if req.type == Cmd.READ and not reply.error and out.take(req.length, "READ data") is None:
            return
    if ending == "disc" and not out.truncated_ok:
        if pending:
            raise OracleError(f"DISC sent but {len(pending)} requests were never answered")
        verdict.fully_answered = True


def frame_control(stream: bytes) -> tuple[list[dict], str]:
    """The control requests the server must answer, and how the stream ends after
    them: "clean", "fatal" (the server must hang up) or "partial" (EOF mid-frame)."""
    pos = 0
    messages: list[dict] = []
    while pos < len(stream):
        if len(stream) - pos < _CONTROL_LENGTH.size:
            return messages, "partial"
        (length,) = _CONTROL_LENGTH.unpack_from(stream, pos)
        if length > MAX_FRAME:
            return messages, "fatal"
        if pos + 4 + length > len(stream):
            return messages, "partial"
        try:
            message = msgpack.unpackb(stream[pos + 4 : pos + 4 + length], strict_map_key=True)
        except Exception:  # msgpack raises several unrelated types
            return messages, "fatal"
        if not isinstance(message, dict):
            return messages, "fatal"
        pos += 4 + length
        messages.append(message)
    return messages, "clean"


def check_control_exchange(sent: bytes, output: bytes, *, reset: bool, verdict: Verdict) -> None:
    requests, _ = frame_control(sent)
    verdict.frames += len(requests)
    out = Reader(output, truncated_ok=reset)
    answers = 0
    while not out.at_end:
        raw = out.take(4, "control frame length")
        if raw is None:
            break
        (length,) = _CONTROL_LENGTH.unpack(raw)
        body = out.take(length, "control frame")
        if body is None:
            break
        answer = msgpack.unpackb(body)
        if not isinstance(answer, dict) or answer.get("status") not in CONTROL_STATUSES:
            raise OracleError(f"control answer {answer!r} has no valid status")
        if answers >= len(requests):
            raise OracleError(f"control answer {answer!r} to no well-formed request")
        request = requests[answers]
        if request.get("op") not in OPS and answer["status"] != "ERROR":
            raise OracleError(f"{request!r} answered {answer!r}, not ERROR")
        if request.get("op") == "FENCE" and answer["status"] == "CONFIRMED":
            verdict.sessions_fenced += len(answer.get("sessions_closed", []))
        answers += 1
    if answers < len(requests) and not reset:
        raise OracleError(f"{answers} control answers for {len(requests)} requests")
    verdict.answers += answers
