"""Randomized comparison of the grant engine against a deliberately plain reference model.

The model below restates the rules of reference §1.5-1.7 as directly as possible: every
lock carries a queue ticket (queue order = ticket order, HEADQUE takes a ticket below
all others), the eleven "can be granted" rules are written out one by one, and no state
is shared with the engine. Thousands of seeded random operations are applied to both;
every completion, blocking callback, queue and LVB must agree after every step.
"""

from __future__ import annotations

import errno
import random

import pytest

from gfspy.dlm.engine import Blocking, Completion, Resource
from gfspy.dlm.modes import (
    ECANCEL,
    EDEADLK,
    EUNLOCK,
    DLMError,
    Flag,
    SBFlag,
    validate_convert,
    validate_request,
    validate_unlock,
)

IV, NL, CR, CW, PR, PW, EX = -1, 0, 1, 2, 3, 4, 5

COMPAT = {
    NL: {NL, CR, CW, PR, PW, EX},
    CR: {NL, CR, CW, PR, PW},
    CW: {NL, CR, CW},
    PR: {NL, CR, PR},
    PW: {NL, CR},
    EX: {NL},
}


def ok_together(a: int, b: int) -> bool:
    if a == IV or b == IV:
        return True
    return b in COMPAT[a]


def lvb_action(gr: int, rq: int) -> str:
    if gr in (PW, EX):
        return "read" if (gr, rq) == (PW, EX) else "write"
    if gr == IV or rq >= gr:
        return "read"
    return "none"


class MLock:
    def __init__(self, key, mode, flags, lvb, bast):
        self.key, self.gr, self.rq, self.flags, self.lvb = key, IV, mode, flags, lvb
        self.bast, self.high, self.seq, self.sb = bast, NL, 0, 0
        self.where, self.ticket = None, 0


