#!/bin/sh
# Residency benchmark (issue 4): throughput of a small static file with and
# without a residency rule evaluated on every request.  The baseline is a
# content-phase answer (a static file), not `return`: `return` answers in
# the rewrite phase, before any access-phase check runs.
#
# usage: bench/residency.sh [seconds per run, default 5] [rounds, default 5]
# env:   BUILD (module directory, default <repo>/build), NGINX, WRK_THREADS,
#        WRK_CONNECTIONS
# Target: the rule costs <= 3% of throughput.

set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/bench/lib.sh"
BUILD=${BUILD:-$ROOT/build}
NGINX=${NGINX:-/usr/sbin/nginx}
SECS=${1:-5}
ROUNDS=${2:-5}
THREADS=${WRK_THREADS:-1}
CONNS=${WRK_CONNECTIONS:-16}

command -v wrk >/dev/null || {
    echo "residency.sh: wrk is missing (tools/install-deps.sh bench)" >&2
    exit 1
}

P=$(mktemp -d /tmp/sbx-bench-XXXXXXXX)
chmod 755 "$P"    # workers run as an unprivileged user
trap '[ -f "$P/nginx.pid" ] && kill -QUIT "$(cat "$P/nginx.pid")" 2>/dev/null;
      sleep 0.5; rm -rf "$P"' EXIT

PORT=$(free_port)

perl -I"$ROOT/t/lib" -MSbxMMDB -e 'SbxMMDB::write_city($ARGV[0])' \
    "$P/city.mmdb"
printf 'ok\n' > "$P/ok.txt"
chmod 644 "$P/ok.txt" "$P/city.mmdb"

cat > "$P/nginx.conf" <<EOF
load_module $BUILD/ngx_http_sbx_module.so;
worker_processes 1;
error_log $P/error.log warn;
pid $P/nginx.pid;
events { worker_connections 1024; }
http {
    access_log off;
    sbx_helper_path $BUILD/sbx-lua-helper;
    sbx_geoip_db $P/city.mmdb;
    server {
        listen 127.0.0.1:$PORT;
        default_type text/plain;
        set_real_ip_from 127.0.0.1;
        real_ip_header X-Forwarded-For;
        location = /base { alias $P/ok.txt; }
        location = /rule {
            sbx_residency deny US;
            sbx_residency allow eu;
            alias $P/ok.txt;
        }
    }
}
EOF

"$NGINX" -p "$P/" -c "$P/nginx.conf" -e "$P/error.log"
sleep 0.5

# a German client: both rules are walked, the second one matches
check=$(curl -s -o /dev/null -w '%{http_code}' \
        -H 'X-Forwarded-For: 5.1.0.10' "http://127.0.0.1:$PORT/rule")
[ "$check" = 200 ] || { echo "residency.sh: /rule answered $check" >&2;
                        exit 1; }

run() {
    wrk -t"$THREADS" -c"$CONNS" -d"${SECS}s" -H 'X-Forwarded-For: 5.1.0.10' \
        "http://127.0.0.1:$PORT/$1" | awk '/^Requests\/sec/ { print $2 }'
}

wrk -t1 -c4 -d1s "http://127.0.0.1:$PORT/base" >/dev/null   # warm up

base=""
rule=""
i=0
while [ $i -lt "$ROUNDS" ]; do
    base="$base $(run base)"
    rule="$rule $(run rule)"
    i=$((i + 1))
done

median() {
    printf '%s\n' "$@" | sort -n | awk '{ a[NR] = $1 }
        END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}

# shellcheck disable=SC2086
b=$(median $base)
# shellcheck disable=SC2086
r=$(median $rule)

echo "static file, no rule:        $b req/s  (runs:$base)"
echo "static file, residency rule: $r req/s  (runs:$rule)"
awk -v b="$b" -v r="$r" 'BEGIN {
    cost = (b - r) / b * 100;
    printf "residency rule cost: %.2f%% of throughput (target <= 3%%)\n", cost;
}'
