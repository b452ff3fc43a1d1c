"""Fixtures: one real ``duplex demo`` (orchestrator + mock worker) for the whole test session.

The binary comes from ``DUPLEX_BIN`` (default: the repository's release build,
``../../target/release/duplex`` from this package). The demo listens on port 0
and prints the address it got; readiness is that line plus a TCP connect, never
a fixed sleep.
"""

from __future__ import annotations

import math
import os
import queue
import re
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent
DEFAULT_BIN = PACKAGE_DIR / ".." / ".." / "target" / "release" / "duplex"
#: Generous: the machine running the tests may be busy with other builds.
STARTUP_TIMEOUT = float(os.environ.get("DUPLEX_STARTUP_TIMEOUT", "120"))


@dataclass
class Demo:
    url: str
    host: str
    port: int
    log_path: Path


def _duplex_bin() -> Path:
    path = Path(os.environ.get("DUPLEX_BIN") or DEFAULT_BIN).resolve()
    if not path.is_file() or not os.access(path, os.X_OK):
        pytest.fail(
            f"duplex binary not found at {path}: run `cargo build --release` in the repository "
            "or set DUPLEX_BIN to the binary",
            pytrace=False,
        )
    return path


def _start_demo(extra_args: list[str]) -> Iterator[Demo]:
    binary = _duplex_bin()
    log = tempfile.NamedTemporaryFile(prefix="duplex-demo-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [str(binary), "demo", "--listen", "127.0.0.1:0", "--model", "mock-440hz", *extra_args],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:  # keeps the pipe drained for the server's whole life
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        url = None
        while url is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"duplex demo printed no address within {STARTUP_TIMEOUT}s; log: {log.name}")
            try:
                line = lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                pytest.fail(
                    f"duplex demo exited (code {proc.wait()}) before listening; log: {log.name}\n"
                    + Path(log.name).read_text(errors="replace")[-2000:]
                )
            m = re.search(r"duplex demo: (ws://([\d.]+):(\d+)/)", line)
            if m:
                url, host, port = m.group(1), m.group(2), int(m.group(3))
        while True:  # the line is printed after bind; a connect confirms it
            try:
                socket.create_connection((host, port), timeout=5).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail(f"duplex demo at {url} does not accept connections; log: {log.name}")
                time.sleep(0.05)
        yield Demo(url=url, host=host, port=port, log_path=Path(log.name))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="session")
def demo() -> Iterator[Demo]:
    """The shared gateway (default flags: barge-in stops playback)."""
    yield from _start_demo([])


@pytest.fixture(scope="session")
def demo_url(demo: Demo) -> str:
    return demo.url


def tone(ms: int, rate: int = 16_000, freq: float = 300.0, amplitude: float = 0.5) -> bytes:
    """A sine tone as s16le mono: loud enough (-9 dBFS RMS) to count as speech for the VAD."""
    n = rate * ms // 1000
    peak = int(32767 * amplitude)
    return b"".join(
        struct.pack("<h", int(peak * math.sin(2 * math.pi * freq * i / rate))) for i in range(n)
    )


def silence(ms: int, rate: int = 16_000) -> bytes:
    return b"\x00\x00" * (rate * ms // 1000)
