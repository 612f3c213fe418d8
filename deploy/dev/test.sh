#!/usr/bin/env bash
# Runs every test of concertim-billing on this machine.
#
# Integration tests talk to a real RabbitMQ at 127.0.0.1:5672 (guest/guest). When none answers,
# this script starts one, installing Debian's rabbitmq-server first when it is missing (as root,
# or through sudo), and enables the consistent-hash exchange plugin the sharding tests use. The
# fault test of a broker cluster's failover gets a three-node cluster of its own
# (deploy/dev/rabbitmq-cluster.sh), started beside it: CONCERTIM_BILLING_TEST_CLUSTER_URL names it.
#
# The KillBill tests run against a real KillBill (deploy/dev/killbill.sh: KillBill's war from
# Maven Central on Jetty, with a private PostgreSQL from Debian, on 127.0.0.1). When none
# answers, this script starts one (installing and fetching what is missing). The store's tests
# run against that PostgreSQL too, in a database `concertim_billing_test` (created when missing;
# each test uses a schema of its own): CONCERTIM_BILLING_TEST_POSTGRES_URL names it, whichever
# KillBill the tests use. The tests that publish as Nova does use oslo.messaging from PyPI,
# installed into target/dev/oslo-venv.
# Whatever this script starts (the broker, the cluster, PostgreSQL, KillBill) it stops when the
# tests are done; what was already running is left running. Set
# CONCERTIM_BILLING_KILLBILL=fake to run them against the in-process fake instead (fast, no
# Java). Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/../.."

