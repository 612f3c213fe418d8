#!/usr/bin/env bash
# A real KillBill server for concertim-billing's tests, on 127.0.0.1, backed by the private
# PostgreSQL cluster of postgres.sh (next to this script).
#
# Usage: killbill.sh start|stop|status|url|log [N]|reset
#   start   fetches the KillBill war and jetty-runner with Maven when they are not in the local
#           Maven repository yet; starts PostgreSQL (postgres.sh start); creates the role and the
#           database `killbill` (password `killbill`) and loads KillBill's DDL, taken from the
#           war's own jars, when the schema is absent; writes the properties file; starts the JVM
#           in the background and waits until GET /1.0/healthcheck answers 200. Prints how long
#           that took and the JVM's resident memory. Does nothing when the healthcheck already
#           answers. On a timeout it prints the end of the log and stops the JVM.
#   stop    stops the JVM by its PID (SIGTERM, then SIGKILL after a timeout). PostgreSQL keeps
#           running: stop it with postgres.sh stop.
#   status  says whether it runs; exit 0 when the healthcheck answers, 3 when not.
#   url     prints the base URL, http://127.0.0.1:<port>
#   log [N] prints the last N (default 100) lines of the server's log.
#   reset   stops the JVM and drops the `killbill` database and the server's work files, so the
#           next start begins from an empty schema (and, in test mode, from today's clock).
#
# The server is KillBill's own war (org.kill-bill.billing:killbill-profiles-killbill, 0.22.26 by
# default: Maven Central does not serve the 0.24 war) run by Jetty 9.4's single-jar jetty-runner
# (a javax container), with org.killbill.server.test.mode=true (the /1.0/kb/test/clock endpoints,
# ClockMock). Never point a deployment at this configuration. Credentials: admin/password (the
# war's shiro.ini); tenants are created through the API.
#
# Environment:
#   CONCERTIM_BILLING_DEV_DIR                 work dir (default <project>/target/dev); the server's
#                                             files are in <dev dir>/killbill (log: killbill.log)
#   CONCERTIM_BILLING_KILLBILL_PORT           HTTP port (default 18080)
#   CONCERTIM_BILLING_KILLBILL_START_TIMEOUT  seconds to wait for the healthcheck (default 300)
#   CONCERTIM_BILLING_KILLBILL_STOP_TIMEOUT   seconds between SIGTERM and SIGKILL (default 60)
#   CONCERTIM_BILLING_KILLBILL_VERSION        war version (default 0.22.26)
#   CONCERTIM_BILLING_JETTY_RUNNER_VERSION    org.eclipse.jetty:jetty-runner version (default 9.4.57.v20241219)
#   CONCERTIM_BILLING_KILLBILL_JAVA           java binary (default: java on the PATH; 11 or 17)
#   CONCERTIM_BILLING_KILLBILL_JAVA_OPTS      extra JVM options, appended
#   CONCERTIM_BILLING_M2_REPO                 local Maven repository (default ~/.m2/repository)
#   CONCERTIM_BILLING_PG_PORT                 PostgreSQL port (default 55432; see postgres.sh)
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PROJECT_DIR=$(cd "$SCRIPT_DIR/../.." && pwd)
DEV_DIR=${CONCERTIM_BILLING_DEV_DIR:-$PROJECT_DIR/target/dev}
KB_PORT=${CONCERTIM_BILLING_KILLBILL_PORT:-18080}
KB_START_TIMEOUT=${CONCERTIM_BILLING_KILLBILL_START_TIMEOUT:-300}
KB_STOP_TIMEOUT=${CONCERTIM_BILLING_KILLBILL_STOP_TIMEOUT:-60}
KB_VERSION=${CONCERTIM_BILLING_KILLBILL_VERSION:-0.22.26}
JETTY_VERSION=${CONCERTIM_BILLING_JETTY_RUNNER_VERSION:-9.4.57.v20241219}
JAVA=${CONCERTIM_BILLING_KILLBILL_JAVA:-java}
M2_REPO=${CONCERTIM_BILLING_M2_REPO:-$HOME/.m2/repository}
PG_PORT=${CONCERTIM_BILLING_PG_PORT:-55432}
export CONCERTIM_BILLING_DEV_DIR=$DEV_DIR CONCERTIM_BILLING_PG_PORT=$PG_PORT

