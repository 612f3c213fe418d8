#!/usr/bin/env bash
# A private, disposable PostgreSQL cluster for concertim-billing's tests (the real KillBill server
# started by killbill.sh keeps its data in it).
#
# Usage: postgres.sh start|stop|status|url
#   start   creates the cluster on first use (installing Debian's postgresql first when no
#           /usr/lib/postgresql/*/bin/postgres exists), starts it, and waits until pg_isready
#           answers. Does nothing when the server already answers.
#   stop    stops the server (pg_ctl stop -m fast on the data dir, i.e. by the postmaster's PID).
#   status  says whether it runs; exit 0 when it answers, 3 when not.
#   url     prints the connection URL of the superuser, postgres://postgres@127.0.0.1:<port>/postgres
#
# The server listens on 127.0.0.1 only, keeps its unix socket in the data dir (not /var/run), runs
# as the `postgres` system user (initdb refuses root), and trusts every TCP connection from
# 127.0.0.1 without a password: it is a loopback-only test server holding throw-away data. It also
# runs with fsync off, so a machine crash may corrupt it: delete the data dir to start over.
#
# Environment:
#   CONCERTIM_BILLING_DEV_DIR           work dir (default <project>/target/dev); the cluster is in
#                                       <dev dir>/postgres, its log in <dev dir>/postgres.log and
#                                       the postmaster's PID in <dev dir>/postgres.pid. When the
#                                       postgres user cannot enter the dev dir (it is under a
#                                       private directory), the cluster and its log are in
#                                       /var/tmp/concertim-billing-dev-<hash of the dev dir>.
#   CONCERTIM_BILLING_PG_PORT           TCP port (default 55432)
#   CONCERTIM_BILLING_PG_START_TIMEOUT  seconds to wait for pg_isready at start (default 60)
set -euo pipefail

PROJECT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DEV_DIR=${CONCERTIM_BILLING_DEV_DIR:-$PROJECT_DIR/target/dev}
PG_PORT=${CONCERTIM_BILLING_PG_PORT:-55432}
PG_START_TIMEOUT=${CONCERTIM_BILLING_PG_START_TIMEOUT:-60}
PG_PID_FILE=$DEV_DIR/postgres.pid
PG_USER=postgres

# The server runs as the `postgres` user, which must be able to enter every directory above its
# data. When the dev dir is under a private directory (a clone in a mktemp dir, say), the
# cluster lives in /var/tmp instead, in a directory named after the dev dir.
world_reachable() {
    local d=$1 mode
    while [ "$d" != / ] && [ -n "$d" ]; do
        if [ -e "$d" ]; then
            mode=$(stat -c %A "$d")
            case "${mode:9:1}" in x | t) ;; *) return 1 ;; esac
        fi
        d=$(dirname "$d")
    done
}
if world_reachable "$DEV_DIR"; then
    PG_HOME=$DEV_DIR
else
    PG_HOME=/var/tmp/concertim-billing-dev-$(printf '%s' "$DEV_DIR" | md5sum | cut -c1-12)
fi
PG_DATA=$PG_HOME/postgres
PG_LOG=$PG_HOME/postgres.log

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

say() { echo "postgres.sh: $*" >&2; }
die() { say "$*"; exit 1; }

