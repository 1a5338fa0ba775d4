"""How much memory a check may use, without any framework: the host's available RAM.

The adapters add what their framework can read for an accelerator (torch:
``torch.cuda.mem_get_info``; Keras: see :func:`gradwatch.keras.local_backends.free_memory`).
"""

from __future__ import annotations

import os

__all__ = ["available_ram"]


def available_ram(meminfo: str = "/proc/meminfo") -> int | None:
    """Bytes of RAM available to a new allocation, as the OS reports it (``None``: unknown).

    ``MemAvailable`` from ``/proc/meminfo`` (Linux: free memory plus reclaimable caches), else the
    free pages ``os.sysconf`` reports.

    Example:
        >>> n = available_ram()
        >>> n is None or n > 0
        True
    """
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None
