"""Several lockspaces over real loopback TCP: mastering, lookups, storms, recovery."""

from __future__ import annotations

import errno
import os
import random

import pytest
import trio

from gfspy.dlm.directory import directory_node
from gfspy.dlm.modes import ECANCEL, EUNLOCK, Flag, Mode, SBFlag, compatible

from .cluster_helper import LoopbackCluster, eventually

NL, CR, CW, PR, PW, EX = Mode.NL, Mode.CR, Mode.CW, Mode.PR, Mode.PW, Mode.EX
#: Seeds of the kill-mid-storm test; set DLM_STORM_SEEDS="1 2 3 ..." to soak-test more.
STORM_SEEDS = [int(s) for s in os.environ.get("DLM_STORM_SEEDS", "7 8 9 10").split()]


async def new_cluster(nursery, n):
    cluster = LoopbackCluster(nursery)
    await cluster.add_nodes(*range(1, n + 1))
    await cluster.change_view()
    return cluster


def name_with_directory(dir_node: int, members, prefix: str, skip=()) -> bytes:
    for i in range(10_000):
        name = f"{prefix}{i}".encode()
        if directory_node(name, members) == dir_node and name not in skip:
            return name
    raise AssertionError("no name found")


@pytest.mark.timeout(30)
async def test_first_requester_masters_and_directory_records_it():
    async with trio.open_nursery() as nursery:
        c = await new_cluster(nursery, 3)
        members = c.view.member_ids
        name = name_with_directory(1, members, "inode-")  # directory on node 1
        h2 = await c.spaces[2].lock(name, PR)
        assert c.masters_of(name) == [2]
        assert c.spaces[1].directory.entries[name] == 2
        assert c.spaces[2].rsbs[name].master == 2
        # node 3 looks the master up on node 1 and sends its request to node 2
        h3 = await c.spaces[3].lock(name, PR)
        assert c.spaces[3].rsbs[name].master == 2
        assert {lk.key for lk in c.spaces[2].masters[name].granted} == {(2, h2.lkid), (3, h3.lkid)}
        # a conflicting request from node 1 waits, and the holders get blocking callbacks
        basts = []
        await c.spaces[3].unlock(h3)
        await c.spaces[2].convert(h2, PR)  # no-op conversion, still granted
        h2.bast = lambda h, mode: basts.append(mode)
        h1 = c.spaces[1].request(name, EX)
        await trio.sleep(0.05)
        assert h1.status is None
        # the bast was sent when the EX queued, before we set the handler; re-request
        await c.spaces[2].unlock(h2)
        assert await h1.wait() == 0 and h1.mode == EX
        assert await c.spaces[1].unlock(h1) == EUNLOCK
        await c.close()
        nursery.cancel_scope.cancel()


@pytest.mark.timeout(30)
async def test_remote_bast_lvb_and_noqueue():
    async with trio.open_nursery() as nursery:
        c = await new_cluster(nursery, 2)
        basted = trio.Event()
        holder = await c.spaces[1].lock(
            b"rgrp-7", EX, Flag.VALBLK, lvb=bytes(32), bast=lambda h, m: basted.set()
        )
        with pytest.raises(OSError):
            await c.spaces[2].lock(b"rgrp-7", PR, Flag.NOQUEUE)
        waiter = c.spaces[2].request(b"rgrp-7", PR, Flag.VALBLK, lvb=bytes(32))
        await basted.wait()
        await c.spaces[1].convert(holder, NL, Flag.VALBLK, lvb=b"free=1234".ljust(32, b"\0"))
        assert await waiter.wait() == 0
        assert waiter.lvb.rstrip(b"\0") == b"free=1234" and waiter.lvbseq == 1
        await c.close()
        nursery.cancel_scope.cancel()


