"""One test per grant rule of the DLM spec (reference §1.5-1.7), on the pure engine."""

from __future__ import annotations

import errno

import pytest

from gfspy.dlm.engine import Blocking, Completion, Resource
from gfspy.dlm.modes import ECANCEL, EDEADLK, EUNLOCK, DLMError, Flag, Mode, SBFlag, compatible

pytestmark = pytest.mark.timeout(30)

CR, CW, PR, PW, EX, NL = Mode.CR, Mode.CW, Mode.PR, Mode.PW, Mode.EX, Mode.NL


def casts(events):
    return [(e.key, e.status, e.mode) for e in events if isinstance(e, Completion)]


def basts(events):
    return [(e.key, e.mode) for e in events if isinstance(e, Blocking)]


def test_compat_matrix_is_the_published_one():
    expected = {
        NL: {NL, CR, CW, PR, PW, EX},
        CR: {NL, CR, CW, PR, PW},
        CW: {NL, CR, CW},
        PR: {NL, CR, PR},
        PW: {NL, CR},
        EX: {NL},
    }
    for g in expected:
        for r in expected:
            assert compatible(g, r) == (r in expected[g]), (g, r)
            assert compatible(g, r) == compatible(r, g)


def test_grant_and_waiting_fifo_no_barging():
    r = Resource(b"res")
    assert casts(r.request("a", PR)) == [("a", 0, PR)]
    ev = r.request("b", EX, wants_bast=True)
    assert casts(ev) == []
    # a compatible PR request still waits behind the queued EX (no barging)
    assert casts(r.request("c", PR)) == []
    assert [lk.key for lk in r.waiting] == ["b", "c"]
    ev = r.unlock("a")
    assert casts(ev) == [("a", EUNLOCK, Mode.IV), ("b", 0, EX)]
    ev = r.unlock("b")
    assert casts(ev) == [("b", EUNLOCK, Mode.IV), ("c", 0, PR)]


def test_blocking_callback_sent_to_conflicting_holders_once():
    r = Resource(b"res")
    r.request("a", PR, wants_bast=True)
    r.request("n", NL, wants_bast=True)
    assert basts(r.request("b", EX)) == [("a", EX)]  # NL is compatible: no bast
    assert basts(r.request("c", EX)) == []  # already basted for EX
    r2 = Resource(b"r2")
    r2.request("a", PR, wants_bast=False)
    assert basts(r2.request("b", EX)) == []  # no handler, no bast


def test_pr_holder_basted_for_cw_request():
    r = Resource(b"res")
    r.request("a", PR, wants_bast=True)
    assert basts(r.request("b", CW)) == [("a", CW)]


def test_in_place_conversion_overtakes_queued_conversions():
    r = Resource(b"res")
    r.request("a", PR)
    r.request("b", PR)
    r.request("c", NL)
    assert casts(r.convert("a", EX)) == []  # blocked by b's PR, queued
    # c NL->CR is compatible with everything granted/converting: granted in place
    assert casts(r.convert("c", CR)) == [("c", 0, CR)]


def test_quecvt_queues_behind_existing_conversions():
    r = Resource(b"res")
    r.request("a", PR)
    r.request("b", PR)
    r.request("c", NL)
    r.convert("a", EX)
    assert casts(r.convert("c", CR, Flag.QUECVT)) == []
    assert [lk.key for lk in r.converting] == ["a", "c"]
    # QUECVT is refused for a down-conversion
    with pytest.raises(DLMError) as exc:
        r.convert("b", NL, Flag.QUECVT)
    assert exc.value.errno == errno.EINVAL


def test_conversions_granted_fifo_before_waiting_requests():
    r = Resource(b"res")
    r.request("a", EX)
    r.request("b", NL)
    r.request("c", NL)
    r.request("w", CR)  # waits
    r.convert("b", PR)
    r.convert("c", PR)
    ev = r.unlock("a")
    assert casts(ev) == [("a", EUNLOCK, Mode.IV), ("b", 0, PR), ("c", 0, PR), ("w", 0, CR)]


def test_conversion_deadlock_gives_edeadlk_and_keeps_old_mode():
    r = Resource(b"res")
    r.request("a", NL)
    r.request("b", PR)
    r.request("c", PR)
    r.convert("a", EX)  # waits for the PRs
    ev = r.convert("b", EX)  # blocked by c; a is ahead wanting EX, which b's PR blocks
    assert casts(ev) == [("b", EDEADLK, PR)]
    assert r.locks["b"].grmode == PR and r.locks["b"].queue == "granted"


def test_convdeadlk_demotes_to_nl():
    r = Resource(b"res")
    r.request("a", NL)
    r.request("b", PR)
    r.request("c", PR)
    r.convert("a", EX)
    ev = r.convert("b", EX, Flag.CONVDEADLK)
    # b is demoted to NL instead of failing, and queues behind a
    assert casts(ev) == []
    assert r.locks["b"].grmode == NL and [lk.key for lk in r.converting] == ["a", "b"]
    assert casts(r.unlock("c")) == [("c", EUNLOCK, Mode.IV), ("a", 0, EX)]
    ev = r.unlock("a")
    b_cast = [e for e in ev if isinstance(e, Completion) and e.key == "b"][0]
    assert b_cast.mode == EX and b_cast.sbflags & SBFlag.DEMOTED


