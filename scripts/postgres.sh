#!/usr/bin/env bash
# Throwaway PostgreSQL server for the test suite (Optuna RDB storage shared by worker processes).
#
#   scripts/postgres.sh start   install PostgreSQL if missing, initdb a private cluster, start it;
#                               the last (only) line on stdout is the SQLAlchemy URL
#   scripts/postgres.sh stop    stop the server and delete its data directory
#   scripts/postgres.sh url     print the SQLAlchemy URL
#
# It never touches the distribution's own cluster or service (no systemctl, no pg_ctlcluster):
# the cluster lives in its own data directory, owned by the `postgres` system user when run as
# root (the server refuses to run as root) or by the calling user otherwise. The server listens
# on 127.0.0.1 only; its unix socket is inside the (mode 0700) data directory, where the
# `postgres` superuser is trusted. TCP logins use scram-sha-256, so a wrong password is rejected.
# Durability is switched off (fsync=off...): this is for tests only.
#
# Environment (defaults):
#   RAPID_PG_DIR=/tmp/rapid-pg   RAPID_PG_PORT=55432   RAPID_PG_PASSWORD=rapid-ci-secret
# Exit status: 0 ok, 1 failure, 2 usage, 3 PostgreSQL missing and cannot be installed here.
set -euo pipefail

PG_DIR=${RAPID_PG_DIR:-/tmp/rapid-pg}
PG_PORT=${RAPID_PG_PORT:-55432}
PG_PASSWORD=${RAPID_PG_PASSWORD:-rapid-ci-secret}
PG_ROLE=rapid
PG_DB=rapid
MARKER=.rapid-pg   # file that marks a data directory as ours (stop only deletes such directories)

log() { printf 'postgres.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $PG_PORT =~ ^[0-9]+$ ]] && ((PG_PORT > 0 && PG_PORT < 65536)) || die "RAPID_PG_PORT must be a TCP port, got '$PG_PORT'"
[[ -n $PG_PASSWORD && $PG_PASSWORD != *$'\n'* ]] || die "RAPID_PG_PASSWORD must be non-empty and one line"
PG_DIR=$(realpath -m -- "$PG_DIR")
case $PG_DIR in /|/tmp|/root|/home|/usr|/var|/etc) die "refusing to use '$PG_DIR' as a data directory" ;; esac

urlencode() {  # percent-encode everything but RFC 3986 unreserved characters (bytewise)
    local LC_ALL=C s=$1 out='' c i
    for ((i = 0; i < ${#s}; i++)); do
        c=${s:i:1}
        case $c in [a-zA-Z0-9.~_-]) out+=$c ;; *) printf -v c '%%%02X' "'$c"; out+=$c ;; esac
    done
    printf '%s' "$out"
}
url() { printf 'postgresql+psycopg2://%s:%s@127.0.0.1:%s/%s\n' "$PG_ROLE" "$(urlencode "$PG_PASSWORD")" "$PG_PORT" "$PG_DB"; }

# Newest server binaries: /usr/lib/postgresql/<version>/bin (Debian/Ubuntu), else whatever is on PATH.
find_bindir() {
    local d best=''
    while read -r d; do
        [[ -x $d/postgres && -x $d/initdb && -x $d/pg_ctl ]] && best=$d
    done < <(compgen -G '/usr/lib/postgresql/*/bin' | sort -V)
    if [[ -z $best ]] && command -v initdb >/dev/null && command -v pg_ctl >/dev/null && command -v postgres >/dev/null; then
        best=$(dirname "$(command -v initdb)")
    fi
    [[ -n $best ]] && echo "$best"
}

install_postgres() {
    if ((EUID != 0)) || ! command -v apt-get >/dev/null; then
        log "PostgreSQL server binaries not found and cannot install them (needs root and apt-get); install the 'postgresql' package"
        exit 3
    fi
    log "installing PostgreSQL from apt (postgresql package)"
    # Keep apt from starting the distribution's own cluster: add a deny-all policy-rc.d for the
    # duration of the install when there is none (the usual container setup already has one).
    local policy=/usr/sbin/policy-rc.d added_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\n# temporary, added by rapid_search scripts/postgres.sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"; added_policy=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    local apt=(env DEBIAN_FRONTEND=noninteractive apt-get -y -q --no-install-recommends
               -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold install postgresql)
    local updated=0
    if ! apt-cache show postgresql >/dev/null 2>&1; then   # no package lists yet
        apt-get update -q >&2 || die "apt-get update failed"
        updated=1
    fi
    if ! "${apt[@]}" >&2; then   # stale package lists give 404s: update once and retry
        ((updated == 0)) || die "apt-get install postgresql failed"
        log "install failed; retrying after apt-get update"
        apt-get update -q >&2 || die "apt-get update failed"
        "${apt[@]}" >&2 || die "apt-get install postgresql failed"
    fi
    if ((added_policy)); then rm -f "$policy"; trap - EXIT; fi
}

# Run a command as the cluster owner.
as_owner() {
    if ((EUID != 0)); then "$@"
    elif command -v runuser >/dev/null; then runuser -u postgres -- "$@"
    else su postgres -s /bin/sh -c "$(printf '%q ' "$@")"
    fi
}

is_running() { [[ -n ${BIN:-} && -f $PG_DIR/PG_VERSION ]] && as_owner "$BIN/pg_ctl" status -D "$PG_DIR" >/dev/null 2>&1; }

