"""Run inside a fresh network namespace by tests/serving/test_ray.py: ``kelix-fast serve --ray --tiny
--replicas 2`` (two Ray Serve replicas of the tiny model, on loopback only) answers concurrent chat
requests exactly as one engine alone does.

Prints one JSON line: {"replicas_running": int, "answers": [...], "expected": [...]}.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time

import httpx

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # nothing leaves the machine (nor this namespace)

import ray
from ray import serve

from kelix_fast import KelixPipeline

PORT = int(sys.argv[1])
QUESTIONS = [f"question {i}: what is {i} + {i}?" for i in range(8)]


def ask(question: str) -> str:
    body = {
        "model": "kelix-tiny",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 4,
        "top_k": 1,
    }
    response = httpx.post(f"http://127.0.0.1:{PORT}/v1/chat/completions", json=body, timeout=120)
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"]


def main() -> None:
    command = [
        sys.executable,
        "-m",
        "kelix_fast.cli",
        "serve",
        "--ray",
        "--tiny",
        "--device",
        "cpu",
    ]
    command += ["--replicas", "2", "--max-batch", "4", "--port", str(PORT)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{PORT}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        with concurrent.futures.ThreadPoolExecutor(len(QUESTIONS)) as pool:
            answers = list(pool.map(ask, QUESTIONS))
        ray.init(address="auto")
        status = serve.status().applications["kelix_fast"].deployments["KelixReplica"]
        running = status.replica_states.get("RUNNING", 0)
        ray.shutdown()
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)
    alone = KelixPipeline.tiny(seed=0, device="cpu")
    expected = [alone.chat([{"role": "user", "content": q}], max_new_tokens=4) for q in QUESTIONS]
    print(json.dumps({"replicas_running": running, "answers": answers, "expected": expected}))


if __name__ == "__main__":
    main()