@pytest.mark.timeout(60)
async def test_lock_storm_never_grants_incompatible_modes():
    async with trio.open_nursery() as nursery:
        c = await new_cluster(nursery, 3)
        names = [f"storm-{i}".encode() for i in range(4)]
        held: dict[bytes, dict[tuple, int]] = {n: {} for n in names}
        violations: list = []
        grants = [0]

        def observe(node, handle):
            if handle.status != 0 or node not in c.spaces:
                return  # a killed node's late events are not grants anyone can rely on
            for other, mode in held[handle.name].items():
                if other != (node, handle.lkid) and not compatible(mode, handle.mode):
                    violations.append((handle.name, other, mode, node, handle.mode))
            held[handle.name][(node, handle.lkid)] = handle.mode
            grants[0] += 1

        async def worker(node, seed):
            rng = random.Random(seed)
            ls = c.spaces[node]
            for _ in range(60):
                name = rng.choice(names)
                mode = rng.choice([NL, CR, CW, PR, PW, EX])
                h = ls.request(name, mode, ast=lambda h, node=node: observe(node, h))
                await h.wait()
                await trio.sleep(rng.random() * 0.002)
                if rng.random() < 0.5:
                    new = rng.choice([NL, CR, PR, EX])
                    held[name].pop((node, h.lkid), None)  # stop claiming the old mode early
                    h.ast = lambda h, node=node: observe(node, h)
                    ls.request_convert(h, new, Flag.QUECVT if new > h.mode else 0)
                    status = await h.wait()
                    if status != 0:  # EDEADLK: the lock still holds its old mode
                        held[name][(node, h.lkid)] = h.mode
                    await trio.sleep(rng.random() * 0.002)
                held[name].pop((node, h.lkid), None)
                await ls.unlock(h)

        async with trio.open_nursery() as workers:
            for node in (1, 2, 3):
                for k in range(3):
                    workers.start_soon(worker, node, node * 10 + k)
        assert violations == []
        assert grants[0] >= 9 * 60
        for ls in c.spaces.values():
            for res in ls.masters.values():
                assert not res.locks
        await c.close()
        nursery.cancel_scope.cancel()


@pytest.mark.timeout(60)
async def test_recovery_purges_invalidates_grants_and_remasters():
    async with trio.open_nursery() as nursery:
        c = await new_cluster(nursery, 3)
        s1, s2, s3 = c.spaces[1], c.spaces[2], c.spaces[3]
        # r-dead-master: mastered by node 3 (first requester), node 1 holds PR there
        await s3.lock(b"on-3", NL)
        h1_on3 = await s1.lock(b"on-3", PR, Flag.VALBLK, lvb=bytes(32))
        # r-ex: node 3 holds EX with VALBLK on a resource mastered by node 1; node 2 waits
        await s1.lock(b"on-1", NL)
        await s3.lock(b"on-1", EX, Flag.VALBLK, lvb=b"x".ljust(32, b"\0"))
        waiter = s2.request(b"on-1", PR, Flag.VALBLK, lvb=bytes(32))
        # a node-2 request queued on node 3's resource behind node 3's EX
        await s3.lock(b"on-3b", EX)
        queued = s2.request(b"on-3b", EX)
        await trio.sleep(0.05)
        assert waiter.status is None and queued.status is None
        await c.kill(3)
        await c.change_view(removed=frozenset({3}))
        assert await waiter.wait() == 0
        assert waiter.sbflags & SBFlag.VALNOTVALID  # the dead EX holder may have changed it
        assert await queued.wait() == 0 and queued.mode == EX  # re-requested on a new master
        assert all((3, lkid) not in s1.masters[b"on-1"].locks for lkid in range(10))
        # the resource node 3 mastered now has exactly one live master holding node 1's PR
        masters = c.masters_of(b"on-3")
        assert len(masters) == 1
        res = c.spaces[masters[0]].masters[b"on-3"]
        assert [lk.key for lk in res.granted] == [(1, h1_on3.lkid)]
        # and it works: an EX from node 2 waits for node 1's PR
        ex = s2.request(b"on-3", EX)
        await trio.sleep(0.05)
        assert ex.status is None
        await s1.unlock(h1_on3)
        assert await ex.wait() == 0
        await c.close()
        nursery.cancel_scope.cancel()


async def _locks_everywhere(c, names):
    handles = {}
    for i, name in enumerate(names):
        for node in c.spaces:
            handles[(node, name)] = await c.spaces[node].lock(name, CR if i % 2 else PR)
    return handles


