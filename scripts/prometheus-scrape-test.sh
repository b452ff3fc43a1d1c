#!/usr/bin/env bash
# End-to-end check of the Grafana dashboard against a real Prometheus scraping a real gateway:
#
#   1. starts `duplex demo --model mock-440hz` on a free loopback port;
#   2. finds /metrics: on the admin port (PORT+1, --admin-listen's default) if it answers there,
#      else on PORT (binaries from before the separate admin listener);
#   3. starts Debian's `prometheus` scraping that target every second (temp config and TSDB);
#   4. once the target is up, drives traffic over WebSocket (utterances, a PAUSE/RESUME, a STOP
#      mid-utterance so the barge-in histogram has data) and keeps one session open;
#   5. waits until Prometheus has scraped the final counter values plus one more scrape;
#   6. evaluates every dashboard query (panels and template variables) through /api/v1/query,
#      Grafana variables replaced ($__rate_interval -> 1m, $job, $instance -> .*), and prints
#      query -> OK / EMPTY / NAN. Exit status 1 if any query is EMPTY or NaN.
#
# Every wait polls with an overall deadline (SCRAPE_TEST_DEADLINE_SECS, default 300); nothing
# synchronises on a fixed sleep. All processes started here are stopped on exit.
#
# Environment: DUPLEX_BIN (default target/release/duplex), DEPLOY_VENV (python venv with
# `websockets`; created if missing, default target/deploy-venv), PROMETHEUS_BIN (prometheus),
# DASHBOARD (deploy/grafana/duplex-dashboard.json), DEPLOY_CHECK_DIR (target/deploy-check:
# metrics.txt, the scraped exposition, is left there for scripts/check-deploy.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${DUPLEX_BIN:-target/release/duplex}
VENV=${DEPLOY_VENV:-target/deploy-venv}
PROMETHEUS=${PROMETHEUS_BIN:-prometheus}
DASHBOARD=${DASHBOARD:-deploy/grafana/duplex-dashboard.json}
OUT_DIR=${DEPLOY_CHECK_DIR:-target/deploy-check}
DEADLINE_SECS=${SCRAPE_TEST_DEADLINE_SECS:-300}
JOB=duplex-orchestrator

log() { printf '[scrape-test] %s\n' "$*" >&2; }

[[ -x $BIN ]] || { log "no gateway binary at $BIN (set DUPLEX_BIN or cargo build --release)"; exit 2; }
command -v "$PROMETHEUS" >/dev/null || { log "no $PROMETHEUS (apt-get install -y prometheus)"; exit 2; }
if ! "$VENV/bin/python" -c 'import websockets' 2>/dev/null; then
    log "creating $VENV with websockets"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet websockets
fi
PY="$VENV/bin/python"
mkdir -p "$OUT_DIR"

