#!/usr/bin/env python3
"""Reruns issue 11's resource attacks against a real `duplex demo` and prints the orchestrator's
peak RSS (VmHWM) after each, so the README's memory bound is a figure anyone can reproduce.

    scripts/attack-rss.py [--bin target/release/duplex] [--serve-arg=--FLAG=VALUE ...]

Attacks, in order, on one process (peak RSS only grows, so each line bounds everything up to it):
  1. one session sends 1,000 texts of 1 MiB as fast as it can
  2. one session sends 100,000 small texts as fast as it can
  3. 2,000 TCP connections that never send a byte
  4. 200 sessions (pacing=asap) that keep asking for audio and never read it
Stdlib only (raw sockets, a minimal WebSocket client).
"""
import argparse
import base64
import json
import os
import socket
import subprocess
import sys
import time


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def hwm_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                yield line.split(":")[0], int(line.split()[1])


def ws_open(port, query=""):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(
        (
            f"GET /?{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            raise RuntimeError("closed during the handshake")
        head += chunk
    if b" 101 " not in head.split(b"\r\n")[0]:
        raise RuntimeError(head.split(b"\r\n")[0].decode())
    return s


def frame(payload: bytes, opcode=1):
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        hdr = bytes([0x80 | opcode, 0x80 | n])
    elif n < 65536:
        hdr = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        hdr = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload)) if n < 4096 else _mask_fast(payload, mask)
    return hdr + mask + masked


def _mask_fast(payload, mask):
    m = int.from_bytes(mask * (len(payload) // 4 + 1), "little")
    p = int.from_bytes(payload, "little")
    return (p ^ (m & ((1 << (8 * len(payload))) - 1))).to_bytes(len(payload), "little")


def drain(s, secs):
    """Reads whatever arrives for `secs`; returns the bytes seen."""
    s.settimeout(0.2)
    got = b""
    end = time.time() + secs
    while time.time() < end:
        try:
            c = s.recv(1 << 16)
            if not c:
                break
            got += c
        except socket.timeout:
            pass
        except OSError:
            break
    return got


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/duplex")
    ap.add_argument("--serve-arg", action="append", default=[],
                    help="extra orchestrator flag, e.g. --serve-arg=--max-queued-output-bytes=67108864")
    args = ap.parse_args()
    port, admin = free_port(), free_port()
    proc = subprocess.Popen(
        [args.bin, "demo", "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
         "--model", "mock-440hz", "--max-connections-per-ip", "0", *args.serve_arg],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        base = dict(hwm_kib(proc.pid))
        print(f"idle: RSS {base['VmRSS'] / 1024:.1f} MiB")

        def report(what, extra=""):
            m = dict(hwm_kib(proc.pid))
            print(f"{what}: peak RSS {m['VmHWM'] / 1024:.1f} MiB, now {m['VmRSS'] / 1024:.1f} MiB {extra}")

        # 1. 1,000 × 1 MiB texts.
        s = ws_open(port)
        big = frame(json.dumps({"type": "text", "text": "a" * (1 << 20)}).encode())
        for _ in range(1000):
            try:
                s.sendall(big)
            except OSError:
                break
        got = drain(s, 2)
        closed = b"\x88" in got
        report("1,000 x 1 MiB texts", f"({got.count(b'RATE_LIMITED')} RATE_LIMITED seen, closed: {closed})")
        s.close()

        # 2. 100,000 small texts.
        s = ws_open(port)
        small = frame(json.dumps({"type": "text", "text": "Hello there."}).encode())
        batch = small * 1000
        for _ in range(100):
            try:
                s.sendall(batch)
            except OSError:
                break
        got = drain(s, 2)
        closed = b"\x88" in got
        report("100,000 small texts", f"({got.count(b'RATE_LIMITED')} RATE_LIMITED seen, closed: {closed})")
        s.close()

        # 3. 2,000 silent connections.
        silent = []
        for _ in range(2000):
            try:
                silent.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            except OSError:
                break
        t0 = time.time()
        c = ws_open(port)  # a real client still gets in
        c.close()
        report(f"{len(silent)} silent connections", f"(a real client got in after {time.time() - t0:.3f} s)")
        for x in silent:
            x.close()

        # 4. 200 slow consumers (ask for audio as fast as the worker makes it, never read).
        slow = []
        for _ in range(200):
            try:
                x = ws_open(port, "pacing=asap&format=binary")
                x.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                slow.append(x)
            except OSError:
                break
        # Keep each queue full: 8 more texts per session every second (the queue takes 16).
        text = frame(json.dumps({"type": "text", "text": "Speak."}).encode())
        cut = 0
        for _ in range(20):
            for x in slow:
                try:
                    x.sendall(text * 8)
                except OSError:
                    cut += 1
            time.sleep(1)
        report(f"{len(slow)} slow consumers after 20 s", f"({cut} sends failed: cut off)")
        for x in slow:
            x.close()
    finally:
        proc.terminate()
        proc.wait(timeout=40)


if __name__ == "__main__":
    sys.exit(main())
