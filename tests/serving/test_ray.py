"""Scale-out on Ray Serve (kelix_fast.serving.ray): two replicas of the tiny model, each a full engine,
behind Ray's router, answer like one engine alone.

Ray binds its services to the machine's network address, so the whole check runs in a network
namespace of its own that has only the loopback interface (``unshare -n``, as root): nothing it sends
can reach another address."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="the serve extra (ray[serve]) is not installed")

SCRIPT = Path(__file__).with_name("ray_check.py")


def _netns_available() -> str | None:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare and ip (util-linux, iproute2) are needed for an isolated network namespace"
    probe = subprocess.run(["unshare", "-n", "true"], check=False, capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create a network namespace here: {probe.stderr.strip()}"
    return None


def test_two_replicas_answer_like_one_engine_alone():
    reason = _netns_available()
    if reason is not None:
        pytest.skip(reason)
    command = f"ip link set lo up && exec {sys.executable} {SCRIPT} 18321"
    done = subprocess.run(
        ["unshare", "-n", "sh", "-c", command],
        check=False,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["replicas_running"] == 2
    assert result["answers"] == result["expected"]