tmp=$(mktemp -d /tmp/duplex-scrape-test.XXXXXX)
pids=()
cleanup() {
    local rc=$? p
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do
        # Bounded wait per process, then SIGKILL.
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    if [[ $rc -ne 0 ]]; then
        log "failed (exit $rc); last lines of the logs:"
        for f in "$tmp"/*.log; do [[ -f $f ]] && { echo "--- $f" >&2; tail -n 20 "$f" >&2; }; done
    fi
    rm -rf "$tmp"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

export DEADLINE=$(( $(date +%s) + DEADLINE_SECS ))

cat >"$tmp/helper.py" <<'PYEOF'
"""Helpers of prometheus-scrape-test.sh: ports, polling, traffic, query evaluation."""
import asyncio, json, math, os, re, socket, sys, time, urllib.error, urllib.parse, urllib.request

DEADLINE = float(os.environ["DEADLINE"])
JOB = "duplex-orchestrator"


def left():
    return DEADLINE - time.time()


def fail(msg):
    print(f"[scrape-test] {msg}", file=sys.stderr)
    sys.exit(1)


def get(url, timeout=5):
    """(status, body) of a GET; (0, error) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (OSError, ValueError) as e:
        return 0, str(e)


def poll(what, fn, interval=0.2):
    """Calls fn() until it returns something truthy; fails at the deadline."""
    while True:
        v = fn()
        if v:
            return v
        if left() <= 0:
            fail(f"deadline reached waiting for {what}")
        time.sleep(interval)


def free_ports():
    """A port P with P+1 also free (the admin port), and one more port for Prometheus."""
    def free(p):
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", p))
            return True
        except OSError:
            return False
        finally:
            s.close()
    for _ in range(200):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        p = s.getsockname()[1]
        s.close()
        if p < 65000 and free(p + 1):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            q = s.getsockname()[1]
            s.close()
            if q not in (p, p + 1):
                return p, q
    fail("no free port pair")


def metrics_url(port, pid):
    """Waits until the gateway answers, then picks where /metrics is served."""
    admin = f"http://127.0.0.1:{port + 1}/metrics"
    public = f"http://127.0.0.1:{port}/metrics"

    def probe():
        if not os.path.exists(f"/proc/{pid}"):
            fail("the gateway exited during start-up")
        if get(f"http://127.0.0.1:{port}/health", 2)[0] == 0:
            return None  # not listening yet
        # Admin endpoints on PORT+1 (--admin-listen default) if that port answers.
        st, body = get(admin, 2)
        if st == 200 and "# TYPE" in body:
            return admin
        st, body = get(public, 2)
        if st == 200 and "# TYPE" in body:
            return public
        return None
    return poll("the gateway's /metrics", probe)


def query(prom, expr):
    st, body = get(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr}), 10)
    if st != 200:
        return {"status": "error", "error": f"HTTP {st}: {body[:300]}"}
    return json.loads(body)


def scalar(result):
    """The single value of an instant vector, or None."""
    if result.get("status") != "success" or not result["data"]["result"]:
        return None
    return float(result["data"]["result"][0]["value"][1])


def wait_target_up(prom):
    poll("Prometheus ready", lambda: get(f"{prom}/-/ready", 2)[0] == 200)
    # The target answered a scrape and its counters are stored (the pre-traffic sample).
    poll("the first successful scrape", lambda: scalar(query(prom, f'up{{job="{JOB}"}} == 1')) == 1
         and scalar(query(prom, f'sessions_total{{job="{JOB}"}}')) is not None)


async def traffic(ws_url, hold_file):
    """Utterances with realtime pacing, PAUSE/RESUME, a STOP mid-utterance, a bad message;
    then one idle session held open (sessions_active = 1) until killed."""
    import websockets

    async def recv_json(ws):
        while True:
            m = await asyncio.wait_for(ws.recv(), timeout=max(1.0, min(30.0, left())))
            if isinstance(m, str):
                return json.loads(m)

    async def until_final(ws):
        n = 0
        while True:
            m = await recv_json(ws)
            if m.get("type") == "audio" and m.get("is_final"):
                return n
            if m.get("type") == "audio":
                n += 1
            if m.get("type") == "error":
                fail(f"server error: {m}")

    frames = 0
    async with websockets.connect(ws_url + "?model=mock-440hz") as ws:
        assert (await recv_json(ws))["type"] == "session_start"
        for text in ("Hello world.", "A second sentence, with a comma.", "Third."):
            await ws.send(json.dumps({"type": "text", "text": text}))
            frames += await until_final(ws)
        # PAUSE and RESUME while audio streams (barge-in latency is observed on PAUSE/STOP).
        await ws.send(json.dumps({"type": "text", "text": "Pause me."}))
        while (await recv_json(ws)).get("type") != "audio":
            pass
        await ws.send(json.dumps({"type": "control", "command": "PAUSE"}))
        await ws.send(json.dumps({"type": "control", "command": "RESUME"}))
        frames += await until_final(ws)
        # STOP mid-utterance.
        await ws.send(json.dumps({"type": "text", "text": "Stop me in the middle."}))
        while (await recv_json(ws)).get("type") != "audio":
            pass
        await ws.send(json.dumps({"type": "control", "command": "STOP"}))
        await until_final(ws)
        # A bad message (client_errors_total).
        await ws.send("{not json")
        m = await recv_json(ws)
        if m.get("type") != "error":
            fail(f"expected an error for a bad message, got {m}")
    if frames == 0:
        fail("no audio frames received")
    print(f"[scrape-test] traffic done: {frames} frames in complete utterances", file=sys.stderr)
    async with websockets.connect(ws_url) as ws:
        await recv_json(ws)
        open(hold_file, "w").write("held\n")
        await asyncio.sleep(max(1.0, left()))


def wait_scraped(prom, metrics):
    """Waits until Prometheus holds the final frames_sent_total and has scraped once more."""
    def final():
        st, body = get(metrics, 5)
        m = re.search(r"^frames_sent_total (\S+)$", body, re.M)
        return float(m.group(1)) if st == 200 and m else None
    want = poll("frames_sent_total on /metrics", final)

    def stored():
        r = query(prom, f'frames_sent_total{{job="{JOB}"}}')
        if scalar(r) == want:
            return float(r["data"]["result"][0]["value"][0]) or None
        return None
    t0 = poll(f"Prometheus to store frames_sent_total = {want:g}", stored)

    def later():
        r = query(prom, f'timestamp(sessions_total{{job="{JOB}"}})')
        v = scalar(r)
        return v is not None and v > t0
    poll("one more scrape", later)
    # The held session is visible too.
    poll("sessions_active >= 1", lambda: (scalar(query(prom, f'sessions_active{{job="{JOB}"}}')) or 0) >= 1)


def dashboard_queries(path):
    d = json.load(open(path))
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((p.get("title", "?"), t["expr"]))
            walk(p.get("panels", []))
    walk(d.get("panels", []))
    for v in d.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v.get("query")
            q = q.get("query") if isinstance(q, dict) else q
            m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", q or "")
            if m:  # Grafana's label_values(selector, label): the selector must have series.
                out.append((f"variable ${v['name']}", m.group(1)))
            elif q:
                out.append((f"variable ${v['name']}", q))
    return out


def substitute(expr):
    for k, v in (("$__rate_interval", "1m"), ("$__interval", "15s"), ("$__range", "5m"),
                 ("${job}", JOB), ("$job", JOB), ("${instance}", ".*"), ("$instance", ".*")):
        expr = expr.replace(k, v)
    if "$" in expr:
        fail(f"unknown Grafana variable left in: {expr}")
    return expr


def evaluate(prom, path):
    rows, bad = [], 0
    for title, expr in dashboard_queries(path):
        e = substitute(expr)
        r = query(prom, e)
        if r.get("status") != "success":
            status, detail = "ERROR", r.get("error", "?")
        elif not r["data"]["result"]:
            status, detail = "EMPTY", ""
        else:
            vals = [float(s["value"][1]) for s in r["data"]["result"]]
            status = "NAN" if all(math.isnan(v) for v in vals) else "OK"
            detail = ", ".join(f"{v:.6g}" for v in vals[:4]) + (" ..." if len(vals) > 4 else "")
        bad += status != "OK"
        rows.append((status, title, e, detail))
    w = max(len(t) for _, t, _, _ in rows)
    print(f"{'result':6}  {'panel':{w}}  value(s)  |  query")
    for status, title, e, detail in rows:
        print(f"{status:6}  {title:{w}}  {detail}  |  {e}")
    print(f"{len(rows) - bad} of {len(rows)} dashboard queries returned data")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "ports":
        print(*free_ports())
    elif cmd == "metrics-url":
        print(metrics_url(int(args[0]), int(args[1])))
    elif cmd == "wait-target":
        wait_target_up(args[0])
    elif cmd == "traffic":
        asyncio.run(traffic(args[0], args[1]))
    elif cmd == "wait-file":
        def ready():
            if os.path.exists(args[0]):
                return True
            if not os.path.exists(f"/proc/{args[1]}"):
                fail("the traffic driver exited early")
            return False
        poll(f"{args[0]}", ready)
    elif cmd == "save-metrics":
        st, body = get(args[0], 10)
        if st != 200:
            fail(f"GET {args[0]}: {st} {body[:200]}")
        open(args[1], "w").write(body)
    elif cmd == "wait-scraped":
        wait_scraped(args[0], args[1])
    elif cmd == "evaluate":
        evaluate(args[0], args[1])
    else:
        fail(f"unknown helper command {cmd}")
PYEOF
helper() { "$PY" "$tmp/helper.py" "$@"; }

read -r PORT PROM_PORT < <(helper ports)
log "gateway: $BIN demo on 127.0.0.1:$PORT; prometheus on 127.0.0.1:$PROM_PORT"
"$BIN" demo --model mock-440hz --listen "127.0.0.1:$PORT" >"$tmp/gateway.log" 2>&1 &
pids+=($!)
METRICS=$(helper metrics-url "$PORT" "${pids[0]}")
log "metrics at $METRICS"

TARGET=${METRICS#http://}
TARGET=${TARGET%%/*}
cat >"$tmp/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: $JOB
    metrics_path: /metrics
    static_configs:
      - targets: ["$TARGET"]
EOF
"$PROMETHEUS" --config.file="$tmp/prometheus.yml" --storage.tsdb.path="$tmp/tsdb" \
    --web.listen-address="127.0.0.1:$PROM_PORT" --log.level=warn >"$tmp/prometheus.log" 2>&1 &
pids+=($!)
PROM="http://127.0.0.1:$PROM_PORT"
helper wait-target "$PROM"
log "target up and scraped; driving traffic"

# Traffic, then one session held open (the helper sleeps until the deadline or cleanup).
# Started directly, not through the helper function: $! must be python's own PID for cleanup.
"$PY" "$tmp/helper.py" traffic "ws://127.0.0.1:$PORT/" "$tmp/held" 2>"$tmp/traffic.log" &
pids+=($!)
if ! helper wait-file "$tmp/held" "${pids[2]}"; then cat "$tmp/traffic.log" >&2; exit 1; fi
cat "$tmp/traffic.log" >&2
helper wait-scraped "$PROM" "$METRICS"
helper save-metrics "$METRICS" "$OUT_DIR/metrics.txt"
log "scraped exposition saved to $OUT_DIR/metrics.txt; evaluating the dashboard's queries"
helper evaluate "$PROM" "$DASHBOARD"