class Model:
    def __init__(self):
        self.locks: dict = {}
        self.lvb, self.seq, self.invalid, self.inval_pending = bytes(32), 0, False, False
        self.tickets = 0
        self.out: list = []

    # queues -------------------------------------------------------------
    def q(self, where):
        locks = [lk for lk in self.locks.values() if lk.where == where]
        if where == "granted":
            return sorted(locks, key=lambda lk: (-lk.gr, lk.ticket))
        return sorted(locks, key=lambda lk: lk.ticket)

    def put(self, lk, where, head=False):
        lk.where = where
        self.tickets += 1
        if where != "granted" and head:
            lk.ticket = min([o.ticket for o in self.locks.values()] + [0]) - 1
        else:
            lk.ticket = self.tickets

    # rules ----------------------------------------------------------------
    def plain_ok(self, lk, now, recover):
        conv = lk.gr != IV
        if lk.flags & Flag.EXPEDITE:  # 1
            return True
        for other in self.q("granted") + self.q("convert"):  # 2, 3
            if other is not lk and not ok_together(other.gr, lk.rq):
                return False
        if conv and recover:  # 4
            return True
        if now and conv and not lk.flags & Flag.QUECVT:  # 5
            return True
        if now and conv and lk.flags & Flag.QUECVT:  # 6
            return not self.q("convert")
        if lk.flags & Flag.NOORDER:  # 7
            return True
        if not now and conv:  # 8
            return self.q("convert")[:1] == [lk]
        if now and not conv:  # 9
            return not self.q("convert") and not self.q("waiting")
        return not self.q("convert") and self.q("waiting")[:1] == [lk]  # 10

    def deadlock(self, lk):
        conv = self.q("convert")
        if lk in conv:
            ahead, behind = conv[: conv.index(lk)], conv[conv.index(lk) + 1 :]
        else:
            ahead, behind = conv, []
        if any(not ok_together(lk.gr, o.rq) for o in ahead):
            return True
        return any(not ok_together(lk.gr, o.rq) and not ok_together(o.gr, lk.rq) for o in behind)

    def can_grant(self, lk, now, recover=False):
        if self.plain_ok(lk, now, recover):
            return True, False
        if lk.gr != IV and not lk.flags & Flag.NOQUEUE and self.deadlock(lk):
            if lk.flags & Flag.CONVDEADLK:
                lk.gr = NL
                lk.sb |= SBFlag.DEMOTED
                return False, False
            return False, True
        for flag, alt in ((Flag.ALTPR, PR), (Flag.ALTCW, CW)):
            if lk.flags & flag and lk.rq != alt:
                want = lk.rq
                lk.rq = alt
                if self.plain_ok(lk, now, False):
                    lk.sb |= SBFlag.ALTMODE
                    return True, False
                lk.rq = want
                break
        return False, False

    def cast(self, lk, status):
        v = bool(lk.flags & Flag.VALBLK)
        self.out.append(
            ("cast", lk.key, status, lk.gr, lk.sb, lk.lvb if v else None, lk.seq if v else 0)
        )
        lk.sb = 0

    def write_lvb(self, lk):
        self.lvb = lk.lvb
        self.seq += 1
        lk.seq = self.seq
        self.invalid = False

    def grant(self, lk):
        act = lvb_action(lk.gr, lk.rq)
        if act == "read" and lk.flags & Flag.VALBLK:
            lk.lvb, lk.seq = self.lvb, self.seq
        if act == "write":
            if lk.flags & Flag.IVVALBLK:
                self.invalid = True
            elif lk.flags & Flag.VALBLK and lk.lvb is not None:
                self.write_lvb(lk)
        if self.invalid:
            lk.sb |= SBFlag.VALNOTVALID
        lk.gr, lk.rq, lk.high = lk.rq, IV, NL
        self.put(lk, "granted")
        self.cast(lk, 0)

    def needs_bast(self, holder, mode, cw):
        if holder.gr == PR and cw or holder.gr == CW and mode == PR:
            return holder.high < EX
        return holder.high < mode and not ok_together(holder.gr, mode)

    def basts_for(self, lk, with_converting):
        holders = self.q("granted") + (self.q("convert") if with_converting else [])
        for h in holders:
            if h is not lk and h.bast and self.needs_bast(h, lk.rq, lk.rq == CW):
                self.out.append(("bast", h.key, lk.rq))
                h.high = lk.rq

    def convert_pass(self, recover):
        tried_demote = False
        while True:
            high, cw, granted_one, demoted_one = IV, False, False, False
            for lk in self.q("convert"):
                was = bool(lk.sb & SBFlag.DEMOTED)
                ok, dl = self.can_grant(lk, False, recover)
                if ok:
                    self.grant(lk)
                    granted_one = True
                    break
                if not was and lk.sb & SBFlag.DEMOTED:
                    demoted_one = True
                    continue
                if dl:
                    if lk.flags & Flag.NODLCKWT and lk.high < lk.rq:
                        self.out.append(("bast", lk.key, lk.rq))
                        lk.high = lk.rq
                    continue
                high = max(high, lk.rq)
                cw = cw or lk.rq == CW
            if granted_one:
                continue
            if demoted_one and not tried_demote:
                tried_demote = True
                continue
            return high, cw

    def pending(self, recover=False):
        high, cw = self.convert_pass(recover)
        for lk in self.q("waiting"):
            if self.can_grant(lk, False)[0]:
                self.grant(lk)
            else:
                high = max(high, lk.rq)
                cw = cw or lk.rq == CW
        if high == IV:
            return
        for h in self.q("granted"):
            if not h.bast:
                continue
            need = (
                h.high < EX
                if (h.gr == PR and cw)
                else h.high < high and not ok_together(h.gr, high)
            )
            if need:
                self.out.append(("bast", h.key, CW if (cw and high == PR and h.gr == PR) else high))
                h.high = high

    # operations -----------------------------------------------------------
    def request(self, key, mode, flags, lvb, bast):
        validate_request(mode, flags, b"res", lvb is not None)
        lk = MLock(key, mode, flags, lvb, bast)
        self.locks[key] = lk
        if self.can_grant(lk, True)[0]:
            self.grant(lk)
        elif not flags & Flag.NOQUEUE:
            self.put(lk, "waiting", bool(flags & Flag.HEADQUE))
            self.basts_for(lk, False)
        else:
            self.cast(lk, -errno.EAGAIN)
            del self.locks[key]
            if flags & Flag.NOQUEUEBAST:
                self.basts_for(lk, True)

    def convert(self, key, mode, flags, lvb):
        lk = self.locks[key]
        if lk.where != "granted":
            raise DLMError(errno.EBUSY, "busy")
        validate_convert(lk.gr, mode, flags, lvb is not None or lk.lvb is not None)
        lk.rq, lk.flags, lk.sb = mode, flags | Flag.CONVERT, 0
        if lvb is not None:
            lk.lvb = lvb
        ok, dl = self.can_grant(lk, True)
        if not ok and dl and not flags & Flag.NODLCKWT:
            lk.rq = IV
            self.cast(lk, EDEADLK)
            return
        if not ok and lk.sb & SBFlag.DEMOTED:
            self.convert_pass(False)
            ok = self.plain_ok(lk, True, False)
        if ok:
            self.grant(lk)
            self.pending()
        elif not flags & Flag.NOQUEUE:
            self.put(lk, "convert", bool(flags & Flag.HEADQUE))
            self.basts_for(lk, False)
        else:
            if flags & Flag.NOQUEUEBAST:
                self.basts_for(lk, True)
            lk.rq = IV
            self.cast(lk, -errno.EAGAIN)

    def unlock(self, key, flags, lvb):
        lk = self.locks[key]
        validate_unlock(flags)
        if flags & Flag.CANCEL:
            if lk.where == "convert":
                lk.rq = IV
                self.put(lk, "granted")
                self.cast(lk, ECANCEL)
            elif lk.where == "waiting":
                del self.locks[key]
                self.cast(lk, ECANCEL)
            else:
                return
            self.pending()
            return
        if not flags & Flag.FORCEUNLOCK and lk.where != "granted":
            raise DLMError(errno.EBUSY, "busy")
        if lvb is not None:
            lk.lvb = lvb
        lk.flags |= flags
        del self.locks[key]
        if lk.gr >= PW:
            if lk.flags & Flag.IVVALBLK:
                self.invalid = True
            elif lk.flags & Flag.VALBLK and lk.lvb is not None:
                self.write_lvb(lk)
        self.out.append(("cast", key, EUNLOCK, IV, 0, None, 0))
        self.pending()

    def purge(self, dead):
        for key in [k for k in self.locks if k in dead]:
            lk = self.locks.pop(key)
            if lk.flags & Flag.VALBLK and lk.gr >= PW:
                self.inval_pending = True
        if self.inval_pending:
            self.invalid, self.inval_pending = True, False
        self.pending(recover=True)


