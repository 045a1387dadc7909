"""What a result was measured on and with: device, driver, versions, commit."""

from __future__ import annotations

import datetime
import subprocess
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


def _command(*args: str) -> str | None:
    """stdout of a command, stripped, or None when it cannot run or fails."""
    try:
        done = subprocess.run(
            args, capture_output=True, text=True, timeout=30, check=True, cwd=REPO
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def describe(device: torch.device) -> dict[str, Any]:
    """Device name, driver, versions, git commit and dirty flag, and a UTC timestamp."""
    on_gpu = device.type == "cuda"
    driver = None
    if on_gpu:
        driver = _command("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
        driver = driver.splitlines()[0] if driver else None
    status = _command("git", "status", "--porcelain")
    return {
        "device": torch.cuda.get_device_name(device) if on_gpu else "cpu",
        "device_type": device.type,
        "versions": {
            "torch": torch.__version__,
            "triton": _triton_version(),
            "cuda": torch.version.cuda,
            "driver": driver,
        },
        "commit": _command("git", "rev-parse", "HEAD"),
        "dirty": None if status is None else bool(status),
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
