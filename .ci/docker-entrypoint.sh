#!/usr/bin/env bash
# The entry point of the test image (see Dockerfile): starts PostgreSQL, MariaDB and Faktory,
# then runs the full test suite against them. Arguments are passed on to `cargo test`.
#
# Servers that already answer are left alone, so the script can also be run by hand on a
# machine that has them.
set -euo pipefail
cd "$(dirname "$0")/.."

: "${FAKTORY_BIN:=/usr/local/bin/faktory}"
export PG_DATABASE_URL="${PG_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
export MYSQL_DATABASE_URL="${MYSQL_DATABASE_URL:-mysql://root@127.0.0.1:3306/test}"
export FAKTORY_URL="${FAKTORY_URL:-tcp://127.0.0.1:7419}"

log() { printf '=== %s\n' "$*"; }

# Waits up to a minute for a command to succeed.
wait_for() {
    local what=$1
    shift
    for _ in $(seq 120); do
        if "$@" >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.5
    done
    echo "$what did not start" >&2
    return 1
}

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

log "PostgreSQL"
if ! pg_isready -h 127.0.0.1 -p 5432 -q; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start
    wait_for PostgreSQL pg_isready -h 127.0.0.1 -p 5432 -q
fi
if ! psql -h 127.0.0.1 -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'test'" | grep -q 1; then
    createdb -h 127.0.0.1 -U postgres test
fi

log "MariaDB"
if ! mysqladmin -uroot ping >/dev/null 2>&1; then
    install -d -o mysql -g mysql /run/mysqld
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd -- \
        --user=mysql --bind-address=127.0.0.1 --port=3306
    wait_for MariaDB mysqladmin -uroot ping
fi
# The tests' default URL connects as root over TCP without a password. A fresh Debian
# install lets root in through the socket only: open TCP logins from this host, once.
if ! mysql -uroot -h127.0.0.1 -e 'SELECT 1' >/dev/null 2>&1; then
    mysql -uroot <<'SQL'
CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' IDENTIFIED BY '';
GRANT ALL PRIVILEGES ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION;
ALTER USER 'root'@'localhost' IDENTIFIED VIA unix_socket OR mysql_native_password USING PASSWORD('');
SQL
fi
mysql -uroot -h127.0.0.1 -e 'CREATE DATABASE IF NOT EXISTS test'

log "Faktory"
faktory_host=${FAKTORY_URL#*://}
faktory_host=${faktory_host#*@}
faktory_port=${faktory_host##*:}
faktory_host=${faktory_host%:*}
if ! port_open "$faktory_host" "$faktory_port"; then
    # Development mode: no password; its storage (and Redis) under $HOME/.faktory.
    "$FAKTORY_BIN" -b "$faktory_host:$faktory_port" -w "$faktory_host:7420" >/tmp/faktory.log 2>&1 &
    if ! wait_for Faktory port_open "$faktory_host" "$faktory_port"; then
        cat /tmp/faktory.log >&2
        exit 1
    fi
fi

log "cargo test --all-features $*"
exec cargo test --all-features --frozen "$@"
