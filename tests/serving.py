"""A real `longreach serve` process on 127.0.0.1 (a free port), for the serving tests."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

CHAT_TEMPLATE = Path(__file__).parent / "fixtures" / "chat_template.jinja"


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    process: subprocess.Popen
    log: list[str]

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.process.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS line for the server process")


@contextmanager
def running_server(*args: str, timeout: float = 120.0) -> Iterator[Server]:
    """Start `longreach serve --port 0 ARGS`, wait until it listens, stop it afterwards."""
    cmd = [sys.executable, "-m", "longreach", "serve", "--port", "0", "--threads", "1", *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    lines: list[str] = []
    found = threading.Event()
    url: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if "listening on " in line and not url:
                url.append(line.split("listening on ", 1)[1].strip().removesuffix("/v1"))
                found.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    while not found.is_set() and proc.poll() is None and time.monotonic() < deadline:
        found.wait(0.1)
    if not found.is_set():
        proc.kill()
        proc.wait()
        raise AssertionError(
            f"`{' '.join(cmd)}` did not start within {timeout} s: " + "\n".join(lines[-20:])
        )
    try:
        yield Server(url[0], proc, lines)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