broker_answers() {
    (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "test.sh: need root to run: $*" >&2
        return 1
    fi
}

# The TLS tests make their certificates with the openssl command.
need_openssl() {
    if ! command -v openssl >/dev/null; then
        echo "test.sh: installing Debian's openssl (the TLS tests make their certificates with it)" >&2
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null
    fi
}

start_broker() {
    if ! command -v rabbitmq-server >/dev/null && [ ! -x /usr/sbin/rabbitmq-server ]; then
        echo "test.sh: installing Debian's rabbitmq-server" >&2
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
    fi
    echo "test.sh: starting RabbitMQ" >&2
    if command -v systemctl >/dev/null && systemctl is-system-running >/dev/null 2>&1; then
        as_root systemctl start rabbitmq-server
    else
        as_root env PATH="$PATH:/usr/sbin" rabbitmq-server -detached
    fi
    for _ in $(seq 1 120); do
        broker_answers && return 0
        sleep 1
    done
    echo "test.sh: RabbitMQ did not answer on 127.0.0.1:5672 within 120 s" >&2
    return 1
}

# The sharded topology's exchange type comes from a plugin shipped with RabbitMQ (enabling an
# enabled plugin changes nothing).
enable_shard_plugin() {
    local plugins
    plugins=$(command -v rabbitmq-plugins || echo /usr/sbin/rabbitmq-plugins)
    if [ ! -x "$plugins" ]; then
        echo "test.sh: rabbitmq-plugins not found; the sharding tests need rabbitmq_consistent_hash_exchange enabled on the broker" >&2
        return 0
    fi
    as_root "$plugins" enable --quiet rabbitmq_consistent_hash_exchange >/dev/null
}

# What this script starts, it stops when the tests end (in reverse order); what was already
# running is left running.
cleanup=()
stop_started() {
    local i
    for ((i = ${#cleanup[@]} - 1; i >= 0; i--)); do
        eval "${cleanup[$i]}" || true
    done
}
trap stop_started EXIT

need_openssl
if ! broker_answers; then
    start_broker
    cleanup+=("as_root env PATH=\"\$PATH:/usr/sbin\" rabbitmqctl stop >/dev/null 2>&1")
fi
enable_shard_plugin

# The private PostgreSQL (deploy/dev/postgres.sh) for the store's tests, and KillBill's data.
if ! deploy/dev/postgres.sh status >/dev/null 2>&1; then
    deploy/dev/postgres.sh start
    cleanup+=("deploy/dev/postgres.sh stop")
fi
psql_pg() {
    local bin
    bin=$(ls -d /usr/lib/postgresql/*/bin/psql 2>/dev/null | sort -V | tail -n 1)
    [ -n "$bin" ] || bin=psql
    "$bin" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "${CONCERTIM_BILLING_PG_PORT:-55432}" -U postgres "$@"
}
psql_pg -d postgres <<'EOF'
SELECT 'CREATE DATABASE concertim_billing_test ENCODING ''UTF8'' TEMPLATE template0'
WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'concertim_billing_test') \gexec
EOF
pg_url=$(deploy/dev/postgres.sh url)
CONCERTIM_BILLING_TEST_POSTGRES_URL="${pg_url%/postgres}/concertim_billing_test"
export CONCERTIM_BILLING_TEST_POSTGRES_URL
echo "test.sh: the store's PostgreSQL tests use $CONCERTIM_BILLING_TEST_POSTGRES_URL" >&2

# OpenStack's own publishing code for the tests that publish as Nova does: oslo.messaging from
# PyPI, in a virtualenv of the project's (reused when already there).
oslo_venv=target/dev/oslo-venv
if ! "$oslo_venv/bin/python" -c 'import oslo_messaging' 2>/dev/null; then
    echo "test.sh: installing oslo.messaging from PyPI into $oslo_venv" >&2
    mkdir -p target/dev
    python3 -m venv "$oslo_venv"
    "$oslo_venv/bin/pip" install --quiet --disable-pip-version-check oslo.messaging
fi
CONCERTIM_BILLING_OSLO_PYTHON="$(pwd)/$oslo_venv/bin/python"
export CONCERTIM_BILLING_OSLO_PYTHON

# The real KillBill, unless the fake was asked for. Started here, it is stopped on exit (the
# JVM only: the PostgreSQL cluster keeps its data for the next run, and postgres.sh stop ends it).
if [ "${CONCERTIM_BILLING_KILLBILL:-real}" != fake ]; then
    if ! deploy/dev/killbill.sh status >/dev/null 2>&1; then
        # PostgreSQL answers already (above): killbill.sh keeps its data there.
        deploy/dev/killbill.sh start
        cleanup+=("deploy/dev/killbill.sh stop")
    fi
    CONCERTIM_BILLING_KILLBILL_URL="$(deploy/dev/killbill.sh url)"
    export CONCERTIM_BILLING_KILLBILL_URL
    echo "test.sh: KillBill tests run against the real server at $CONCERTIM_BILLING_KILLBILL_URL" >&2
fi

# A private three-node RabbitMQ cluster (deploy/dev/rabbitmq-cluster.sh: 127.0.0.1:5701-5703,
# beside the single broker) for the fault test that stops broker nodes under the service; only
# that test uses it.
if ! deploy/dev/rabbitmq-cluster.sh status >/dev/null 2>&1; then
    deploy/dev/rabbitmq-cluster.sh start
    cleanup+=("deploy/dev/rabbitmq-cluster.sh stop")
fi
CONCERTIM_BILLING_TEST_CLUSTER_URL="$(deploy/dev/rabbitmq-cluster.sh url)"
export CONCERTIM_BILLING_TEST_CLUSTER_URL
echo "test.sh: the cluster fault test uses the three-node cluster at ${CONCERTIM_BILLING_TEST_CLUSTER_URL//guest:guest@/}" >&2

# The fault-injection suite (tests/faults) may restart the broker once (rabbitmqctl stop_app /
# start_app): cargo runs the test targets one after another, and that target holds its other
# scenarios back while the broker is away. Set it to 0 on a broker shared with other work.
export CONCERTIM_BILLING_FAULTS_BROKER_RESTART="${CONCERTIM_BILLING_FAULTS_BROKER_RESTART:-1}"

cargo test --all-targets "$@"
cargo test --doc "$@"