def engine_events(events):
    out = []
    for e in events:
        if isinstance(e, Completion):
            out.append(("cast", e.key, e.status, e.mode, int(e.sbflags), e.lvb, e.lvbseq))
        else:
            assert isinstance(e, Blocking)
            out.append(("bast", e.key, e.mode))
    return out


def per_lock(events):
    by_key: dict = {}
    for e in events:
        by_key.setdefault(e[1], []).append(e)
    return by_key


def snapshot_engine(r: Resource):
    return (
        [(lk.key, lk.grmode, lk.rqmode) for lk in r.granted],
        [(lk.key, lk.grmode, lk.rqmode) for lk in r.converting],
        [(lk.key, lk.grmode, lk.rqmode) for lk in r.waiting],
        r.lvb,
        r.lvbseq,
        r.lvb_invalid,
    )


def snapshot_model(m: Model):
    def rows(where):
        return [(lk.key, lk.gr, lk.rq) for lk in m.q(where)]

    return rows("granted"), rows("convert"), rows("waiting"), m.lvb, m.seq, m.invalid


REQ_FLAGS = [
    Flag.NOQUEUE,
    Flag.VALBLK,
    Flag.IVVALBLK,
    Flag.HEADQUE,
    Flag.NOORDER,
    Flag.ALTPR,
    Flag.ALTCW,
]
CONV_FLAGS = REQ_FLAGS + [Flag.QUECVT, Flag.CONVDEADLK, Flag.NODLCKWT]