pg_bin_dir() {
    local postgres
    postgres=$(ls -d /usr/lib/postgresql/*/bin/postgres 2>/dev/null | sort -V | tail -n 1 || true)
    [ -n "$postgres" ] && dirname "$postgres"
}

ensure_installed() {
    if [ -z "$(pg_bin_dir)" ]; then
        [ "$(id -u)" -eq 0 ] || die "PostgreSQL is not installed and installing it needs root (apt-get install postgresql)"
        say "installing Debian's postgresql"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
        [ -n "$(pg_bin_dir)" ] || die "apt-get install postgresql did not provide /usr/lib/postgresql/*/bin/postgres"
    fi
    id -u "$PG_USER" >/dev/null 2>&1 || die "the system user '$PG_USER' is missing (it comes with Debian's postgresql-common)"
}

as_pg() {
    if [ "$(id -u)" -eq "$(id -u "$PG_USER")" ]; then
        "$@"
    elif [ "$(id -u)" -eq 0 ]; then
        # From /: the caller's directory may be closed to that user.
        (cd / && runuser -u "$PG_USER" -- "$@")
    else
        die "run as root (or as $PG_USER): the server runs as the '$PG_USER' user"
    fi
}

answers() {
    local bin
    bin=$(pg_bin_dir) || return 1
    [ -n "$bin" ] || return 1
    "$bin/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -t 2 >/dev/null 2>&1
}

# The postmaster's PID from its own lock file, when that process is alive.
postmaster_pid() {
    local pid
    [ -r "$PG_DATA/postmaster.pid" ] || return 1
    pid=$(head -n 1 "$PG_DATA/postmaster.pid")
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

init_cluster() {
    local bin=$1
    say "creating the cluster in $PG_DATA"
    mkdir -p "$DEV_DIR" "$PG_HOME"
    # The postgres user must be able to reach the cluster's directory.
    local d=$PG_HOME
    while [ "$d" != / ]; do
        if ! runuser -u "$PG_USER" -- test -x "$d" 2>/dev/null; then
            die "the '$PG_USER' user cannot enter $d; set CONCERTIM_BILLING_DEV_DIR to a directory it can reach, or chmod o+x $d"
        fi
        d=$(dirname "$d")
    done
    install -d -m 0700 -o "$PG_USER" -g "$(id -gn "$PG_USER")" "$PG_DATA"
    as_pg "$bin/initdb" -D "$PG_DATA" -U postgres -E UTF8 --locale=C.UTF-8 \
        --auth-local=peer --auth-host=trust >/dev/null
    # Loopback test server: trust connections from 127.0.0.1 only (no IPv6, no other hosts).
    as_pg tee "$PG_DATA/pg_hba.conf" >/dev/null <<'EOF'
# concertim-billing dev cluster (deploy/dev/postgres.sh): a loopback-only test server.
# TYPE  DATABASE  USER  ADDRESS        METHOD
local   all       all                  peer
host    all       all   127.0.0.1/32   trust
EOF
    echo "include_if_exists = 'concertim-dev.conf'" | as_pg tee -a "$PG_DATA/postgresql.conf" >/dev/null
}

# Rewritten at every start, so that a changed port takes effect.
write_settings() {
    as_pg tee "$PG_DATA/concertim-dev.conf" >/dev/null <<EOF
# Written by deploy/dev/postgres.sh at each start; edits are lost.
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_DATA'
max_connections = 250
shared_buffers = 128MB
# Throw-away test data: trade durability for speed.
fsync = off
synchronous_commit = off
full_page_writes = off
logging_collector = off
EOF
}

start() {
    if answers; then
        say "already answering on 127.0.0.1:$PG_PORT"
        local pid
        if pid=$(postmaster_pid); then echo "$pid" >"$PG_PID_FILE"; else
            say "warning: that server is not the cluster in $PG_DATA"
        fi
        return 0
    fi
    ensure_installed
    local bin
    bin=$(pg_bin_dir)
    [ -s "$PG_DATA/PG_VERSION" ] || init_cluster "$bin"
    if [ "$(cat "$PG_DATA/PG_VERSION")" != "$(basename "$(dirname "$bin")")" ]; then
        die "$PG_DATA was created by PostgreSQL $(cat "$PG_DATA/PG_VERSION") but $bin is another version; delete $PG_DATA to recreate it"
    fi
    write_settings
    touch "$PG_LOG"
    chown "$PG_USER" "$PG_LOG"
    say "starting PostgreSQL $(cat "$PG_DATA/PG_VERSION") on 127.0.0.1:$PG_PORT (log: $PG_LOG)"
    # -W: do not wait here; the loop below waits with our own timeout and message.
    if ! as_pg "$bin/pg_ctl" start -W -D "$PG_DATA" -l "$PG_LOG" >/dev/null; then
        tail -n 20 "$PG_LOG" >&2 || true
        die "pg_ctl start failed; see $PG_LOG"
    fi
    local waited=0
    until answers; do
        if [ "$waited" -ge "$PG_START_TIMEOUT" ]; then
            tail -n 20 "$PG_LOG" >&2 || true
            die "PostgreSQL did not answer on 127.0.0.1:$PG_PORT within ${PG_START_TIMEOUT}s; see $PG_LOG"
        fi
        sleep 1
        waited=$((waited + 1))
    done
    postmaster_pid >"$PG_PID_FILE" || die "PostgreSQL answers but $PG_DATA/postmaster.pid names no live process"
    say "ready (pid $(cat "$PG_PID_FILE"))"
}

stop() {
    local bin pid
    if ! pid=$(postmaster_pid); then
        say "not running"
        rm -f "$PG_PID_FILE"
        return 0
    fi
    bin=$(pg_bin_dir)
    say "stopping pid $pid"
    as_pg "$bin/pg_ctl" stop -D "$PG_DATA" -m fast -t 60 >/dev/null
    rm -f "$PG_PID_FILE"
}

status() {
    local pid
    if answers; then
        if pid=$(postmaster_pid); then
            echo "running: pid $pid, 127.0.0.1:$PG_PORT, data $PG_DATA, log $PG_LOG"
        else
            echo "something answers on 127.0.0.1:$PG_PORT, but not the cluster in $PG_DATA"
        fi
        return 0
    fi
    if pid=$(postmaster_pid); then
        echo "not answering: pid $pid alive but 127.0.0.1:$PG_PORT does not answer (log $PG_LOG)"
    else
        echo "not running"
    fi
    return 3
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    url) echo "postgres://postgres@127.0.0.1:$PG_PORT/postgres" ;;
    -h | --help | help) usage ;;
    "") usage; exit 2 ;;
    *) usage >&2; exit 2 ;;
esac