def test_noqueue_gives_eagain_without_basts_unless_noqueuebast():
    r = Resource(b"res")
    r.request("a", EX, wants_bast=True)
    ev = r.request("b", PR, Flag.NOQUEUE)
    assert casts(ev) == [("b", -errno.EAGAIN, Mode.IV)] and basts(ev) == []
    assert "b" not in r.locks
    ev = r.request("c", PR, Flag.NOQUEUE | Flag.NOQUEUEBAST)
    assert casts(ev) == [("c", -errno.EAGAIN, Mode.IV)] and basts(ev) == [("a", PR)]


def test_cancel_waiting_conversion_and_granted_noop():
    r = Resource(b"res")
    r.request("a", EX)
    r.request("b", NL)
    r.request("c", PR)  # waits
    r.convert("b", PR)  # converts, waits
    assert casts(r.cancel("b")) == [("b", ECANCEL, NL)]
    assert r.locks["b"].queue == "granted"
    assert casts(r.cancel("c")) == [("c", ECANCEL, Mode.IV)]
    assert "c" not in r.locks
    assert r.cancel("a") == []  # granted: nothing to cancel


def test_unlock_busy_while_converting_but_force_unlock_works():
    r = Resource(b"res")
    r.request("a", EX)
    r.request("b", NL)
    r.convert("b", EX)
    with pytest.raises(DLMError) as exc:
        r.unlock("b")
    assert exc.value.errno == errno.EBUSY
    assert casts(r.unlock("b", Flag.FORCEUNLOCK)) == [("b", EUNLOCK, Mode.IV)]


def test_expedite_ignores_queues_and_noorder_skips_order():
    r = Resource(b"res")
    r.request("a", PR)
    r.request("b", EX)  # waits
    assert casts(r.request("c", NL, Flag.EXPEDITE)) == [("c", 0, NL)]
    assert casts(r.request("d", CR)) == []  # waits behind b
    assert casts(r.request("e", CR, Flag.NOORDER)) == [("e", 0, CR)]


def test_headque_puts_request_first():
    r = Resource(b"res")
    r.request("a", EX)
    r.request("b", PR)
    r.request("c", PR, Flag.HEADQUE)
    assert [lk.key for lk in r.waiting] == ["c", "b"]


def test_validation_rejects_without_callback():
    r = Resource(b"res")
    for mode, flags in [(7, 0), (EX, Flag.QUECVT), (CR, Flag.EXPEDITE), (EX, Flag.VALBLK)]:
        with pytest.raises(DLMError) as exc:
            r.request("x", mode, flags)
        assert exc.value.errno == errno.EINVAL
    assert r.locks == {}


def test_lvb_write_under_ex_read_by_next_holder_with_seq():
    r = Resource(b"res")
    val = b"v1".ljust(32, b"\0")
    r.request("a", EX, Flag.VALBLK, lvb=bytes(32))
    ev = r.convert("a", NL, Flag.VALBLK, lvb=val)
    assert ev[0].lvbseq == 1 and r.lvb == val
    ev = r.request("b", PR, Flag.VALBLK, lvb=bytes(32))
    assert ev[0].lvb == val and ev[0].lvbseq == 1 and not ev[0].sbflags
    # PR cannot write: its unlock leaves the LVB alone
    r.unlock("b", Flag.VALBLK, lvb=b"x" * 32)
    assert r.lvb == val and r.lvbseq == 1


def test_lvb_invalidate_then_valnotvalid_until_rewritten():
    r = Resource(b"res")
    r.request("a", PW, Flag.VALBLK, lvb=bytes(32))
    r.unlock("a", Flag.IVVALBLK)
    ev = r.request("b", EX, Flag.VALBLK, lvb=bytes(32))
    assert ev[0].sbflags & SBFlag.VALNOTVALID
    ev = r.convert("b", PR, Flag.VALBLK, lvb=b"new".ljust(32, b"\0"))
    assert not ev[0].sbflags & SBFlag.VALNOTVALID
    assert r.lvbseq == 1


def test_purge_of_dead_ex_holder_invalidates_lvb_and_grants_waiters():
    r = Resource(b"res")
    r.request(("dead", 1), EX, Flag.VALBLK, lvb=bytes(32))
    r.request(("live", 1), PR, Flag.VALBLK, lvb=bytes(32))
    assert r.purge(lambda key: key[0] == "dead") == 1
    r.recover_lvb(new_master=False)
    ev = r.grant_pending(recover=True)
    assert ev[0].key == ("live", 1) and ev[0].sbflags & SBFlag.VALNOTVALID
