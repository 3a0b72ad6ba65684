#!/usr/bin/env bash
# Multi-node rehearsal on ONE machine: two network namespaces joined by a veth pair stand in for two nodes,
# and torchrun meets across them through a c10d rendezvous, as it would on a cluster (launch/slurm_multinode.sbatch).
# Each "node" has its own loopback and one veth end, so every byte between the ranks crosses the veth: the
# multi-node path (non-loopback MASTER_ADDR, gloo over a real interface, a remote rendezvous store) is exercised
# without a second machine. Checks, each printed as PASS/FAIL:
#   1. LP 2 x 1 (one rank per node, kv-sync recompute): rank 0 prints one record, greedy_match true, ranks == 2
#   2. LP 2 x 2 (two ranks per node, kv-sync gather):   the same with ranks == 4, and the same tokens as run 1
#   3. a rank on the far node killed with kill -9 mid-job: the surviving rank prints `lp: error:` naming it
#      within --fault-timeout + a margin, and both nodes' torchrun exit non-zero (nothing hangs)
# Usage (root: `ip netns` needs CAP_SYS_ADMIN; needs iproute2 and the veth kernel module):
#   sudo launch/multinode_rehearsal.sh
#   PYTHON=.venv/bin/python FAULT_TIMEOUT=20 KEEP_LOGS=1 launch/multinode_rehearsal.sh
# Exit status: 0 every check passed, 1 a check failed, 77 cannot run here (not root, no `ip`, no netns/veth).
# Safety: the addresses (10.231.X.1/30 and .2/30) exist only inside the two namespaces this script creates, which
# have no other interface and no default route, so nothing can reach or leave for any other network. The
# namespaces, the veth pair and every process inside them are removed on exit, also after a failure or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
FAULT_TIMEOUT=${FAULT_TIMEOUT:-20}   # lp's --fault-timeout: how long a rank waits on a silent peer
FAULT_MARGIN=${FAULT_MARGIN:-40}     # the dead rank must be named within FAULT_TIMEOUT + FAULT_MARGIN seconds
RUN_TIMEOUT=${RUN_TIMEOUT:-150}      # hard limit on each torchrun (a hang is a failure, not a stuck script)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # up to 4 ranks share this machine's cores
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
SKIP=77

say() { printf 'rehearsal: %s\n' "$*"; }
skip() { say "SKIP: $*"; exit "$SKIP"; }
PASSED=0
FAILED=0
check() {  # check NAME COMMAND...: run a check, print PASS/FAIL, count it (a failure does not stop the others)
    local name=$1
    shift
    if "$@"; then
        say "PASS: $name"
        PASSED=$((PASSED + 1))
    else
        say "FAIL: $name"
        FAILED=$((FAILED + 1))
    fi
}

# -- preconditions: say why this machine cannot rehearse, rather than fail half-way ------------------------------
[ "$(id -u)" = 0 ] || skip "not root: 'ip netns add' needs CAP_SYS_ADMIN (run with sudo)"
command -v ip >/dev/null || skip "no 'ip' command (Debian/Ubuntu: apt-get install -y iproute2)"
command -v timeout >/dev/null || skip "no 'timeout' command (coreutils)"
[ -n "$PYTHON" ] || skip "no python3 on PATH (set PYTHON)"

# -- names: unique per run; the owner pid in the name lets a later run clean up after a SIGKILLed one -------------
TAG="$$x$(printf '%04x' $((RANDOM % 65536)))"
NS0="lp-node0-$TAG"
NS1="lp-node1-$TAG"
IF0="lpv0-${TAG#*x}"   # interface names: at most 15 characters
IF1="lpv1-${TAG#*x}"
NET="10.231.$((RANDOM % 256))"   # a /30 that exists only inside NS0 and NS1
ADDR0="$NET.1"
ADDR1="$NET.2"
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/lp-multinode.XXXXXX")
CREATED=()

kill_namespace_procs() {  # every process inside one of this script's namespaces was started by this script
    local ns=$1 pids
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    [ -z "$pids" ] && return 0
    kill -TERM $pids 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        [ -z "$pids" ] && return 0
        sleep 0.5
    done
    kill -KILL $pids 2>/dev/null || true
}

delete_namespace() {  # a namespace lives on while a process is inside it: empty it first; the veth goes with it
    kill_namespace_procs "$1"
    ip netns del "$1" 2>/dev/null || true
}

