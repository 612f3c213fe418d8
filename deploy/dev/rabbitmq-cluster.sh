#!/usr/bin/env bash
# A private, disposable three-node RabbitMQ cluster on 127.0.0.1, for the fault test that stops
# broker nodes under the service (tests/faults/cluster.rs). It runs beside the single broker of
# the other tests (5672, distribution 25672) and never touches it.
#
# Usage: rabbitmq-cluster.sh COMMAND
#   start              starts the three nodes (those not already running) and joins b and c to a.
#                      Does nothing when all three run in one cluster.
#   stop               stops every node (rabbitmqctl stop, then the PID from its PID file), the
#                      cluster's own epmd, and deletes the nodes' data (the logs are kept).
#   status             says which nodes run; exit 0 when all three do, 3 when not.
#   url                prints the oslo multi-host URL of the cluster,
#                      amqp://guest:guest@127.0.0.1:<a>,guest:guest@127.0.0.1:<b>,…/%2f
#   nodes              prints each node's letter, Erlang node name and AMQP port, one a line.
#   stop-node X        stops node X (a, b or c), keeping its data: it stays a cluster member.
#   start-node X       starts node X again and waits until it runs.
#   node-of NAME       prints the letter of the node holding the client connection whose
#                      client-provided name is NAME (nothing when there is none).
#   leader-of QUEUE    prints the letter of the node leading the quorum queue QUEUE.
#   members-of QUEUE   prints the letters of the nodes holding a replica of the quorum queue
#                      QUEUE, on one line.
#   ctl X ARGS…        runs rabbitmqctl ARGS… against node X (with the cluster's cookie and epmd).
#
# The nodes are concertim-a@localhost, concertim-b@localhost and concertim-c@localhost, run from
# the Debian package's scripts in /usr/lib/rabbitmq/bin as the calling user (no switch to the
# rabbitmq user: everything is in the dev dir). They share an Erlang cookie of their own (in a
# private HOME) and an epmd of their own, so that neither the single broker's cookie nor its
# epmd is used. No plugins are enabled (no management listener), and guest logs in from
# 127.0.0.1 as on any RabbitMQ.
#
# Environment:
#   CONCERTIM_BILLING_DEV_DIR                work dir (default <project>/target/dev); the cluster
#                                            is in <dev dir>/rabbitmq-cluster
#   CONCERTIM_BILLING_CLUSTER_PORT           AMQP port of node a (default 5701; b and c take the
#                                            next two); node X's distribution port is 20000 above
#   CONCERTIM_BILLING_CLUSTER_EPMD_PORT      the cluster's epmd port (default 4371)
#   CONCERTIM_BILLING_CLUSTER_START_TIMEOUT  seconds to wait for a node to start (default 120)
set -euo pipefail

PROJECT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DEV_DIR=${CONCERTIM_BILLING_DEV_DIR:-$PROJECT_DIR/target/dev}
BASE=$DEV_DIR/rabbitmq-cluster
FIRST_PORT=${CONCERTIM_BILLING_CLUSTER_PORT:-5701}
EPMD_PORT=${CONCERTIM_BILLING_CLUSTER_EPMD_PORT:-4371}
START_TIMEOUT=${CONCERTIM_BILLING_CLUSTER_START_TIMEOUT:-120}
RABBIT_BIN=/usr/lib/rabbitmq/bin
LETTERS=(a b c)

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

say() { echo "rabbitmq-cluster.sh: $*" >&2; }
die() { say "$*"; exit 1; }

index_of() {
    case "$1" in a) echo 0 ;; b) echo 1 ;; c) echo 2 ;; *) die "no node '$1': the nodes are a, b and c" ;; esac
}
node_name() { echo "concertim-$1@localhost"; }
amqp_port() { echo $((FIRST_PORT + $(index_of "$1"))); }
dist_port() { echo $((FIRST_PORT + 20000 + $(index_of "$1"))); }
pid_file() { echo "$BASE/$1/rabbit.pid"; }

# What every rabbitmq-server and rabbitmqctl of the cluster runs with: the private HOME holds
# the shared cookie; the environment file and config are private and empty, so that nothing
# of /etc/rabbitmq applies.
cluster_env() {
    export HOME=$BASE/home
    export ERL_EPMD_PORT=$EPMD_PORT
    export RABBITMQ_CONF_ENV_FILE=$BASE/rabbitmq-env.conf
    export RABBITMQ_CONFIG_FILE=$BASE/rabbitmq.conf
    export RABBITMQ_ADVANCED_CONFIG_FILE=$BASE/advanced.config
    export RABBITMQ_ENABLED_PLUGINS_FILE=$BASE/enabled_plugins
}

