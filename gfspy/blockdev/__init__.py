"""Block devices: one async `Device` interface over local files, NBD and multipath."""

from gfspy.blockdev.device import Device, DeviceError, open_device

__all__ = ["Device", "DeviceError", "open_device"]