@pytest.mark.timeout(60)
@pytest.mark.parametrize("victim_role", ["busiest-master", "directory"])
async def test_killing_busiest_master_or_directory_node_recovers(victim_role):
    async with trio.open_nursery() as nursery:
        c = await new_cluster(nursery, 4)
        members = c.view.member_ids
        # node 1 masters most resources: it locks first
        busy = [f"busy-{i}".encode() for i in range(12)]
        for name in busy:
            await c.spaces[1].lock(name, NL)
        # resources mastered on node 2 whose directory entry lives on node 4
        on_dir4 = []
        for _ in range(5):
            on_dir4.append(name_with_directory(4, members, "dir4-", skip=on_dir4))
        for name in on_dir4:
            await c.spaces[2].lock(name, NL)
        handles = await _locks_everywhere(c, busy + on_dir4)
        victim = 1 if victim_role == "busiest-master" else 4
        await c.kill(victim)
        await c.change_view(removed=frozenset({victim}))
        for name in busy + on_dir4:
            masters = c.masters_of(name)
            assert len(masters) == 1 and victim not in masters, (name, masters)
            res = c.spaces[masters[0]].masters[name]
            owners = sorted(key[0] for key in res.locks)
            survivors = sorted(n for n in c.spaces)
            assert set(owners) == set(survivors), (name, owners)
        # new requests from every survivor find the same master and conflict correctly
        for name in busy + on_dir4:
            for node in c.spaces:
                h = handles[(node, name)]
                await c.spaces[node].unlock(h)
            ex = [c.spaces[n].request(name, EX) for n in c.spaces]
            statuses = []

            async def take_and_release(h, statuses=statuses):
                statuses.append(await h.wait())
                await h.ls.unlock(h)

            async with trio.open_nursery() as takers:
                for h in ex:
                    takers.start_soon(take_and_release, h)
            assert statuses == [0] * len(ex)
            assert len(c.masters_of(name)) <= 1
        await c.close()
        nursery.cancel_scope.cancel()


@pytest.mark.timeout(30)
async def test_blocked_grants_are_held_except_noexp():
    async with trio.open_nursery() as nursery:
        c = await new_cluster(nursery, 2)
        s1, s2 = c.spaces[1], c.spaces[2]
        s1.block_grants_on_recovery = True
        await c.change_view()  # a membership change: s1 now holds back grants
        assert s1.grants_blocked
        normal = s1.request(b"journal-2", EX)
        recovery = s1.request(b"journal-3", EX, Flag.NOEXP)
        assert await recovery.wait() == 0
        await eventually(lambda: normal.status is not None)
        assert normal.status == 0 and not normal.delivered  # granted, not delivered
        s1.unblock_grants()
        assert await normal.wait() == 0
        assert s2.running
        await c.close()
        nursery.cancel_scope.cancel()


@pytest.mark.timeout(30)
async def test_remote_cancel_and_force_unlock():
    async with trio.open_nursery() as nursery:
        c = await new_cluster(nursery, 2)
        s1, s2 = c.spaces[1], c.spaces[2]
        holder = await s1.lock(b"dir-9", EX)
        queued = s2.request(b"dir-9", PR)
        await trio.sleep(0.05)
        assert s2.cancel(queued) is True
        with pytest.raises(OSError) as exc:
            await s2.lock(b"dir-9", PR, Flag.NOQUEUE)
        assert exc.value.errno == errno.EAGAIN
        assert await queued.wait() == ECANCEL and queued.gone
        # a granted lock has nothing to cancel: no callback, stays granted
        nl = await s2.lock(b"dir-9", NL)
        assert s2.cancel(nl) is False and nl.mode == NL
        # force-unlock withdraws a queued conversion
        s2.request_convert(nl, EX)
        await trio.sleep(0.05)
        assert await s2.unlock(nl, Flag.FORCEUNLOCK) == EUNLOCK
        await s1.unlock(holder)
        assert not s1.masters[b"dir-9"].locks
        await c.close()
        nursery.cancel_scope.cancel()


