"""Writer run inside a network namespace by test_multipath_linkcut (not a test itself).

It writes blocks through a MultipathDevice with several writers in flight, prints READY
after `--ready-after` writes so the test can cut a link, and prints one JSON result line
at the end: the longest gap between completed writes, errors, and the path status.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys

import trio

from gfspy.blockdev.device import DeviceError
from gfspy.blockdev.multipath import MultipathConfig, MultipathDevice

BLOCK = 64 * 1024


def pattern(i: int) -> bytes:
    seed = hashlib.sha256(i.to_bytes(8, "big")).digest()
    return (seed * (BLOCK // len(seed)))[:BLOCK]


async def main(args: argparse.Namespace) -> dict:
    config = MultipathConfig(
        policy="failover",
        polling_interval=args.polling_interval,
        io_timeout=args.polling_interval,
        failback="manual",
        no_path_retry=10,
    )
    dev = await MultipathDevice.open(args.uris.split(","), config)
    gaps: list[float] = []
    errors: list[str] = []
    done = 0
    last = trio.current_time()

    async def writer(first: int) -> None:
        nonlocal done, last
        for i in range(first, args.count, args.writers):
            try:
                await dev.write(i * BLOCK, pattern(i))
            except DeviceError as e:
                errors.append(f"block {i}: {e}")
                return
            now = trio.current_time()
            gaps.append(now - last)
            last = now
            done += 1
            if done == args.ready_after:
                print("READY", flush=True)
            await trio.sleep(args.pause)

    try:
        async with trio.open_nursery() as nursery:
            for w in range(args.writers):
                nursery.start_soon(writer, w)
        await dev.flush()
        return {"max_gap": max(gaps), "errors": errors, "done": done, "status": dev.status()}
    finally:
        await dev.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("uris")
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--ready-after", type=int, default=40)
    parser.add_argument("--pause", type=float, default=0.01)
    parser.add_argument("--polling-interval", type=float, default=2.0)
    result = trio.run(main, parser.parse_args())
    print(json.dumps(result), flush=True)
    sys.exit(0)
