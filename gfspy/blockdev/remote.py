"""Open a remote device from its spec: one NBD URI, or several comma-separated URIs.

One URI gives a plain `NbdDevice`; several give a `MultipathDevice` over them, since
several servers exporting one LUN are several paths to one device.
"""

from __future__ import annotations

import errno

from gfspy.blockdev.device import Device, DeviceError
from gfspy.blockdev.multipath import MultipathConfig, MultipathDevice
from gfspy.blockdev.nbd import NbdDevice


def split_spec(spec: str) -> list[str]:
    """The URIs of a spec; empty items (a stray comma) are a usage error."""
    uris = [u.strip() for u in spec.split(",")]
    if not all(uris):
        raise DeviceError(errno.EINVAL, f"{spec!r}: empty path in comma-separated list")
    return uris


async def open_remote(
    spec: str, readonly: bool = False, *, config: MultipathConfig | None = None
) -> Device:
    """`nbd://host[:port]/export` -> NbdDevice; `URI,URI[,...]` -> MultipathDevice."""
    uris = split_spec(spec)
    if len(uris) == 1 and config is None:
        return await NbdDevice.open(uris[0], readonly=readonly)
    return await MultipathDevice.open(uris, config, readonly=readonly)
