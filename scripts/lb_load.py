#!/usr/bin/env python3
"""Load driver and report for scripts/lb-test.sh (``just lb-test``).

``run``: keeps N sessions speaking through the load balancer with the ``duplex_client``
package. Each session: connect, speak an utterance of a few streamed chunks, wait for its end
marker, pause a random short time, repeat. A session the server ends with ``session_end`` (a
drain) reconnects; that is expected, not a failure. Every connect attempt, session and
utterance is written as one JSON line to ``--out`` when the run stops (at ``--stop-file``).
``--status`` is rewritten every second so the shell script can poll progress.

``report``: joins those records with the phase marks the shell script wrote (restart windows,
the worker kill) and the orchestrators' JSON logs (which worker served a failed utterance's
session), prints the table, writes the JSON report and exits non-zero when anything failed
other than utterances in flight on the killed worker.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import sys
import time
from pathlib import Path

# ----------------------------------------------------------------------------------------------
# run
# ----------------------------------------------------------------------------------------------

CHUNKS = ["Hello there, ", "this is a load test ", "through the balancer."]


class Recorder:
    def __init__(self) -> None:
        self.records: list[dict] = []
        self.sessions_open = 0
        self.counts = {
            "connect_attempts": 0,
            "connect_failed": 0,
            "sessions_started": 0,
            "utterances_started": 0,
            "utterances_ok": 0,
            "utterances_not_ok": 0,
        }

    def add(self, rec: dict) -> None:
        self.records.append(rec)


async def session_loop(idx: int, args: argparse.Namespace, rec: Recorder, stop: asyncio.Event) -> None:
    from duplex_client import Client, SessionEnd  # noqa: F401 - imported here: venv only
    from duplex_client.errors import ConnectionClosed, DuplexError

    rng = random.Random(args.seed * 100_003 + idx)
    # Spread the initial connects over the ramp so 200 handshakes don't land in one instant.
    await asyncio.sleep(rng.uniform(0, args.ramp_secs))
    retry_text: bool = False  # an utterance cut by a drain before any audio is spoken again
    while not stop.is_set():
        t_connect = time.time()
        rec.counts["connect_attempts"] += 1
        client = Client(args.url, format="binary", pacing="realtime", model=args.model, open_timeout=args.open_timeout)
        try:
            await client.connect()
        except Exception as e:  # noqa: BLE001 - every refusal is a finding
            rec.counts["connect_failed"] += 1
            rec.add({"kind": "connect", "session": idx, "t": t_connect, "ok": False,
                     "error": f"{type(e).__name__}: {e}"[:300], "secs": time.time() - t_connect})
            await asyncio.sleep(rng.uniform(0.1, 0.5))
            continue
        sid = client.session_id
        rec.counts["sessions_started"] += 1
        rec.sessions_open += 1
        srec = {"kind": "session", "session": idx, "sid": sid, "t_start": time.time(),
                "connect_secs": time.time() - t_connect, "utterances": 0, "end": None,
                "session_end_reason": None}
        prev_failed_code: str | None = None
        try:
            while not stop.is_set() and client.connected:
                urec = {"kind": "utterance", "session": idx, "sid": sid, "t_send": time.time(),
                        "fal_ms": None, "frames": 0, "outcome": None, "error": None,
                        "after_failure": prev_failed_code, "retry_after_drain": retry_text}
                rec.counts["utterances_started"] += 1
                srec["utterances"] += 1
                t0 = time.monotonic()
                first: float | None = None
                u = None
                try:
                    u = await client.say_chunk(CHUNKS[0])
                    for c in CHUNKS[1:-1]:
                        await client.say_chunk(c)
                    await client.say_chunk(CHUNKS[-1], final=True)
                    async for _frame in u:
                        if first is None:
                            first = time.monotonic()
                    outcome = "ok"
                    if u.interrupted is not None:
                        outcome = f"interrupted:{u.interrupted.reason}"
                    elif u.frames_received == 0:
                        outcome = "no_audio"
                except ConnectionClosed as e:
                    # Closed before the end marker: with session_end first (drain) the
                    # utterance was cut by the server on purpose, else the connection dropped.
                    if client.session_end is not None:
                        frames = u.frames_received if u is not None else 0
                        outcome = "drain_before_audio" if frames == 0 else "session_end_mid_audio"
                        urec["error"] = f"session_end:{client.session_end.reason}"
                    else:
                        outcome = "dropped"
                        urec["error"] = str(e)[:300]
                except DuplexError as e:
                    outcome = f"error:{e.code}"
                    urec["error"] = e.message[:300]
                except Exception as e:  # noqa: BLE001
                    outcome = "exception"
                    urec["error"] = f"{type(e).__name__}: {e}"[:300]
                urec["t_end"] = time.time()
                if first is not None:
                    urec["fal_ms"] = (first - t0) * 1000.0
                if u is not None:
                    urec["frames"] = u.frames_received
                urec["outcome"] = outcome
                rec.add(urec)
                if outcome == "ok":
                    rec.counts["utterances_ok"] += 1
                    prev_failed_code = None
                    retry_text = False
                else:
                    rec.counts["utterances_not_ok"] += 1
                    prev_failed_code = outcome
                    retry_text = outcome == "drain_before_audio"
                if not client.connected:
                    break
                await asyncio.sleep(rng.uniform(args.pause_min, args.pause_max))
                # A session_end (drain) that arrived during the pause ends the loop above:
                # nothing was sent, so no utterance is counted.
        finally:
            srec["session_end_reason"] = client.session_end.reason if client.session_end else None
            if client.connected:
                srec["end"] = "client_close"
                await client.close()
            elif client.session_end is not None:
                srec["end"] = "session_end"
            else:
                srec["end"] = "dropped"
            srec["t_end"] = time.time()
            rec.sessions_open -= 1
            rec.add(srec)
        if srec["end"] == "dropped":
            await asyncio.sleep(rng.uniform(0.1, 0.5))


async def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING)
    rec = Recorder()
    stop = asyncio.Event()
    stop_file = Path(args.stop_file)
    tasks = [asyncio.create_task(session_loop(i, args, rec, stop)) for i in range(args.sessions)]
    t_start = time.time()
    status = Path(args.status)
    while True:
        st = dict(rec.counts, sessions_open=rec.sessions_open, t=time.time(), elapsed=time.time() - t_start)
        tmp = status.with_suffix(".tmp")
        tmp.write_text(json.dumps(st))
        tmp.replace(status)
        if stop_file.exists() or (args.max_secs and time.time() - t_start > args.max_secs):
            break
        await asyncio.sleep(1.0)
    stop.set()
    # Utterances in flight finish (each lasts ~1.5 s); sessions then close from the client side.
    done, pending = await asyncio.wait(tasks, timeout=args.stop_grace)
    for t in pending:
        t.cancel()
    for t in done:
        if t.exception() is not None:
            print(f"lb_load: session task failed: {t.exception()!r}", file=sys.stderr)
    with open(args.out, "w") as f:
        for r in rec.records:
            f.write(json.dumps(r) + "\n")
        f.write(json.dumps({"kind": "run", "t_start": t_start, "t_end": time.time(),
                            "sessions": args.sessions, "stuck_tasks": len(pending)}) + "\n")
    st = dict(rec.counts, sessions_open=rec.sessions_open, t=time.time(), finished=True)
    status.write_text(json.dumps(st))
    return 0


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = min(len(v) - 1, max(0, int(round(p / 100.0 * (len(v) - 1)))))
    return round(v[k], 2)


def load_jsonl(path: str) -> list[dict]:
    out = []
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def worker_of_failures(log_paths: list[str]) -> dict[str, set[tuple[str, str]]]:
    """session id -> {(warning, worker address)}, from the orchestrators' 'synthesis failed',
    'worker stalled' and 'worker unavailable' warnings (JSON logs)."""
    out: dict[str, set[tuple[str, str]]] = {}
    for p in log_paths:
        for line in load_jsonl(p):
            fields = line.get("fields") or {}
            msg = fields.get("message", "")
            if msg not in ("synthesis failed", "worker stalled", "worker unavailable"):
                continue
            worker = fields.get("worker")
            sid = None
            for span in line.get("spans") or []:
                if span.get("name") == "session":
                    sid = span.get("id")
            span = line.get("span") or {}
            if sid is None and span.get("name") == "session":
                sid = span.get("id")
            if sid and worker:
                out.setdefault(sid, set()).add((msg, worker))
    return out


def report(args: argparse.Namespace) -> int:
    raw = load_jsonl(args.raw)
    phases = load_jsonl(args.phases)
    marks = {p["event"]: p["t"] for p in phases}
    utts = [r for r in raw if r["kind"] == "utterance"]
    sessions = [r for r in raw if r["kind"] == "session"]
    connects = [r for r in raw if r["kind"] == "connect"]
    runinfo = next((r for r in raw if r["kind"] == "run"), {})

    windows = []  # restart windows: replacement started -> old process exited
    for i in (1, 2):
        a, b = marks.get(f"restart{i}_begin"), marks.get(f"restart{i}_end")
        if a and b:
            windows.append((a, b))
    kill_t = marks.get("worker_killed")
    killed_addr = args.killed_worker_addr
    failed_worker = worker_of_failures(args.orch_log or [])

    def in_windows(t: float) -> bool:
        return any(a <= t <= b for a, b in windows)

    ok = [u for u in utts if u["outcome"] == "ok"]
    not_ok = [u for u in utts if u["outcome"] != "ok"]
    # An utterance counts against the killed worker when it was in flight at the kill (sent
    # before, ended after) and failed with SYNTHESIS_FAILED, and the orchestrator's log names
    # the killed worker for that session (when the logs are available).
    # A session that was idle on the killed worker at the kill and whose next utterance got
    # WORKER_UNAVAILABLE (the orchestrator tried the dead worker again) is listed apart: it is
    # a failure (the README promises the next utterance goes elsewhere), but caused by the kill.
    attributable, idle_on_killed, other_failed, drain_retries = [], [], [], []
    for u in not_ok:
        if u["outcome"] == "drain_before_audio":
            drain_retries.append(u)
            continue
        logged = failed_worker.get(u["sid"], set())
        on_killed = (
            kill_t is not None
            and u["outcome"] == "error:SYNTHESIS_FAILED"
            and u["t_send"] <= kill_t + 0.05 <= u["t_end"] + 0.05
            and (not failed_worker or any(w == killed_addr for _, w in logged))
        )
        idle_killed = (
            kill_t is not None
            and u["outcome"] == "error:WORKER_UNAVAILABLE"
            and u["t_end"] >= kill_t - 0.05
            and ("worker unavailable", killed_addr) in logged
        )
        if on_killed:
            attributable.append(u)
        elif idle_killed:
            idle_on_killed.append(u)
        else:
            other_failed.append(u)

    # The next utterance of a session that lost one to the killed worker.
    by_sid: dict[str, list[dict]] = {}
    for u in sorted(utts, key=lambda u: u["t_send"]):
        by_sid.setdefault(u["sid"], []).append(u)
    def next_of(failed: list[dict]) -> tuple[int, int, int, list[dict]]:
        ok_, bad, none, bad_list = 0, 0, 0, []
        for u in failed:
            seq = by_sid[u["sid"]]
            i = seq.index(u)
            if i + 1 < len(seq):
                if seq[i + 1]["outcome"] == "ok":
                    ok_ += 1
                else:
                    bad += 1
                    bad_list.append(seq[i + 1])
            else:
                none += 1
        return ok_, bad, none, bad_list

    next_ok, next_bad, next_none, next_bad_list = next_of(attributable)
    idle_next_ok, idle_next_bad, idle_next_none, _ = next_of(idle_on_killed)

    reasons: dict[str, int] = {}
    for u in other_failed:
        reasons[u["outcome"]] = reasons.get(u["outcome"], 0) + 1
    connect_reasons: dict[str, int] = {}
    for c in connects:
        key = c["error"].split(":")[0] + ": " + c["error"].split(":", 1)[-1].strip()[:80]
        connect_reasons[key] = connect_reasons.get(key, 0) + 1

    s_end: dict[str, int] = {}
    for s in sessions:
        k = s["end"] if s["end"] != "session_end" else f"session_end:{s['session_end_reason']}"
        s_end[k] = s_end.get(k, 0) + 1
    sessions_failed = [s for s in sessions if s["end"] == "dropped"]
    sessions_ended_unexpected = [s for s in sessions
                                 if s["end"] == "session_end" and s["session_end_reason"] != "shutdown"]

    fal_all = [u["fal_ms"] for u in ok if u["fal_ms"] is not None]
    fal_restart = [u["fal_ms"] for u in ok if u["fal_ms"] is not None and in_windows(u["t_send"])]
    fal_steady = [u["fal_ms"] for u in ok if u["fal_ms"] is not None and not in_windows(u["t_send"])
                  and not (kill_t and kill_t - 1 <= u["t_send"] <= kill_t + 10)]
    fal_after_kill = [u["fal_ms"] for u in ok if u["fal_ms"] is not None and kill_t
                      and kill_t <= u["t_send"] <= kill_t + 10]

    failures_total = len(other_failed) + len(idle_on_killed) + len(connects) + len(sessions_failed) + len(sessions_ended_unexpected) \
        + next_bad + (runinfo.get("stuck_tasks") or 0)
    result = {
        "config": {"sessions_target": runinfo.get("sessions"), "duration_secs": round(runinfo.get("t_end", 0) - runinfo.get("t_start", 0), 1),
                   "killed_worker": killed_addr, "admin_port_choice": args.admin_choice},
        "phases": marks,
        "sessions": {
            "started": len(sessions),
            "ended_by_client_at_stop": s_end.get("client_close", 0),
            "ended_by_server_drain": s_end.get("session_end:shutdown", 0),
            "ended_by": s_end,
            "failed_dropped_without_session_end": len(sessions_failed),
            "failed_session_end_other_reason": len(sessions_ended_unexpected),
            "completed": s_end.get("client_close", 0) + s_end.get("session_end:shutdown", 0),
            "failed": len(sessions_failed) + len(sessions_ended_unexpected),
        },
        "connects": {"attempts": len(sessions) + len(connects), "failed": len(connects), "failed_reasons": connect_reasons},
        "utterances": {
            "started": len(utts),
            "completed": len(ok),
            "failed_attributable_to_killed_worker": len(attributable),
            "failed_idle_session_on_killed_worker_worker_unavailable": len(idle_on_killed),
            "next_after_idle_on_killed_worker_failure": {"ok": idle_next_ok, "failed": idle_next_bad, "none": idle_next_none},
            "failed_other": len(other_failed),
            "failed_other_reasons": reasons,
            "cut_by_drain_before_audio_and_retried": len(drain_retries),
            "next_after_killed_worker_failure": {"ok": next_ok, "failed": next_bad, "none": next_none},
        },
        "fal_ms": {
            "overall": {"n": len(fal_all), "p50": pct(fal_all, 50), "p99": pct(fal_all, 99), "max": pct(fal_all, 100)},
            "during_restarts": {"n": len(fal_restart), "p50": pct(fal_restart, 50), "p99": pct(fal_restart, 99), "max": pct(fal_restart, 100)},
            "steady": {"n": len(fal_steady), "p50": pct(fal_steady, 50), "p99": pct(fal_steady, 99), "max": pct(fal_steady, 100)},
            "after_worker_kill_10s": {"n": len(fal_after_kill), "p50": pct(fal_after_kill, 50), "p99": pct(fal_after_kill, 99), "max": pct(fal_after_kill, 100)},
        },
        "examples": {
            "failed_other": other_failed[:10],
            "idle_on_killed_worker": idle_on_killed[:3],
            "connect_failed": connects[:10],
            "sessions_dropped": sessions_failed[:10],
            "next_after_kill_failed": next_bad_list[:10],
        },
        "stuck_tasks": runinfo.get("stuck_tasks"),
        "pass": failures_total == 0 and len(ok) > 0,
    }
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")

    s, u, f = result["sessions"], result["utterances"], result["fal_ms"]
    rows = [
        ("sessions started", s["started"]),
        ("sessions completed (client close at stop / drained with session_end)",
         f"{s['completed']} ({s['ended_by_client_at_stop']} / {s['ended_by_server_drain']})"),
        ("sessions failed (dropped without session_end / other session_end)",
         f"{s['failed']} ({s['failed_dropped_without_session_end']} / {s['failed_session_end_other_reason']})"),
        ("connect attempts failed", f"{result['connects']['failed']} {connect_reasons or ''}"),
        ("utterances started", u["started"]),
        ("utterances completed", u["completed"]),
        ("utterances failed, in flight on the killed worker",
         f"{u['failed_attributable_to_killed_worker']} (next utterance: {next_ok} ok, {next_bad} failed, {next_none} none)"),
        ("utterances failed, WORKER_UNAVAILABLE: session idle on the killed worker",
         f"{len(idle_on_killed)} (next utterance: {idle_next_ok} ok, {idle_next_bad} failed, {idle_next_none} none)"),
        ("utterances failed, other", f"{u['failed_other']} {reasons or ''}"),
        ("utterances cut by a drain before any audio (retried)", u["cut_by_drain_before_audio_and_retried"]),
        ("FAL p50 / p99 / max overall (ms)", f"{f['overall']['p50']} / {f['overall']['p99']} / {f['overall']['max']}  (n={f['overall']['n']})"),
        ("FAL p50 / p99 / max during restarts (ms)", f"{f['during_restarts']['p50']} / {f['during_restarts']['p99']} / {f['during_restarts']['max']}  (n={f['during_restarts']['n']})"),
        ("FAL p50 / p99 / max steady (ms)", f"{f['steady']['p50']} / {f['steady']['p99']} / {f['steady']['max']}  (n={f['steady']['n']})"),
        ("FAL p50 / p99 / max 10 s after the kill (ms)", f"{f['after_worker_kill_10s']['p50']} / {f['after_worker_kill_10s']['p99']} / {f['after_worker_kill_10s']['max']}  (n={f['after_worker_kill_10s']['n']})"),
    ]
    w = max(len(r[0]) for r in rows)
    print("\n== lb-test report ==")
    for k, v in rows:
        print(f"  {k.ljust(w)}  {v}")
    print(f"  {'result'.ljust(w)}  {'PASS' if result['pass'] else 'FAIL'}")
    if not result["pass"]:
        for key, items in result["examples"].items():
            for it in items[:5]:
                print(f"  {key}: {json.dumps(it)[:400]}")
    print(f"  (JSON: {args.json})")
    return 0 if result["pass"] else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--url", required=True)
    r.add_argument("--sessions", type=int, default=200)
    r.add_argument("--model", default="mock-440hz")
    r.add_argument("--ramp-secs", type=float, default=3.0)
    r.add_argument("--pause-min", type=float, default=0.2)
    r.add_argument("--pause-max", type=float, default=1.5)
    r.add_argument("--open-timeout", type=float, default=20.0)
    r.add_argument("--stop-file", required=True)
    r.add_argument("--status", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--stop-grace", type=float, default=30.0)
    r.add_argument("--max-secs", type=float, default=0)
    r.add_argument("--seed", type=int, default=1)
    p = sub.add_parser("report")
    p.add_argument("--raw", required=True)
    p.add_argument("--phases", required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--killed-worker-addr", default=None)
    p.add_argument("--orch-log", action="append")
    p.add_argument("--admin-choice", default="")
    args = ap.parse_args()
    if args.cmd == "run":
        return asyncio.run(run(args))
    return report(args)


if __name__ == "__main__":
    sys.exit(main())