psql_admin() {  # SQL on stdin, as the superuser over the unix socket in the data directory
    as_owner "$BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$PG_DIR" -p "$PG_PORT" -U postgres -d postgres "$@"
}

# Delete a data directory, but only one that is ours or at least a PostgreSQL data directory.
remove_dir() {
    [[ -e $PG_DIR ]] || return 0
    if [[ -f $PG_DIR/$MARKER || -f $PG_DIR/PG_VERSION || -z $(ls -A "$PG_DIR") ]]; then
        rm -rf -- "$PG_DIR"
    else
        die "'$PG_DIR' exists and is not a rapid-pg data directory; not deleting it (set RAPID_PG_DIR)"
    fi
}

cmd_start() {
    if ! BIN=$(find_bindir); then
        install_postgres
        BIN=$(find_bindir) || die "PostgreSQL installed but no initdb/postgres binaries found"
    fi
    if ((EUID == 0)) && ! id postgres >/dev/null 2>&1; then
        die "running as root but there is no 'postgres' user to own the server (the postgresql package creates it)"
    fi
    # The major version, read without a pipeline into head (under pipefail that can fail on SIGPIPE).
    local version=""; [[ $("$BIN/postgres" --version) =~ ([0-9]+) ]] && version=${BASH_REMATCH[1]}

    if is_running; then
        local running_port; running_port=$(sed -n 4p "$PG_DIR/postmaster.pid" 2>/dev/null || true)
        [[ $running_port == "$PG_PORT" ]] ||
            die "a server from '$PG_DIR' is already running on port ${running_port:-?}, not $PG_PORT; run '$0 stop' first"
        log "already running (PostgreSQL $version, $PG_DIR, port $PG_PORT)"
    else
        # A leftover directory (killed run, other version, interrupted initdb) is just thrown away.
        if [[ -e $PG_DIR && ( ! -f $PG_DIR/$MARKER || $(cat "$PG_DIR/PG_VERSION" 2>/dev/null) != "$version" ) ]]; then
            log "removing stale data directory $PG_DIR"
            remove_dir
        fi
        if [[ ! -e $PG_DIR ]]; then
            log "initdb $PG_DIR (PostgreSQL $version)"
            mkdir -p -- "$PG_DIR"
            ((EUID == 0)) && chown postgres: "$PG_DIR"
            chmod 700 "$PG_DIR"
            as_owner test -w "$PG_DIR" ||
                die "the postgres user cannot reach $PG_DIR (a parent directory is not traversable); set RAPID_PG_DIR, e.g. under /tmp"
            local out
            if ! out=$(as_owner "$BIN/initdb" -D "$PG_DIR" -U postgres --auth-local=trust \
                    --auth-host=scram-sha-256 -E UTF8 --locale=C --no-sync 2>&1); then
                printf '%s\n' "$out" >&2; remove_dir; die "initdb failed"
            fi
            as_owner tee -a "$PG_DIR/postgresql.conf" >/dev/null <<EOF

# --- rapid_search scripts/postgres.sh: throwaway test server ---
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_DIR'
password_encryption = 'scram-sha-256'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 200
EOF
            as_owner touch "$PG_DIR/$MARKER"
        fi
        log "starting server on 127.0.0.1:$PG_PORT"
        # 9>&-: the server must not inherit (and hold forever) the lock taken below.
        if ! as_owner "$BIN/pg_ctl" -D "$PG_DIR" -l "$PG_DIR/server.log" -w -t 60 -s start >&2 9>&-; then
            log "server log ($PG_DIR/server.log):"
            tail -n 20 "$PG_DIR/server.log" >&2 || true
            die "pg_ctl start failed (is port $PG_PORT already in use? set RAPID_PG_PORT)"
        fi
    fi

    # Role and database (idempotent). The password goes through stdin, never argv; with
    # standard_conforming_strings (the default) doubling single quotes is the only escaping needed.
    local q=${PG_PASSWORD//\'/\'\'}
    psql_admin <<EOF >&2
SET log_statement = 'none';
SELECT 'CREATE ROLE $PG_ROLE' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_ROLE')\gexec
ALTER ROLE $PG_ROLE WITH LOGIN CREATEDB PASSWORD '$q';
SELECT 'CREATE DATABASE $PG_DB OWNER $PG_ROLE' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$PG_DB')\gexec
EOF
    url
}

cmd_stop() {
    if BIN=$(find_bindir) && is_running; then
        log "stopping server ($PG_DIR)"
        as_owner "$BIN/pg_ctl" -D "$PG_DIR" -m fast -w -t 60 -s stop >&2 || die "pg_ctl stop failed"
    fi
    remove_dir
}

usage() { echo "usage: $0 {start|stop|url}" >&2; exit 2; }
(($# == 1)) || usage
cd /   # the server user may not be able to read the caller's working directory
case $1 in
    start | stop)
        # Serialise concurrent start/stop calls on the same data directory.
        if { exec 9>>"$PG_DIR.lock"; } 2>/dev/null; then   # (a bare `exec ... 2>/dev/null` would silence stderr for good)
            flock -w 300 9 || die "timed out waiting for the lock $PG_DIR.lock"
        else
            log "warning: cannot open $PG_DIR.lock; running without a lock"
        fi
        "cmd_$1" ;;
    url) url ;;
    *) usage ;;
esac