@pytest.mark.timeout(30)
async def test_node_dying_during_recovery_aborts_the_pass_and_next_view_recovers():
    async with trio.open_nursery() as nursery:
        c = await new_cluster(nursery, 3)
        s1, s2 = c.spaces[1], c.spaces[2]
        await c.spaces[3].lock(b"held-by-3", EX)
        waiter = s1.request(b"held-by-3", EX)
        # view 2 still lists node 3, which dies before starting it
        view2 = c.make_view()
        for ls in c.spaces.values():
            await ls.stop()
        await c.kill(3)
        results = {}

        async def start(node, view):
            results[node] = await c.spaces[node].start(view)

        async with trio.open_nursery() as starters:
            for node in (1, 2):
                starters.start_soon(start, node, view2)
            await trio.sleep(0.2)  # stuck at the NODES barrier, waiting for node 3
            assert results == {}
            assert (
                s1.dump()["state"] == "recovering epoch 2: waiting for barrier NODES from nodes [3]"
            )
            for ls in (s1, s2):
                await ls.stop()  # the cluster layer noticed: the pass must abort
        assert results == {1: False, 2: False}
        assert not s1.running and waiter.status is None
        c.view = view2
        await c.change_view(removed=frozenset({3}))
        assert await waiter.wait() == 0
        await c.close()
        nursery.cancel_scope.cancel()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("seed", STORM_SEEDS)
async def test_storm_survives_a_node_killed_mid_storm(seed):
    """Random traffic on four nodes; one dies in the middle. Survivors never see two
    incompatible grants, every survivor operation completes, and the masters end empty."""
    async with trio.open_nursery() as nursery:
        c = await new_cluster(nursery, 4)
        names = [f"hot-{i}".encode() for i in range(6)]
        held: dict[bytes, dict[tuple, int]] = {n: {} for n in names}
        violations: list = []
        completed = {n: 0 for n in (1, 2, 3, 4)}
        victim = 4

        def observe(node, handle):
            if handle.status != 0 or node not in c.spaces:
                return  # a killed node's late events are not grants anyone can rely on
            for other, mode in held[handle.name].items():
                if other != (node, handle.lkid) and not compatible(mode, handle.mode):
                    violations.append((handle.name, other, mode, node, handle.mode))
            held[handle.name][(node, handle.lkid)] = handle.mode

        async def worker(node, rng, cancel_scope):
            with cancel_scope:
                ls = c.spaces[node]
                while True:
                    name = rng.choice(names)
                    h = ls.request(name, rng.choice([CR, PR, PW, EX]), Flag.VALBLK, lvb=bytes(32),
                                   ast=lambda h, node=node: observe(node, h))  # fmt: skip
                    with trio.fail_after(15):
                        await h.wait()
                    await trio.sleep(rng.random() * 0.003)
                    if rng.random() < 0.3:
                        held[name].pop((node, h.lkid), None)
                        ls.request_convert(
                            h, rng.choice([NL, CR]), Flag.VALBLK, lvb=bytes([node]) * 32
                        )
                        with trio.fail_after(15):
                            await h.wait()
                        held[name][(node, h.lkid)] = h.mode
                    held[name].pop((node, h.lkid), None)
                    ls.request_unlock(h)
                    with trio.fail_after(15):
                        await h.wait()
                    completed[node] += 1

        rng = random.Random(seed)
        scopes = {n: [trio.CancelScope() for _ in range(3)] for n in (1, 2, 3, 4)}
        two_masters: list = []

        async def single_master_checker():
            while True:
                for name in names:
                    if len(c.masters_of(name)) > 1:
                        two_masters.append((name, c.masters_of(name)))
                await trio.sleep(0.002)

        async with trio.open_nursery() as workers:
            workers.start_soon(single_master_checker)
            for node, node_scopes in scopes.items():
                for scope in node_scopes:
                    workers.start_soon(worker, node, random.Random(rng.random()), scope)
            await trio.sleep(0.4)
            for scope in scopes[victim]:
                scope.cancel()
            await c.kill(victim)
            for name in names:
                for key in [k for k in held[name] if k[0] == victim]:
                    del held[name][key]
            before = dict(completed)
            await c.change_view(removed=frozenset({victim}))
            await trio.sleep(0.4)  # a stretch of traffic after recovery
            await eventually(lambda: all(completed[n] > before[n] + 3 for n in (1, 2, 3)), 30)
            for node in (1, 2, 3):
                for scope in scopes[node]:
                    scope.cancel()
            workers.cancel_scope.cancel()
        assert violations == []
        assert two_masters == []
        # workers were cancelled mid-operation; drain what they left behind
        leftovers = [h for ls in c.spaces.values() for h in ls.handles.values()]
        for h in leftovers:
            if not h.unlocking:
                h.ls.request_unlock(h, Flag.FORCEUNLOCK)
        for h in leftovers:
            with trio.fail_after(15):
                assert await h.wait() == EUNLOCK
        for name in names:
            assert len(c.masters_of(name)) == 0, name  # every lock is gone everywhere
        await c.close()
        nursery.cancel_scope.cancel()


