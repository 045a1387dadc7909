"""``LiveServer``: a ``kelix-fast serve`` process for the HTTP tests: the tiny models on the CPU, on
127.0.0.1 and a free port, ready once ``/health`` answers, stopped with SIGTERM and checked to exit
cleanly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

STARTUP_SECONDS = 90


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """One ``python -m kelix_fast.cli serve --tiny --device cpu`` process; ``args`` are added."""

    def __init__(self, log: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [sys.executable, "-m", "kelix_fast.cli", "serve", "--tiny", "--device", "cpu"]
        command += ["--port", str(self.port), *args]
        # Tiny tensors: torch's intra-op threads cost more than they save (tests/conftest.py).
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with log.open("wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited at startup:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.process.kill()
        raise RuntimeError(f"the server did not answer /health in {STARTUP_SECONDS} s")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM, then wait for the exit; returns the exit status."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise

    def stop_cleanly(self) -> None:
        """SIGTERM; the server must exit with 0 and have logged no traceback."""
        status = self.terminate()
        output = self.output()
        assert status == 0, f"exit status {status}:\n{output}"
        assert "Traceback" not in output, output
        assert "Application shutdown complete" in output, output