ctl() {
    local letter=$1
    shift
    (cluster_env && "$RABBIT_BIN/rabbitmqctl" -n "$(node_name "$letter")" "$@")
}

# Asked of the cluster's epmd first: rabbitmqctl starts an epmd when none answers, which would
# outlive a stopped cluster.
running() {
    epmd -port "$EPMD_PORT" -names 2>/dev/null | grep -q "^name concertim-$1 at port" &&
        ctl "$1" ping >/dev/null 2>&1
}

ensure_installed() {
    [ -x "$RABBIT_BIN/rabbitmq-server" ] && [ -x "$RABBIT_BIN/rabbitmqctl" ] ||
        die "RabbitMQ is not installed ($RABBIT_BIN/rabbitmq-server is missing): apt-get install rabbitmq-server"
}

# The private files every node reads, and the cookie (made once; all nodes share it).
prepare() {
    mkdir -p "$BASE/home"
    chmod 700 "$BASE/home"
    : >"$BASE/rabbitmq-env.conf"
    : >"$BASE/rabbitmq.conf"
    echo '[].' >"$BASE/advanced.config"
    echo '[].' >"$BASE/enabled_plugins"
    if [ ! -s "$BASE/home/.erlang.cookie" ]; then
        (umask 077 && head -c 30 /dev/urandom | od -An -tx1 | tr -d ' \n' | tr 'a-f' 'A-F' >"$BASE/home/.erlang.cookie")
        chmod 400 "$BASE/home/.erlang.cookie"
    fi
}

port_taken() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

start_node() {
    local letter=$1 node dir started
    node=$(node_name "$letter")
    if running "$letter"; then
        say "node $letter ($node) already runs"
        return 0
    fi
    for port in "$(amqp_port "$letter")" "$(dist_port "$letter")"; do
        port_taken "$port" && die "port $port of node $letter is taken by something else: stop it, or set CONCERTIM_BILLING_CLUSTER_PORT"
    done
    dir=$BASE/$letter
    mkdir -p "$dir/log"
    say "starting node $letter ($node) on 127.0.0.1:$(amqp_port "$letter") (distribution $(dist_port "$letter")), data in $dir"
    (
        cluster_env
        export RABBITMQ_NODENAME=$node
        export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
        export RABBITMQ_NODE_PORT
        RABBITMQ_NODE_PORT=$(amqp_port "$letter")
        export RABBITMQ_DIST_PORT
        RABBITMQ_DIST_PORT=$(dist_port "$letter")
        export RABBITMQ_MNESIA_BASE=$dir/mnesia
        export RABBITMQ_MNESIA_DIR=$dir/mnesia/$node
        export RABBITMQ_LOG_BASE=$dir/log
        export RABBITMQ_PID_FILE
        RABBITMQ_PID_FILE=$(pid_file "$letter")
        cd "$dir"
        "$RABBIT_BIN/rabbitmq-server" -detached >>"$dir/log/startup.log" 2>&1
    ) || die "rabbitmq-server of node $letter failed: see $dir/log"
    started=$(
        cluster_env
        timeout "$START_TIMEOUT" "$RABBIT_BIN/rabbitmqctl" -n "$node" wait --timeout "$START_TIMEOUT" "$(pid_file "$letter")" >/dev/null 2>&1 &&
            echo yes || echo no
    )
    [ "$started" = yes ] || die "node $letter did not start within ${START_TIMEOUT}s: see $dir/log"
}

# b and c join a (a node already a member is left alone).
join() {
    local letter=$1 first
    first=$(node_name a)
    if ctl "$letter" cluster_status 2>/dev/null | grep -q "$first"; then
        return 0
    fi
    say "joining node $letter to $first"
    ctl "$letter" stop_app >/dev/null
    ctl "$letter" join_cluster "$first" >/dev/null
    ctl "$letter" start_app >/dev/null
}

start() {
    ensure_installed
    prepare
    local letter
    if [ -d "$BASE/a/mnesia" ]; then
        # Members from an earlier start: each waits for the others while it boots, so they start
        # together.
        for letter in "${LETTERS[@]}"; do
            start_node "$letter" &
        done
        wait
    else
        for letter in "${LETTERS[@]}"; do
            start_node "$letter"
        done
    fi
    for letter in b c; do
        join "$letter"
    done
    for letter in "${LETTERS[@]}"; do
        running "$letter" || die "node $letter is not running: see $BASE/$letter/log"
    done
    say "the cluster runs: $(url)"
}