@pytest.mark.timeout(30)
async def test_joining_node_finds_existing_masters_through_rebuilt_directory():
    async with trio.open_nursery() as nursery:
        c = await new_cluster(nursery, 2)
        names = [f"j-{i}".encode() for i in range(20)]
        held = {}
        for i, name in enumerate(names):
            held[name] = await c.spaces[1 + i % 2].lock(name, EX)
        before = {name: c.masters_of(name) for name in names}
        await c.add_nodes(3)
        await c.change_view()
        members = c.view.member_ids
        # masters did not move; the directory share now on node 3 was rebuilt for it
        assert {name: c.masters_of(name) for name in names} == before
        on_3 = [n for n in names if directory_node(n, members) == 3]
        assert on_3 and all(c.spaces[3].directory.entries[n] == before[n][0] for n in on_3)
        for name in names:
            with pytest.raises(OSError):
                await c.spaces[3].lock(name, PR, Flag.NOQUEUE)
        waiters = [c.spaces[3].request(name, PR) for name in names]
        for i, name in enumerate(names):
            await c.spaces[1 + i % 2].unlock(held[name])
        for h in waiters:
            assert await h.wait() == 0
        assert {name: c.masters_of(name) for name in names} == before
        await c.close()
        nursery.cancel_scope.cancel()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("survivor_mode", [PR, CR])
async def test_new_master_rebuilds_lvb_from_survivors(survivor_mode):
    """A surviving lock stronger than CR keeps the LVB valid; NL/CR copies only give the
    newest value, marked not valid (the dead master may have seen a newer write)."""
    async with trio.open_nursery() as nursery:
        c = await new_cluster(nursery, 3)
        s1, s2 = c.spaces[1], c.spaces[2]
        await c.spaces[3].lock(b"rgrp-lvb", NL)  # node 3 masters it
        value = b"free-blocks=42".ljust(32, b"\0")
        writer = await s1.lock(b"rgrp-lvb", EX, Flag.VALBLK, lvb=bytes(32))
        await s1.convert(writer, survivor_mode, Flag.VALBLK, lvb=value)
        reader = await s2.lock(b"rgrp-lvb", NL, Flag.VALBLK, lvb=bytes(32))
        assert reader.lvb == value and reader.lvbseq == 1
        await c.kill(3)
        await c.change_view(removed=frozenset({3}))
        check = await s2.lock(b"rgrp-lvb", CR, Flag.VALBLK, lvb=bytes(32))
        assert check.lvb == value and check.lvbseq == 1
        assert bool(check.sbflags & SBFlag.VALNOTVALID) == (survivor_mode == CR)
        await c.close()
        nursery.cancel_scope.cancel()