cleanup() {
    local status=$?
    set +e
    for ns in "${CREATED[@]}"; do
        delete_namespace "$ns"
    done
    if [ "$FAILED" -gt 0 ] || [ "${KEEP_LOGS:-0}" = 1 ] || { [ "$status" -ne 0 ] && [ "$status" -ne "$SKIP" ]; }; then
        say "logs kept in $LOGS"
    else
        rm -rf "$LOGS"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM   # run the EXIT trap on Ctrl-C and kill too

# Namespaces left by a run that was SIGKILLed (its trap never ran): ours by name, and their owner is gone.
for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^lp-node[01]-[0-9]+x[0-9a-f]+$' || true); do
    owner=${ns#lp-node?-}
    owner=${owner%%x*}
    if ! kill -0 "$owner" 2>/dev/null; then
        say "removing namespace $ns left by an earlier run (pid $owner is gone)"
        delete_namespace "$ns"
    fi
done

# -- the two "nodes" -----------------------------------------------------------------------------------------------
say "creating namespaces $NS0 ($ADDR0 on $IF0) and $NS1 ($ADDR1 on $IF1), joined by a veth pair"
if ! err=$(ip netns add "$NS0" 2>&1); then
    skip "cannot create a network namespace: $err"
fi
CREATED+=("$NS0")
ip netns add "$NS1"
CREATED+=("$NS1")
if ! err=$(ip link add "$IF0" netns "$NS0" type veth peer name "$IF1" netns "$NS1" 2>&1); then
    skip "cannot create a veth pair: $err"
fi
ip -n "$NS0" addr add "$ADDR0/30" dev "$IF0"
ip -n "$NS1" addr add "$ADDR1/30" dev "$IF1"
for ns in "$NS0" "$NS1"; do
    ip -n "$ns" link set lo up   # torchrun's agent and its workers also talk over each node's own loopback
done
ip -n "$NS0" link set "$IF0" up
ip -n "$NS1" link set "$IF1" up

only_the_veth_route() {  # the proof that nothing leaves: each namespace routes only its /30, and has no default
    local ns=$1 routes
    routes=$(ip -n "$ns" -4 route show)
    say "  routes in $ns: ${routes//$'\n'/; }"
    [ "$(printf '%s\n' "$routes" | grep -c .)" = 1 ] && printf '%s' "$routes" | grep -q "^$NET.0/30 "
}
check "node 0 routes only $NET.0/30 (no default route)" only_the_veth_route "$NS0"
check "node 1 routes only $NET.0/30 (no default route)" only_the_veth_route "$NS1"

reach() {  # node 1 opens a TCP connection to a listener on node 0's veth address
    timeout 20 ip netns exec "$NS0" "$PYTHON" -c '
import socket, sys
s = socket.socket(); s.bind((sys.argv[1], 29399)); s.listen(1); s.settimeout(15); s.accept()[0].close()' "$ADDR0" &
    local listener=$!
    local ok=1
    for _ in $(seq 40); do
        if timeout 5 ip netns exec "$NS1" "$PYTHON" -c '
import socket, sys
socket.create_connection((sys.argv[1], 29399), timeout=2).close()' "$ADDR0" 2>/dev/null; then
            ok=0
            break
        fi
        sleep 0.25
    done
    wait "$listener" 2>/dev/null || ok=1
    return $ok
}
check "node 1 reaches node 0 at $ADDR0 over the veth" reach

# -- one torchrun per node, meeting at node 0's c10d store ---------------------------------------------------------
# --local_addr: the address this node is known by (the hostname is the same in both namespaces and resolves to
#   neither veth address). is_host: which node hosts the rendezvous store; torchrun's guess compares the endpoint
#   with the hostname's addresses, which inside a namespace fails, and then both nodes wait as clients.
# GLOO_SOCKET_IFNAME: gloo otherwise binds the address the hostname resolves to (loopback here), which the other
#   node cannot reach. lp pins gloo to loopback only for single-node runs; across nodes it is the user's choice.
start_node() {  # start_node NODE(0|1) NPROC RDZV_PORT JOB RUN.PY-ARGS... (in the background; pid in NODE_PID)
    local node=$1 nproc=$2 port=$3 job=$4
    shift 4
    local ns=$NS0 ifname=$IF0 addr=$ADDR0 host=1
    if [ "$node" = 1 ]; then ns=$NS1 ifname=$IF1 addr=$ADDR1 host=0; fi
    ip netns exec "$ns" env GLOO_SOCKET_IFNAME="$ifname" \
        timeout -k 10 "$RUN_TIMEOUT" "$PYTHON" -m torch.distributed.run \
        --nnodes 2 --nproc_per_node "$nproc" --max_restarts 0 \
        --rdzv_backend c10d --rdzv_endpoint "$ADDR0:$port" --rdzv_id "lp-$TAG-$job" \
        --rdzv_conf "is_host=$host,join_timeout=60" --local_addr "$addr" \
        launch/run.py "$@" >"$LOGS/$job.node$node.out" 2>"$LOGS/$job.node$node.err" &
    NODE_PID=$!
}

run_job() {  # run_job JOB NPROC RDZV_PORT RUN.PY-ARGS...: both nodes, wait for both; statuses in RC0 RC1
    local job=$1 nproc=$2 port=$3
    shift 3
    say "$job: torchrun --nnodes 2 --nproc_per_node $nproc on each node: launch/run.py $*"
    local start=$EPOCHREALTIME
    start_node 1 "$nproc" "$port" "$job" "$@"
    local pid1=$NODE_PID
    start_node 0 "$nproc" "$port" "$job" "$@"
    local pid0=$NODE_PID
    RC0=0
    RC1=0
    wait "$pid0" || RC0=$?
    wait "$pid1" || RC1=$?
    say "  $job: node 0 exit $RC0, node 1 exit $RC1, $(elapsed "$start") s"
}

elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }

show_failure() {  # the tail of a job's logs, minus C++ stack frames, when a check on it failed
    local job=$1
    for f in "$LOGS/$job".node*; do
        say "  --- $f"
        grep -v -e '^frame #' -e '^  File ' "$f" | tail -n 15 | sed 's/^/    /'
    done
}

record_ok() {  # record_ok JOB RANKS: both nodes ok, one record (on node 0's stdout only), equal to greedy
    local job=$1 ranks=$2
    [ "$RC0" = 0 ] && [ "$RC1" = 0 ] || { say "  torchrun failed"; show_failure "$job"; return 1; }
    [ ! -s "$LOGS/$job.node1.out" ] || { say "  node 1 printed results: rank 0 is not on node 0"; return 1; }
    "$PYTHON" - "$LOGS/$job.node0.out" "$ranks" <<'EOF'
import json, sys
lines = [l for l in open(sys.argv[1]).read().splitlines() if l.strip()]
records = [json.loads(l) for l in lines]
want = int(sys.argv[2])
if len(records) != 1:
    sys.exit(f"rehearsal:   expected one JSON record, got {len(records)}")
r = records[0]
print(f"rehearsal:   record: ranks={r['ranks']} greedy_match={r.get('greedy_match')} new_tokens={r['new_tokens']} "
      f"steps={r['steps']} tokens_per_step={r['tokens_per_step']} text={r['text']!r}")
sys.exit(0 if r.get("greedy_match") is True and r["ranks"] == want and r["new_tokens"] > 0 else 1)
EOF
}

same_tokens() {  # the 2 x 2 gather run decoded exactly the tokens of the 2 x 1 recompute run
    "$PYTHON" -c '
import json, sys
a, b = (json.loads(open(p).readline())["token_ids"] for p in sys.argv[1:])
sys.exit(0 if a == b else 1)' "$LOGS/lp2x1.node0.out" "$LOGS/lp2x2.node0.out"
}

crossed_veth() {  # crossed_veth BYTES_BEFORE: the job moved data over the veth
    local after
    after=$(ip netns exec "$NS0" cat "/sys/class/net/$IF0/statistics/tx_bytes")
    say "  node 0 sent $((after - $1)) bytes over $IF0"
    [ $((after - $1)) -gt 0 ]
}

JOB_ARGS=(--prompt "def fib(n):" --max-new-tokens 24 --compare-greedy --json --fault-timeout "$FAULT_TIMEOUT")

before=$(ip netns exec "$NS0" cat "/sys/class/net/$IF0/statistics/tx_bytes")
run_job lp2x1 1 29400 "${JOB_ARGS[@]}"
check "LP 2 x 1 across the two nodes: output equal to greedy, ranks == 2" record_ok lp2x1 2
check "LP 2 x 1 traffic crossed the veth" crossed_veth "$before"

before=$(ip netns exec "$NS0" cat "/sys/class/net/$IF0/statistics/tx_bytes")
run_job lp2x2 2 29401 "${JOB_ARGS[@]}" --kv-sync gather
check "LP 2 x 2 (kv-sync gather) across the two nodes: output equal to greedy, ranks == 4" record_ok lp2x2 4
check "LP 2 x 2 traffic crossed the veth" crossed_veth "$before"
check "LP 2 x 2 decoded the same tokens as LP 2 x 1" same_tokens

# -- a rank on the far node dies mid-job ---------------------------------------------------------------------------
# A long job (several prompts, each running to the model's context length); once rank 0 has printed the first
# result, the worker in node 1's namespace is killed with SIGKILL: no goodbye, its socket just closes.
FAULT_JOB=fault
FAULT_PROMPTS=()
FAULT_COUNT=0
for p in "def fib(n):" "class Stack:" "def parse(text):" "import os" "def main():" "def merge(a, b):"; do
    FAULT_PROMPTS+=(--prompt "$p")
    FAULT_COUNT=$((FAULT_COUNT + 1))
done
say "$FAULT_JOB: 2 x 1, $FAULT_COUNT prompts of up to 2000 new tokens; kill -9 node 1's rank after the first result"
fault_start=$EPOCHREALTIME
start_node 1 1 29402 "$FAULT_JOB" "${FAULT_PROMPTS[@]}" --max-new-tokens 2000 --json --fault-timeout "$FAULT_TIMEOUT"
fault_pid1=$NODE_PID
start_node 0 1 29402 "$FAULT_JOB" "${FAULT_PROMPTS[@]}" --max-new-tokens 2000 --json --fault-timeout "$FAULT_TIMEOUT"
fault_pid0=$NODE_PID

first_result() { [ -s "$LOGS/$FAULT_JOB.node0.out" ] && grep -q '"id"' "$LOGS/$FAULT_JOB.node0.out"; }
for _ in $(seq $((RUN_TIMEOUT * 4))); do
    first_result && break
    kill -0 "$fault_pid0" 2>/dev/null || break
    sleep 0.25
done

worker_in() {  # worker_in NS: pid and RANK of the lp worker (not torchrun's agent) inside a namespace
    local pid
    for pid in $(ip netns pids "$1"); do
        tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -q '^launch/run.py$' || continue
        tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'torch.distributed.run' && continue
        local rank
        rank=$(tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | sed -n 's/^RANK=//p')
        [ -n "$rank" ] && { echo "$pid $rank"; return 0; }
    done
    return 1
}

KILLED_RANK=
if first_result && read -r victim KILLED_RANK < <(worker_in "$NS1"); then
    say "  first result after $(elapsed "$fault_start") s; kill -9 pid $victim (RANK=$KILLED_RANK) in $NS1"
    kill -KILL "$victim"
    kill_time=$EPOCHREALTIME
    named_after=
    deadline=$((FAULT_TIMEOUT + FAULT_MARGIN))
    while awk -v a="$kill_time" -v b="$EPOCHREALTIME" -v d="$deadline" 'BEGIN { exit !(b - a < d) }'; do
        if grep -q '^lp: error:' "$LOGS/$FAULT_JOB.node0.err"; then
            named_after=$(elapsed "$kill_time")
            break
        fi
        sleep 0.2
    done
    RC0=0
    RC1=0
    wait "$fault_pid0" || RC0=$?
    wait "$fault_pid1" || RC1=$?
    exited_after=$(elapsed "$kill_time")
    error_line=$(grep -m1 '^lp: error:' "$LOGS/$FAULT_JOB.node0.err" || true)
    say "  node 0: '${error_line:-no lp: error: line}' after ${named_after:-more than $deadline} s"
    say "  node 0 exit $RC0, node 1 exit $RC1, both gone ${exited_after} s after the kill"
    named() { [ -n "$named_after" ] && [[ "$error_line" == *"rank $KILLED_RANK "* ]]; }
    check "the surviving rank names the killed rank $KILLED_RANK within ${deadline} s (fault timeout $FAULT_TIMEOUT s + $FAULT_MARGIN s)" named
    both_failed() { [ "$RC0" != 0 ] && [ "$RC0" != 124 ] && [ "$RC0" != 137 ] && [ "$RC1" != 0 ] && [ "$RC1" != 124 ] && [ "$RC1" != 137 ]; }
    check "both nodes' torchrun exit non-zero by themselves (no timeout needed)" both_failed
    mid_job() { [ "$(grep -c '"id"' "$LOGS/$FAULT_JOB.node0.out")" -lt "$FAULT_COUNT" ]; }
    check "the kill landed mid-job (not every prompt finished)" mid_job
    [ "$FAILED" = 0 ] || show_failure "$FAULT_JOB"
else
    say "  no result from node 0 within $RUN_TIMEOUT s, or no worker found in $NS1"
    show_failure "$FAULT_JOB"
    check "the far node's rank could be killed mid-job" false
fi

if [ "$FAILED" -eq 0 ]; then
    say "all $PASSED checks passed"
    exit 0
fi
say "$FAILED of $((PASSED + FAILED)) checks FAILED"
exit 1
