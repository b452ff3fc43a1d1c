#!/usr/bin/env bash
# Load-balancer test (`just lb-test`): real processes on loopback.
#
#   redis-server ── 3 × `duplex worker` (mock voice, --mock-frame-interval-ms 20, registered in Redis)
#        │
#   2 × `duplex serve --cores 1 --redis …` ◀── haproxy (config generated from deploy/haproxy.cfg)
#                                                  ◀── scripts/lb_load.py: ~200 sessions speaking
#
# While the load runs: each orchestrator is restarted in turn (replacement started with
# --takeover on the same WebSocket port, then SIGTERM to the old one, which drains and exits),
# then one worker is killed with SIGKILL, the load runs ~20 s more and stops. The report
# (table on stdout, JSON in target/lb-test.json) counts sessions and utterances, failures by
# reason, and first-audio latency overall and during the restarts; the exit status is non-zero
# if anything failed other than utterances in flight on the killed worker.
#
# Admin port during a takeover: the admin listener is a plain bind (no SO_REUSEPORT), and the
# old process keeps it while it drains (its /readiness answers 503 there). So the replacement
# gets a *different* admin port: each orchestrator has two admin ports, A and B, used in turn
# by successive generations, and the generated haproxy config has two server lines per
# orchestrator with the same WebSocket address, one checking each admin port. While the old
# process drains, its line is DOWN (503, then refused) and the replacement's line is UP; both
# send to the same port, where only the replacement still accepts.
#
# Environment: DUPLEX_BIN (default target/release/duplex), LB_SESSIONS (200),
# LB_AFTER_KILL_SECS (20), LB_DRAIN_SECS (30), LB_KEEP=1 keeps target/lb-test/ logs (always kept).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
BIN=${DUPLEX_BIN:-$ROOT/target/release/duplex}
SESSIONS=${LB_SESSIONS:-200}
AFTER_KILL_SECS=${LB_AFTER_KILL_SECS:-20}
DRAIN_SECS=${LB_DRAIN_SECS:-30}
WORK=$ROOT/target/lb-test
VENV=$ROOT/target/lb-venv
JSON_OUT=$ROOT/target/lb-test.json
T_BEGIN=$(date +%s.%N)