def random_flags(rng, choices):
    flags = Flag.NONE
    for f in choices:
        if rng.random() < 0.12:
            flags |= f
    if flags & Flag.NOQUEUE and rng.random() < 0.5:
        flags |= Flag.NOQUEUEBAST
    return flags


def random_lvb(rng):
    return bytes([rng.randrange(256)]) * 32


def run_one_step(rng, r, m, keys):
    key = rng.choice(keys)
    lk = m.locks.get(key)
    mode = rng.choice([NL, CR, CW, PR, PW, EX])
    lvb = random_lvb(rng) if rng.random() < 0.6 else None
    if lk is None:
        flags = random_flags(rng, REQ_FLAGS)
        if mode == NL and rng.random() < 0.1:
            flags = Flag.EXPEDITE
        if flags & Flag.VALBLK and lvb is None:
            lvb = bytes(32)
        bast = rng.random() < 0.8
        call = ("request", key, mode, flags, lvb, bast)
    else:
        op = rng.random()
        if op < 0.45:
            flags = random_flags(rng, CONV_FLAGS)
            call = ("convert", key, mode, flags, lvb)
        elif op < 0.75:
            flags = rng.choice([Flag.NONE, Flag.VALBLK, Flag.IVVALBLK])
            call = ("unlock", key, flags, lvb)
        elif op < 0.92:
            call = ("unlock", key, Flag.CANCEL, None)
        else:
            call = ("unlock", key, Flag.FORCEUNLOCK, None)
    err_e = err_m = None
    try:
        got = engine_events(getattr(r, call[0])(*call[1:]))
    except DLMError as exc:
        got, err_e = [], exc.errno
    m.out = []
    try:
        getattr(m, call[0])(*call[1:])
    except DLMError as exc:
        err_m = exc.errno
    assert err_e == err_m, call
    assert per_lock(got) == per_lock(m.out), call
    assert snapshot_engine(r) == snapshot_model(m), call


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5, 6, 7, 8])
def test_engine_matches_reference_model(seed):
    rng = random.Random(seed)
    keys = [f"k{i}" for i in range(rng.choice([3, 5, 8]))]
    r, m = Resource(b"res"), Model()
    for _ in range(5000):
        run_one_step(rng, r, m, keys)
        if rng.random() < 0.01 and m.locks:
            dead = set(rng.sample(sorted(m.locks), k=max(1, len(m.locks) // 3)))
            r.purge(lambda key, dead=dead: key in dead)
            r.recover_lvb(new_master=False)
            got = engine_events(r.grant_pending(recover=True))
            m.out = []
            m.purge(dead)
            assert per_lock(got) == per_lock(m.out)
            assert snapshot_engine(r) == snapshot_model(m)


@pytest.mark.timeout(30)
def test_model_run_exercises_every_outcome():
    """The random driver must actually reach each interesting outcome, or it proves little."""
    rng = random.Random(99)
    r, m = Resource(b"res"), Model()
    seen: set = set()
    original = Model.cast

    def spy(self, lk, status):
        seen.add(status)
        if lk.sb & SBFlag.DEMOTED:
            seen.add("demoted")
        if lk.sb & SBFlag.ALTMODE:
            seen.add("alt")
        if lk.sb & SBFlag.VALNOTVALID:
            seen.add("valnotvalid")
        original(self, lk, status)

    Model.cast = spy
    try:
        for _ in range(4000):
            run_one_step(rng, r, m, ["a", "b", "c", "d", "e"])
    finally:
        Model.cast = original
    assert {0, -errno.EAGAIN, EDEADLK, ECANCEL, "demoted", "alt", "valnotvalid"} <= seen