KB_DIR=$DEV_DIR/killbill
KB_LOG=$KB_DIR/killbill.log
KB_PID_FILE=$KB_DIR/killbill.pid
KB_PROPS=$KB_DIR/killbill.properties
KB_URL=http://127.0.0.1:$KB_PORT
DB_NAME=killbill
DB_USER=killbill
DB_PASSWORD=killbill
# Modules whose jar holds org/killbill/billing/<module>/ddl.sql (what KillBill itself loads into
# an embedded H2: KillBillEmbeddedDBProvider). killbill-queue's org/killbill/queue/ddl.sql only
# repeats util's notifications and bus_events tables, so it is not loaded.
DDL_MODULES="account beatrix catalog entitlement invoice payment subscription tenant usage util"

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

say() { echo "killbill.sh: $*" >&2; }
die() { say "$*"; exit 1; }

healthy() {
    curl -fsS -o /dev/null -m 5 "$KB_URL/1.0/healthcheck" 2>/dev/null
}

# The PID from the PID file, when that process is alive and is our JVM.
server_pid() {
    local pid
    [ -r "$KB_PID_FILE" ] || return 1
    pid=$(cat "$KB_PID_FILE")
    [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "jetty-runner" || return 1
    echo "$pid"
}

rss_of() {
    awk '/^VmRSS:/ { printf "%.0f MiB", $2 / 1024 }' "/proc/$1/status" 2>/dev/null || echo "unknown"
}

# Path of groupId:artifactId:version:packaging in the local repository, fetched when absent.
artifact() {
    local group=$1 id=$2 version=$3 packaging=$4 path
    path=$M2_REPO/${group//.//}/$id/$version/$id-$version.$packaging
    if [ ! -s "$path" ]; then
        command -v mvn >/dev/null || die "mvn is needed to fetch $group:$id:$version:$packaging"
        say "fetching $group:$id:$version:$packaging with Maven"
        mvn -B -q -Dstyle.color=never -Dmaven.repo.local="$M2_REPO" dependency:get \
            -Dartifact="$group:$id:$version:$packaging" -Dtransitive=false >&2 \
            || die "Maven could not fetch $group:$id:$version:$packaging"
        [ -s "$path" ] || die "Maven did not leave $path"
    fi
    echo "$path"
}

psql_pg() {
    local bin
    bin=$(ls -d /usr/lib/postgresql/*/bin/psql 2>/dev/null | sort -V | tail -n 1)
    [ -n "$bin" ] || bin=psql
    "$bin" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres "$@"
}

# The schema, in the order of KillBill's bin/db-helper for PostgreSQL: util's ddl-postgresql.sql
# (domains, functions, the serial->bigint event trigger; needs a superuser), then every module's
# ddl.sql, created as the owner role.
write_ddl() {
    local war=$1 out=$2 work jar module
    work=$(mktemp -d "$KB_DIR/ddl.XXXXXX")
    jar_of() {
        local name
        name=$(unzip -Z1 "$war" | grep -E "^WEB-INF/lib/killbill-$1-[0-9][^/]*\.jar$" | grep -v -- '-tests\.jar$' | head -n 1)
        [ -n "$name" ] || die "no killbill-$1 jar in $war"
        unzip -p "$war" "$name" >"$work/$1.jar"
        echo "$work/$1.jar"
    }
    {
        echo "-- KillBill schema for PostgreSQL, extracted from $(basename "$war") by deploy/dev/killbill.sh"
        jar=$(jar_of util)
        unzip -p "$jar" org/killbill/billing/util/ddl-postgresql.sql
        echo
        echo "SET ROLE $DB_USER;"
        for module in $DDL_MODULES; do
            jar=$(jar_of "$module")
            echo "-- org/killbill/billing/$module/ddl.sql"
            unzip -p "$jar" "org/killbill/billing/$module/ddl.sql"
            echo
        done
        echo "RESET ROLE;"
    } >"$out"
    rm -rf "$work"
}

ensure_database() {
    local war=$1
    psql_pg -d postgres <<EOF
SELECT 'CREATE ROLE $DB_USER LOGIN PASSWORD ''$DB_PASSWORD'''
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '$DB_USER') \gexec
SELECT 'CREATE DATABASE $DB_NAME OWNER $DB_USER ENCODING ''UTF8'' TEMPLATE template0'
WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = '$DB_NAME') \gexec
EOF
    if [ "$(psql_pg -d "$DB_NAME" -Atc "SELECT to_regclass('public.tenants') IS NOT NULL")" = t ]; then
        return 0
    fi
    say "loading KillBill's schema into database $DB_NAME (DDL: $KB_DIR/ddl.sql)"
    write_ddl "$war" "$KB_DIR/ddl.sql"
    # One transaction: a failure leaves no half schema behind.
    psql_pg -d "$DB_NAME" --single-transaction -f "$KB_DIR/ddl.sql" >/dev/null 2>"$KB_DIR/ddl.err" || {
        cat "$KB_DIR/ddl.err" >&2
        die "loading $KB_DIR/ddl.sql failed"
    }
}

write_properties() {
    local jdbc="jdbc:postgresql://127.0.0.1:$PG_PORT/$DB_NAME"
    # With -Dorg.killbill.server.properties, KillBill reads only this file (not -D properties).
    cat >"$KB_PROPS" <<EOF
# Written by deploy/dev/killbill.sh at each start; edits are lost. A TEST server: test.mode is on.
org.killbill.dao.url=$jdbc
org.killbill.dao.user=$DB_USER
org.killbill.dao.password=$DB_PASSWORD
org.killbill.billing.osgi.dao.url=$jdbc
org.killbill.billing.osgi.dao.user=$DB_USER
org.killbill.billing.osgi.dao.password=$DB_PASSWORD
# Enables /1.0/kb/test/clock (ClockMock) to move time forward.
org.killbill.server.test.mode=true
# Otherwise it fetches raw.github.com at start.
org.killbill.server.updateCheck.skip=true
org.killbill.server.multitenant=true
org.killbill.server.baseUrl=$KB_URL
# No plugins: the bundle dir stays empty.
org.killbill.osgi.bundle.install.dir=$KB_DIR/bundles
org.killbill.osgi.root.dir=$KB_DIR/osgi
# Upstream's test value (the default hashes API secrets 200,000 times).
org.killbill.security.shiroNbHashIterations=10
# As the official Docker image; a short poll so that test-clock moves are processed quickly.
org.killbill.notificationq.main.queue.mode=POLLING
org.killbill.notificationq.main.sleep=100
EOF
}

wait_healthy() {
    local pid=$1 started=$2 elapsed
    while :; do
        if healthy; then
            elapsed=$(($(date +%s) - started))
            # The healthcheck answers 200 even when services failed to initialise (seen on Java 17
            # without the sun.net.www.protocol opens: every SQL DAO failed, the log grew by
            # megabytes per second, and the healthcheck still said OK).
            if grep -q "failed to invoke lifecycle handler" "$KB_LOG"; then
                say "the healthcheck answers, but KillBill services failed to start; first failure in $KB_LOG:"
                grep -m 1 -A 30 "failed to invoke lifecycle handler" "$KB_LOG" | grep -E "lifecycle|Caused by|Exception" | head -n 12 >&2 || true
                stop_server
                return 1
            fi
            say "healthy at $KB_URL after ${elapsed}s (pid $pid, RSS $(rss_of "$pid"), log $KB_LOG)"
            return 0
        fi
        elapsed=$(($(date +%s) - started))
        if ! kill -0 "$pid" 2>/dev/null; then
            say "the JVM (pid $pid) exited after ${elapsed}s; last 40 lines of $KB_LOG:"
            tail -n 40 "$KB_LOG" >&2 || true
            rm -f "$KB_PID_FILE"
            return 1
        fi
        if [ "$elapsed" -ge "$KB_START_TIMEOUT" ]; then
            say "no healthy answer from $KB_URL/1.0/healthcheck within ${KB_START_TIMEOUT}s; last 40 lines of $KB_LOG:"
            tail -n 40 "$KB_LOG" >&2 || true
            stop_server
            return 1
        fi
        sleep 2
    done
}

start() {
    if healthy; then
        say "already healthy at $KB_URL"
        return 0
    fi
    local pid
    if pid=$(server_pid); then
        say "pid $pid is already starting; waiting for it"
        wait_healthy "$pid" "$(stat -c %Y "$KB_PID_FILE")"
        return
    fi
    if (exec 3<>"/dev/tcp/127.0.0.1/$KB_PORT") 2>/dev/null; then
        die "127.0.0.1:$KB_PORT is taken by something that is not a healthy KillBill; set CONCERTIM_BILLING_KILLBILL_PORT"
    fi
    local missing=""
    command -v "$JAVA" >/dev/null || missing="$missing openjdk-17-jre-headless"
    command -v unzip >/dev/null || missing="$missing unzip"
    command -v curl >/dev/null || missing="$missing curl"
    command -v mvn >/dev/null || missing="$missing maven"
    if [ -n "$missing" ]; then
        [ "$(id -u)" -eq 0 ] || die "needs:$missing (apt-get install$missing, as root)"
        say "installing Debian's$missing"
        env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        # shellcheck disable=SC2086
        env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
    fi

    mkdir -p "$KB_DIR" "$KB_DIR/bundles" "$KB_DIR/osgi" "$KB_DIR/tmp" "$KB_DIR/logs"
    local war runner
    war=$(artifact org.kill-bill.billing killbill-profiles-killbill "$KB_VERSION" war)
    runner=$(artifact org.eclipse.jetty jetty-runner "$JETTY_VERSION" jar)

    "$SCRIPT_DIR/postgres.sh" start
    ensure_database "$war"
    write_properties

    [ -f "$KB_LOG" ] && mv -f "$KB_LOG" "$KB_LOG.prev"
    # Jetty unpacks the war here; a killed JVM leaves its copy behind.
    rm -rf "${KB_DIR:?}/tmp" && mkdir -p "$KB_DIR/tmp"
    local started
    started=$(date +%s)
    say "starting KillBill $KB_VERSION (jetty-runner $JETTY_VERSION, $("$JAVA" -version 2>&1 | head -n 1)) on $KB_URL; log: $KB_LOG"
    # shellcheck disable=SC2086
    (
        cd "$KB_DIR"
        exec setsid "$JAVA" \
            --add-opens java.base/java.lang=ALL-UNNAMED \
            --add-opens java.base/java.net=ALL-UNNAMED \
            --add-opens java.base/java.security=ALL-UNNAMED \
            --add-opens java.base/java.util=ALL-UNNAMED \
            --add-opens java.base/sun.net.www.protocol.file=ALL-UNNAMED \
            --add-opens java.base/sun.net.www.protocol.jar=ALL-UNNAMED \
            --add-opens java.base/sun.net.www.protocol.http=ALL-UNNAMED \
            --add-opens java.base/sun.net.www.protocol.https=ALL-UNNAMED \
            -Duser.timezone=GMT -Xms256m -Xmx1g -XX:MaxDirectMemorySize=256m \
            -Djava.security.egd=file:/dev/./urandom \
            -Djava.io.tmpdir="$KB_DIR/tmp" \
            -DLOGS_DIR="$KB_DIR/logs" \
            -Dorg.killbill.server.properties="file://$KB_PROPS" \
            ${CONCERTIM_BILLING_KILLBILL_JAVA_OPTS:-} \
            -jar "$runner" --host 127.0.0.1 --port "$KB_PORT" "$war"
    ) </dev/null >"$KB_LOG" 2>&1 &
    pid=$!
    echo "$pid" >"$KB_PID_FILE"
    wait_healthy "$pid" "$started"
}

stop_server() {
    local pid waited=0
    if ! pid=$(server_pid); then
        say "not running"
        rm -f "$KB_PID_FILE"
        return 0
    fi
    say "stopping pid $pid"
    kill -TERM "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null; do
        if [ "$waited" -ge "$KB_STOP_TIMEOUT" ]; then
            say "pid $pid still alive after ${KB_STOP_TIMEOUT}s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 1
            break
        fi
        sleep 1
        waited=$((waited + 1))
    done
    rm -f "$KB_PID_FILE"
}

status() {
    local pid
    if healthy; then
        if pid=$(server_pid); then
            echo "running: pid $pid, RSS $(rss_of "$pid"), $KB_URL, log $KB_LOG"
        else
            echo "a healthy KillBill answers at $KB_URL, but not one started by this script"
        fi
        return 0
    fi
    if pid=$(server_pid); then
        echo "not healthy (yet): pid $pid alive, $KB_URL/1.0/healthcheck does not answer 200 (log $KB_LOG)"
    else
        echo "not running"
    fi
    return 3
}

reset() {
    stop_server
    "$SCRIPT_DIR/postgres.sh" start
    say "dropping database $DB_NAME"
    psql_pg -d postgres -c "DROP DATABASE IF EXISTS $DB_NAME WITH (FORCE)"
    rm -rf "$KB_DIR/osgi" "$KB_DIR/tmp" "$KB_DIR/logs" "$KB_DIR/ddl.sql" "$KB_DIR/ddl.err"
}

case "${1:-}" in
    start) start ;;
    stop) stop_server ;;
    status) status ;;
    url) echo "$KB_URL" ;;
    log) tail -n "${2:-100}" "$KB_LOG" ;;
    reset) reset ;;
    -h | --help | help) usage ;;
    "") usage; exit 2 ;;
    *) usage >&2; exit 2 ;;
esac