exec 3>&2 # log lines reach the terminal also from inside redirected pollers
log() { printf '[lb-test %6.1fs] %s\n' "$(echo "$(date +%s.%N) - $T_BEGIN" | bc)" "$*" >&3; }
die() { log "FAIL: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------
# Prerequisites
# ---------------------------------------------------------------------------------------------
need_apt=()
command -v haproxy >/dev/null || need_apt+=(haproxy)
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v redis-cli >/dev/null || need_apt+=(redis-tools)
command -v curl >/dev/null || need_apt+=(curl)
command -v bc >/dev/null || need_apt+=(bc)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
if ((${#need_apt[@]})); then
    [[ $(id -u) == 0 ]] || die "missing ${need_apt[*]}: install them (apt-get install -y ${need_apt[*]}) or run as root"
    log "installing ${need_apt[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need_apt[@]}" >/dev/null \
        || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need_apt[@]}" >/dev/null; }
    # Debian starts the packaged services; this test runs its own instances.
    for s in haproxy redis-server; do systemctl stop "$s" 2>/dev/null || service "$s" stop 2>/dev/null || true; done
fi
[[ -x $BIN ]] || die "$BIN not found: cargo build --release first"
if [[ ! -x $VENV/bin/python ]] || ! "$VENV/bin/python" -c 'import duplex_client' 2>/dev/null; then
    log "creating $VENV with clients/python"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q ./clients/python
fi
PY=$VENV/bin/python

rm -rf "$WORK" "$JSON_OUT"
mkdir -p "$WORK"
PHASES=$WORK/phases.jsonl
: >"$PHASES"
mark() { printf '{"event":"%s","t":%s}\n' "$1" "$(date +%s.%N)" >>"$PHASES"; log "mark $1"; }

# ---------------------------------------------------------------------------------------------
# Processes and cleanup
# ---------------------------------------------------------------------------------------------
declare -A PIDS=() # name -> pid of every process this script started
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local name pid
    for name in "${!PIDS[@]}"; do
        pid=${PIDS[$name]}
        kill -0 "$pid" 2>/dev/null && kill -TERM "$pid" 2>/dev/null || true
    done
    # Orchestrators drain (sessions are gone by now, so that is quick); give everyone a deadline.
    local deadline=$((SECONDS + 40))
    for name in "${!PIDS[@]}"; do
        pid=${PIDS[$name]}
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            log "cleanup: $name ($pid) still running after SIGTERM, SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
    log "done in $(echo "$(date +%s.%N) - $T_BEGIN" | bc | cut -d. -f1) s (exit $rc; logs in $WORK)"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start() { # start NAME CMD... (stdout+stderr to $WORK/NAME.log)
    local name=$1
    shift
    "$@" >"$WORK/$name.log" 2>&1 &
    PIDS[$name]=$!
}

alive() { kill -0 "${PIDS[$1]}" 2>/dev/null; }
check_alive() {
    local n
    for n in "$@"; do alive "$n" || die "$n exited unexpectedly (log: $WORK/$n.log)"; done
}

# wait_until DESCRIPTION DEADLINE_SECS COMMAND...: polls COMMAND every 0.2 s.
wait_until() {
    local what=$1 secs=$2
    shift 2
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "timed out after ${secs}s waiting for: $what"
        sleep 0.2
    done
}

free_ports() { # free_ports N: N distinct free TCP ports on 127.0.0.1
    python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

http_code() { curl -s -o /dev/null -m 2 -w '%{http_code}' "$1" || true; }
ready() { [[ $(http_code "http://127.0.0.1:$1/readiness") == 200 ]]; }
draining_503() { [[ $(http_code "http://127.0.0.1:$1/readiness") == 503 ]]; }

read -r P_REDIS P_W1 P_W2 P_W3 P_O1 P_O2 A_O1 A_O2 B_O1 B_O2 P_LB < <(free_ports 11)
HASOCK=$WORK/haproxy.sock
REDIS_URL=redis://127.0.0.1:$P_REDIS

# ---------------------------------------------------------------------------------------------
# Redis, workers
# ---------------------------------------------------------------------------------------------
start redis redis-server --port "$P_REDIS" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$WORK" --notify-keyspace-events KEA
wait_until "redis on $P_REDIS" 30 redis-cli -p "$P_REDIS" ping

worker_port() { case $1 in 1) echo "$P_W1" ;; 2) echo "$P_W2" ;; 3) echo "$P_W3" ;; esac; }
for i in 1 2 3; do
    p=$(worker_port $i)
    start "worker$i" "$BIN" --log-format json worker --listen "127.0.0.1:$p" --name "lbw$i" \
        --redis "$REDIS_URL" --advertise "grpc://127.0.0.1:$p" --mock-frame-interval-ms 20 --no-espeak
done
for i in 1 2 3; do
    wait_until "worker lbw$i registered in redis" 60 bash -c "[[ \$(redis-cli -p $P_REDIS exists worker:lbw$i) == 1 ]]"
done
log "redis :$P_REDIS, workers :$P_W1 :$P_W2 :$P_W3 registered"

# ---------------------------------------------------------------------------------------------
# Orchestrators
# ---------------------------------------------------------------------------------------------
orch_port() { case $1 in 1) echo "$P_O1" ;; 2) echo "$P_O2" ;; esac; }
declare -A ADMIN=([1]=$A_O1 [2]=$A_O2)     # the admin port of the generation running now
declare -A ADMIN_NEXT=([1]=$B_O1 [2]=$B_O2) # the one its replacement takes
declare -A GEN=([1]=0 [2]=0)
start_orch() { # start_orch I ADMIN_PORT [--takeover]; sets ORCH[I] to the process name
    local i=$1 admin=$2
    shift 2
    local name="orch$i.gen${GEN[$i]}"
    ORCH[$i]=$name
    start "$name" "$BIN" --log-format json serve --listen "127.0.0.1:$(orch_port "$i")" \
        --admin-listen "127.0.0.1:$admin" --redis "$REDIS_URL" --cores 1 \
        --max-connections-per-ip 0 --drain-secs "$DRAIN_SECS" "$@"
}
# The orchestrator is ready when /readiness is 200 and it has discovered all three workers
# (else the first sessions would all pile onto the first worker found).
workers_seen() { curl -s -m 2 "http://127.0.0.1:$1/health" | python3 -c '
import json, sys
sys.exit(0 if json.load(sys.stdin)["worker"]["reachable"] >= int(sys.argv[1]) else 1)' "${2:-3}"; }
ORCH=()
for i in 1 2; do
    start_orch $i "${ADMIN[$i]}"
done
for i in 1 2; do
    wait_until "orchestrator $i ready on admin :${ADMIN[$i]}" 60 ready "${ADMIN[$i]}"
    wait_until "orchestrator $i sees 3 workers" 30 workers_seen "${ADMIN[$i]}"
done
log "orchestrators :$P_O1 (admin :$A_O1) :$P_O2 (admin :$A_O2) ready"

# ---------------------------------------------------------------------------------------------
# haproxy: deploy/haproxy.cfg with the two orchestrators, loopback ports, 500 ms checks
# ---------------------------------------------------------------------------------------------
HACFG=$WORK/haproxy.cfg
python3 - "$ROOT/deploy/haproxy.cfg" "$HACFG" "$P_LB" "$HASOCK" "$P_O1:$A_O1:$B_O1" "$P_O2:$A_O2:$B_O2" <<'EOF'
import re, sys
src, dst, lb, sock, *orchs = sys.argv[1:]
out = []
for line in open(src):
    s = line.strip()
    if s.startswith("bind :8080"):
        line = f"    bind 127.0.0.1:{lb}\n"
    elif s.startswith("log stdout"):
        out.append(line)
        line = f"    stats socket {sock} mode 600 level admin\n"
    elif s.startswith("maxconn 100000"):
        line = "    maxconn 4000\n"   # haproxy needs ~2 fds per connection: fits a 20000-fd hard limit
    elif s.startswith("default-server"):
        # Same settings, faster checks: out of rotation within ~1 s of draining.
        line = re.sub(r"\binter \S+", "inter 500ms", line)
        line = re.sub(r"\bfall \S+", "fall 2", line)
        line = re.sub(r"\brise \S+", "rise 1", line)
        line = re.sub(r"\s*check port \d+", " check", line)
    elif s.startswith("server "):
        continue
    out.append(line)
for n, spec in enumerate(orchs, 1):
    port, a, b = spec.split(":")
    # One line per admin port a generation of this orchestrator may use (see lb-test.sh).
    out.append(f"    server orch{n}-a 127.0.0.1:{port} port {a}\n")
    out.append(f"    server orch{n}-b 127.0.0.1:{port} port {b}\n")
open(dst, "w").write("".join(out))
EOF
haproxy -c -q -f "$HACFG" || die "generated $HACFG does not pass haproxy -c"
start haproxy haproxy -db -f "$HACFG"

hastat() { # hastat SERVER -> UP/DOWN/...
    python3 - "$HASOCK" "$1" <<'EOF'
import socket, sys
s = socket.socket(socket.AF_UNIX); s.settimeout(2); s.connect(sys.argv[1])
s.sendall(b"show stat\n"); buf = b""
while True:
    d = s.recv(65536)
    if not d: break
    buf += d
for line in buf.decode().splitlines():
    f = line.split(",")
    if len(f) > 17 and f[0] == "duplex_orchestrators" and f[1] == sys.argv[2]:
        print(f[17].split()[0]); break
EOF
}
ha_is() { [[ $(hastat "$1") == "$2" ]]; }
lb_up() { check_alive haproxy; [[ $(http_code "http://127.0.0.1:$P_LB/health") == 200 ]]; }
wait_until "haproxy listening on :$P_LB" 30 lb_up
for i in 1 2; do
    wait_until "haproxy: orch$i-a UP" 30 ha_is "orch$i-a" UP
    wait_until "haproxy: orch$i-b DOWN (nothing on :${ADMIN_NEXT[$i]} yet)" 30 ha_is "orch$i-b" DOWN
done
log "haproxy :$P_LB in front (config $HACFG)"

# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------
STATUS=$WORK/status.json
STOP=$WORK/stop
RAW=$WORK/raw.jsonl
start load "$PY" scripts/lb_load.py run --url "ws://127.0.0.1:$P_LB/" --sessions "$SESSIONS" \
    --stop-file "$STOP" --status "$STATUS" --out "$RAW"
status() { python3 -c "import json,sys; print(json.load(open('$STATUS')).get('$1', 0))" 2>/dev/null || echo 0; }
load_running() { check_alive load haproxy redis; [[ -f $STATUS ]] && (( $(status "$1") >= $2 )); }
wait_until "$SESSIONS sessions open" 90 load_running sessions_open "$SESSIONS"
ok0=$(status utterances_ok)
wait_until "the load to complete $((SESSIONS * 2)) more utterances" 120 load_running utterances_ok $((ok0 + SESSIONS * 2))
mark load_steady
log "load: $(cat "$STATUS")"

# ---------------------------------------------------------------------------------------------
# Rolling restart of each orchestrator: replacement with --takeover, then SIGTERM the old one
# ---------------------------------------------------------------------------------------------
restart() {
    local i=$1
    local old=${ORCH[$i]} old_admin=${ADMIN[$i]} new_admin=${ADMIN_NEXT[$i]}
    local old_pid=${PIDS[$old]} old_line new_line
    if [[ $old_admin == "$A_O1" || $old_admin == "$A_O2" ]]; then
        old_line=orch$i-a new_line=orch$i-b
    else
        old_line=orch$i-b new_line=orch$i-a
    fi
    mark "restart${i}_begin"
    GEN[$i]=$((GEN[$i] + 1))
    start_orch "$i" "$new_admin" --takeover
    wait_until "replacement orchestrator $i ready on admin :$new_admin" 60 ready "$new_admin"
    wait_until "replacement orchestrator $i sees the workers" 30 workers_seen "$new_admin"
    wait_until "haproxy: $new_line UP" 30 ha_is "$new_line" UP
    check_alive "${ORCH[$i]}" "$old"
    log "SIGTERM ${old} (pid $old_pid)"
    kill -TERM "$old_pid"
    mark "restart${i}_sigterm"
    wait_until "$old /readiness 503 while draining" 10 bash -c "! kill -0 $old_pid 2>/dev/null || [[ \$(curl -s -o /dev/null -m 2 -w '%{http_code}' http://127.0.0.1:$old_admin/readiness) =~ ^(503|000)$ ]]"
    local deadline=$((SECONDS + DRAIN_SECS + 30))
    while kill -0 "$old_pid" 2>/dev/null; do
        ((SECONDS < deadline)) || die "$old did not exit within drain-secs + 30 s"
        sleep 0.2
    done
    local rc=0
    wait "$old_pid" || rc=$?
    unset "PIDS[$old]"
    [[ $rc == 0 ]] || die "$old exited with status $rc after SIGTERM (log: $WORK/$old.log)"
    mark "restart${i}_end"
    wait_until "haproxy: $old_line DOWN" 30 ha_is "$old_line" DOWN
    ADMIN_NEXT[$i]=$old_admin
    ADMIN[$i]=$new_admin
    # Let the sessions the drain closed reconnect before the next step.
    wait_until "sessions back to $SESSIONS after restart $i" 60 load_running sessions_open "$SESSIONS"
    log "restart $i done: $(cat "$STATUS")"
}
restart 1
restart 2

# ---------------------------------------------------------------------------------------------
# SIGKILL one worker, run on
# ---------------------------------------------------------------------------------------------
KILLED=worker3
kill -KILL "${PIDS[$KILLED]}"
mark worker_killed
wait "${PIDS[$KILLED]}" 2>/dev/null || true
unset "PIDS[$KILLED]"
log "killed $KILLED (127.0.0.1:$P_W3); load continues ${AFTER_KILL_SECS}s"
end=$((SECONDS + AFTER_KILL_SECS))
while ((SECONDS < end)); do
    check_alive load haproxy redis worker1 worker2 "${ORCH[1]}" "${ORCH[2]}"
    sleep 0.5
done

mark stop
touch "$STOP"
deadline=$((SECONDS + 60))
while alive load; do
    ((SECONDS < deadline)) || die "load driver did not stop within 60 s"
    sleep 0.2
done
wait "${PIDS[load]}" || die "load driver failed (log: $WORK/load.log)"
unset "PIDS[load]"

# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
orch_logs=()
for f in "$WORK"/orch*.log; do orch_logs+=(--orch-log "$f"); done
rc=0
"$PY" scripts/lb_load.py report --raw "$RAW" --phases "$PHASES" --json "$JSON_OUT" \
    --killed-worker-addr "127.0.0.1:$P_W3" "${orch_logs[@]}" \
    --admin-choice "replacement on a different admin port (A/B per orchestrator, two haproxy server lines per orchestrator)" || rc=$?
exit $rc