stop_node() {
    local letter=$1 pid file
    file=$(pid_file "$letter")
    if running "$letter"; then
        say "stopping node $letter ($(node_name "$letter"))"
        if [ -f "$file" ]; then
            ctl "$letter" stop "$file" >/dev/null 2>&1 || true
        else
            ctl "$letter" stop >/dev/null 2>&1 || true
        fi
    fi
    # A node that no longer answers may still be a process: ended by its PID.
    if [ -f "$file" ]; then
        pid=$(cat "$file")
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            say "node $letter does not answer; ending its process $pid"
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 1 30); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 1
            done
            kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
        fi
        rm -f "$file"
    fi
}

stop() {
    local letter
    for letter in "${LETTERS[@]}"; do
        stop_node "$letter"
    done
    if epmd -port "$EPMD_PORT" -names >/dev/null 2>&1; then
        say "stopping the cluster's epmd (port $EPMD_PORT)"
        epmd -port "$EPMD_PORT" -kill >/dev/null 2>&1 || true
    fi
    if [ -d "$BASE" ]; then
        say "deleting the nodes' data in $BASE (logs kept)"
        for letter in "${LETTERS[@]}"; do
            rm -rf "${BASE:?}/$letter/mnesia"
        done
    fi
}

status() {
    local letter up=0
    for letter in "${LETTERS[@]}"; do
        if running "$letter"; then
            echo "node $letter: $(node_name "$letter") runs on 127.0.0.1:$(amqp_port "$letter")"
            up=$((up + 1))
        else
            echo "node $letter: $(node_name "$letter") is not running"
        fi
    done
    [ "$up" -eq 3 ] || return 3
}

url() {
    local letter hosts=()
    for letter in "${LETTERS[@]}"; do
        hosts+=("guest:guest@127.0.0.1:$(amqp_port "$letter")")
    done
    (
        IFS=,
        echo "amqp://${hosts[*]}/%2f"
    )
}

nodes() {
    local letter
    for letter in "${LETTERS[@]}"; do
        echo "$letter $(node_name "$letter") $(amqp_port "$letter")"
    done
}

# The node (letter) of a running node's list, for an Erlang node name.
letter_of() {
    local letter
    for letter in "${LETTERS[@]}"; do
        [ "$1" = "$(node_name "$letter")" ] && echo "$letter" && return 0
    done
}

# Asks the first running node: it lists the connections, and the queues, of the whole cluster.
any_running() {
    local letter
    for letter in "${LETTERS[@]}"; do
        running "$letter" && echo "$letter" && return 0
    done
    die "no node of the cluster runs"
}

# A connection is on the node whose AMQP port it reached; lapin sends its name as the client
# property connection_name.
node_of() {
    local asked port letter
    asked=$(any_running)
    port=$(ctl "$asked" list_connections port client_properties --no-table-headers --quiet 2>/dev/null |
        awk -F'\t' -v name="{\"connection_name\",\"$1\"}" 'index($2, name) { print $1; exit }')
    [ -n "$port" ] || return 0
    for letter in "${LETTERS[@]}"; do
        [ "$port" = "$(amqp_port "$letter")" ] && echo "$letter" && return 0
    done
}

leader_of() {
    local asked node
    asked=$(any_running)
    node=$(ctl "$asked" list_queues name leader --no-table-headers --quiet 2>/dev/null |
        awk -F'\t' -v name="$1" '$1 == name { print $2; exit }')
    [ -z "$node" ] || letter_of "$node"
}

members_of() {
    local asked members letter out=()
    asked=$(any_running)
    members=$(ctl "$asked" list_queues name members --no-table-headers --quiet 2>/dev/null |
        awk -F'\t' -v name="$1" '$1 == name { print $2; exit }')
    for letter in "${LETTERS[@]}"; do
        case "$members" in *"$(node_name "$letter")"*) out+=("$letter") ;; esac
    done
    echo "${out[*]}"
}

case "${1:-}" in
start) start ;;
stop) stop ;;
status) status ;;
url) url ;;
nodes) nodes ;;
stop-node)
    index_of "${2:?stop-node needs a node: a, b or c}" >/dev/null
    stop_node "$2"
    ;;
start-node)
    ensure_installed
    index_of "${2:?start-node needs a node: a, b or c}" >/dev/null
    prepare
    start_node "$2"
    ;;
node-of) node_of "${2:?node-of needs a connection name}" ;;
leader-of) leader_of "${2:?leader-of needs a queue name}" ;;
members-of) members_of "${2:?members-of needs a queue name}" ;;
ctl)
    index_of "${2:?ctl needs a node: a, b or c}" >/dev/null
    letter=$2
    shift 2
    ctl "$letter" "$@"
    ;;
-h | --help | help) usage ;;
*)
    usage >&2
    exit 2
    ;;
esac
