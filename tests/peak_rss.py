"""Peak resident memory of this process since a reset (Linux: /proc/self/clear_refs, VmHWM).

`ru_maxrss` is a lifetime maximum, so the transient peak of `import torch` would hide a smaller load;
resetting the high-water mark after the imports measures only what follows.
"""

from __future__ import annotations


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def reset() -> int:
    """Reset the high-water mark to the current RSS and return that RSS (bytes)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def peak() -> int:
    """Highest RSS (bytes) since the last `reset`."""
    return _status("VmHWM")
