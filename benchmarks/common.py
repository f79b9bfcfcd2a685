"""What the benchmark scripts share: load average, device naming and GPU synchronisation.

Devices are resolved by :func:`helpers.repro.resolve_device`, as everywhere in the project.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch


def loadavg() -> str:
    """``/proc/loadavg`` (``"n/a"`` where there is none): how busy the machine was."""
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "n/a"


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer read after it measures the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """``"NVIDIA H100 ..."`` or ``"cpu (2 cores)"``, for the printed header."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