@pytest.mark.timeout(30)
async def test_lvb_is_invalid_when_its_master_and_writer_die_with_no_copy_left():
    """The master and the PW holder die together and no survivor kept the value: the new
    master cannot know what was written, so the LVB comes back zeros marked not valid."""
    async with trio.open_nursery() as nursery:
        c = await new_cluster(nursery, 3)
        s1, s2 = c.spaces[1], c.spaces[2]
        writer = await s2.lock(b"lost-lvb", EX, Flag.VALBLK, lvb=bytes(32))  # node 2 masters
        await s2.convert(writer, PW, Flag.VALBLK, lvb=b"dirty".ljust(32, b"\0"))
        async with trio.open_nursery() as waiting:
            got = []

            async def wait_for_pr():
                got.append(await s1.lock(b"lost-lvb", PR, Flag.VALBLK, lvb=bytes(32)))

            waiting.start_soon(wait_for_pr)
            await trio.sleep(0.2)
            assert not got  # queued behind the PW holder
            await c.kill(2)
            await c.change_view(removed=frozenset({2}))
        reader = got[0]
        assert reader.lvb == bytes(32)
        assert reader.sbflags & SBFlag.VALNOTVALID
        await c.close()
        nursery.cancel_scope.cancel()


@pytest.mark.timeout(30)
async def test_restarted_node_with_new_incarnation_loses_its_old_locks():
    async with trio.open_nursery() as nursery:
        c = await new_cluster(nursery, 3)
        await c.spaces[3].lock(b"old-life", EX)  # node 3 masters and holds it
        await c.spaces[2].lock(b"on-2", NL)
        await c.spaces[3].lock(b"on-2", EX)  # held on a resource node 2 masters
        waiters = [c.spaces[1].request(b"old-life", EX), c.spaces[1].request(b"on-2", PR)]
        old_incarnation = c.transports[3].incarnation
        await c.kill(3)
        await c.add_nodes(3)  # same node id, new run
        assert c.transports[3].incarnation != old_incarnation
        await c.change_view()  # the view lists node 3 again, with its new incarnation
        for h in waiters:
            assert await h.wait() == 0
        assert all(key[0] != 3 for key in c.spaces[2].masters[b"on-2"].locks)
        # the new run of node 3 is a normal member
        with pytest.raises(OSError):
            await c.spaces[3].lock(b"old-life", PR, Flag.NOQUEUE)
        await c.close()
        nursery.cancel_scope.cancel()


@pytest.mark.timeout(40)
async def test_recovery_aborted_after_remastering_is_redone_cleanly():
    """The pass for view 2 gets as far as rebuilding locks on new masters, then stalls
    (node 3 never reaches the LOCKS barrier) and is superseded by view 3 without node 3.
    View 3 must redo the remastering from scratch: one master per name, every surviving
    lock on it, waiters granted."""
    async with trio.open_nursery() as nursery:
        c = await new_cluster(nursery, 4)
        names = [f"orphan-{i}".encode() for i in range(10)]
        for name in names:
            await c.spaces[4].lock(name, NL)  # node 4 masters them all
        held = {}
        for name in names:
            held[(1, name)] = await c.spaces[1].lock(name, PR)
            held[(2, name)] = await c.spaces[2].lock(name, PR)
            held[(3, name)] = await c.spaces[3].lock(name, CR)
        waiters = {name: c.spaces[2].request(name, EX) for name in names}
        stall = trio.Event()
        original = c.spaces[3].recovery._barrier

        async def stalling_barrier(seq, step, data=None, original=original):
            if step == 3:  # LOCKS: stall after the RLOCKS went out
                stall.set()
                await trio.sleep_forever()
            await original(seq, step, data)

        c.spaces[3].recovery._barrier = stalling_barrier
        await c.kill(4)
        view2 = c.make_view(removed=frozenset({4}))
        for ls in c.spaces.values():
            await ls.stop()
        async with trio.open_nursery() as starters:
            for ls in c.spaces.values():
                starters.start_soon(ls.start, view2)
            await stall.wait()
            await eventually(
                lambda: any(name in c.spaces[n].masters for n in (1, 2, 3) for name in names)
            )
            starters.cancel_scope.cancel()  # node 3 "dies" mid-recovery
        await c.kill(3)
        c.view = view2
        await c.change_view(removed=frozenset({3}))
        for name in names:
            masters = c.masters_of(name)
            assert len(masters) == 1, (name, masters)
            res = c.spaces[masters[0]].masters[name]
            assert {lk.key for lk in res.granted} == {
                (1, held[(1, name)].lkid),
                (2, held[(2, name)].lkid),
            }
            assert [lk.key for lk in res.waiting] == [(2, waiters[name].lkid)]
            await c.spaces[1].unlock(held[(1, name)])
            await c.spaces[2].unlock(held[(2, name)])
            assert await waiters[name].wait() == 0
        await c.close()
        nursery.cancel_scope.cancel()


@pytest.mark.timeout(30)
async def test_slots_are_kept_and_reused_like_journal_ids():
    async with trio.open_nursery() as nursery:
        c = await new_cluster(nursery, 3)
        assert all(ls.slots == {1: 1, 2: 2, 3: 3} for ls in c.spaces.values())
        await c.kill(2)
        await c.change_view(removed=frozenset({2}))
        assert all(ls.slots == {1: 1, 3: 3} for ls in c.spaces.values())
        await c.add_nodes(4)
        await c.change_view()  # the newcomer takes the lowest free slot: journal 1
        assert all(ls.slots == {1: 1, 3: 3, 4: 2} for ls in c.spaces.values())
        assert c.spaces[4].slot == 2 and c.spaces[4].generation == c.view.epoch
        await c.close()
        nursery.cancel_scope.cancel()


@pytest.mark.timeout(30)
async def test_cancelled_lock_call_leaves_no_lock_behind():
    async with trio.open_nursery() as nursery:
        c = await new_cluster(nursery, 2)
        s1, s2 = c.spaces[1], c.spaces[2]
        holder = await s1.lock(b"contended", EX)
        with trio.move_on_after(0.05):
            await s2.lock(b"contended", EX)  # the caller gives up while queued
        await s1.unlock(holder)
        # node 2's abandoned request was cancelled, or released once granted
        await eventually(lambda: not s2.handles)
        again = await s1.lock(b"contended", EX, Flag.NOQUEUE)
        assert again.mode == EX
        await c.close()
        nursery.cancel_scope.cancel()


@pytest.mark.timeout(30)
async def test_remote_deadlock_noqueuebast_and_lvb_on_unlock():
    async with trio.open_nursery() as nursery:
        c = await new_cluster(nursery, 3)
        s1, s2, s3 = c.spaces[1], c.spaces[2], c.spaces[3]
        await s3.lock(b"dl", NL)  # node 3 masters it; everything below is remote for 1, 2
        a = await s1.lock(b"dl", NL)
        b = await s2.lock(b"dl", PR)
        keeper = await s1.lock(b"dl", PR)  # keeps b's conversion blocked
        s1.request_convert(a, EX)  # queued: NL->EX waits for the PRs
        await trio.sleep(0.05)
        with pytest.raises(OSError) as exc:
            await s2.convert(b, EX)  # a is ahead wanting EX, which b's PR blocks
        assert exc.value.errno == errno.EDEADLK and b.mode == PR
        await s1.unlock(keeper)
        await s2.unlock(b)
        assert await a.wait() == 0 and a.mode == EX
        # a try-lock with NOQUEUEBAST still tells the holder it is in the way (a
        # conversion may install a bast handler, as with the kernel DLM)
        basts = []
        a.bast = lambda h, mode: basts.append(mode)
        await s1.convert(a, EX)
        with pytest.raises(OSError):
            await s2.lock(b"dl", PR, Flag.NOQUEUE | Flag.NOQUEUEBAST)
        await eventually(lambda: basts == [PR])
        # unlock from EX writes the value block; IVVALBLK invalidates it
        writer = await s2.lock(b"lvb", EX, Flag.VALBLK, lvb=bytes(32))
        await s2.unlock(writer, Flag.VALBLK, lvb=b"v".ljust(32, b"\0"))
        reader = await s1.lock(b"lvb", PW, Flag.VALBLK, lvb=bytes(32))
        assert reader.lvb.rstrip(b"\0") == b"v" and reader.lvbseq == 1
        await s1.unlock(reader, Flag.IVVALBLK)
        again = await s3.lock(b"lvb", CR, Flag.VALBLK, lvb=bytes(32))
        assert again.sbflags & SBFlag.VALNOTVALID
        await c.close()
        nursery.cancel_scope.cancel()
