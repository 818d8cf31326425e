#!/bin/sh
# Rate-limit benchmark (issue 3): a small static file (a content-phase
# answer: `return` answers in the rewrite phase, before any access-phase
# check runs) behind
#
#   /base       nothing
#   /limitreq   nginx limit_req, rate=1000000r/s burst=100000 nodelay on
#               $binary_remote_addr (never rejects)
#   /sbx        sbx_rate_limit key=$binary_remote_addr rate=1000000r/s with
#               sbx_redis (never rejects: burst = rate)
#   /lua        access_by_lua_block + lua-resty-redis (Debian lua-nginx-redis)
#               running the same GCRA script with EVALSHA, the same ARGV,
#               a keep-alive connection pool (set_keepalive) and the same
#               RateLimit-Policy / RateLimit headers
#   /flood      sbx_rate_limit key=flood rate=1r/h burst=1 (a fixed key):
#               the first request passes, the second is denied by Redis,
#               every later one by the deny cache; 429 is the expected answer
#
# One nginx (one worker) with all five locations, Debian's lua-nginx-module
# loaded as in bench/run.sh, and a private redis-server (no persistence) on
# a free loopback port in a temporary prefix; both are stopped at the end.
# The GCRA script for /lua is taken from the module's source
# (ngx_sbx_module/ngx_http_sbx_ratelimit.c), so both sides send Redis the
# same text; the run checks that Redis holds exactly one script after both
# have called it.  wrk GETs each target in interleaved rounds; per target
# the median req/s, p50, p99, the CPU per request of the nginx worker, of
# redis-server and of wrk (/proc), and the Redis commands per request from
# `INFO commandstats` deltas (EVALSHA, and all commands including the GET,
# SET and TIME the script runs).
#
# usage: bench/ratelimit.sh
# env:   BUILD (module directory, default <repo>/build), NGINX (binary),
#        DURATION (seconds per run, default 3), ROUNDS (default 3),
#        CONNECTIONS (wrk, default 64), THREADS (wrk, default 1),
#        WARMUP (seconds per target, default 1), KEEP=1 (keep the prefix)
# Targets: sbx/lua >= 1.2; flood/limitreq >= 0.9.
# Default run time: about 55 s.

set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/bench/lib.sh"
BUILD=${BUILD:-$ROOT/build}
NGINX_BIN=${NGINX:-/usr/sbin/nginx}
unset NGINX     # nginx reads $NGINX as a list of inherited sockets
DURATION=${DURATION:-3}
DURATION=${DURATION%s}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-1}
WARMUP=${WARMUP:-1}
KEEP=${KEEP:-0}
NGX_MODULES=${NGX_MODULES:-/usr/lib/nginx/modules}
TARGETS="base limitreq sbx lua flood"
NT=5

die() { echo "ratelimit.sh: $*" >&2; exit 1; }

for c in wrk curl redis-server redis-cli perl; do
    command -v $c >/dev/null \
        || die "$c is missing (sh tools/install-deps.sh bench)"
done
[ -x "$NGINX_BIN" ] || die "no nginx at $NGINX_BIN"
[ -e "$BUILD/ngx_http_sbx_module.so" ] \
    || die "$BUILD/ngx_http_sbx_module.so is missing (make BUILD=$BUILD)"
for f in ndk_http_module.so ngx_http_lua_module.so; do
    [ -e "$NGX_MODULES/$f" ] || die "$NGX_MODULES/$f is missing" \
        "(Debian libnginx-mod-http-lua)"
done
[ -e /usr/share/lua/5.1/resty/redis.lua ] \
    || [ -e /usr/share/lua/5.1/nginx/redis.lua ] \
    || die "lua-resty-redis is missing (Debian lua-nginx-redis)"
BUILD=$(cd "$BUILD" && pwd)

P=$(mktemp -d /tmp/sbx-bench-XXXXXXXX)
chmod 755 "$P"      # workers run as an unprivileged user when started as root
NGX_PID=""
REDIS_PID=""

stop_pid() {    # stop_pid PID SIGNAL
    kill -"$2" "$1" 2>/dev/null || return 0
    i=0
    while kill -0 "$1" 2>/dev/null && [ $i -lt 50 ]; do
        sleep 0.1; i=$((i + 1))
    done
    kill -KILL "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

cleanup() {
    [ -n "$NGX_PID" ] && stop_pid "$NGX_PID" QUIT
    NGX_PID=""
    [ -n "$REDIS_PID" ] && stop_pid "$REDIS_PID" TERM
    REDIS_PID=""
    if [ "$KEEP" = 1 ]; then
        echo "ratelimit.sh: prefix kept in $P"
    else
        rm -rf "$P"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

PORT=$(free_port)
RPORT=$(free_port)
[ "$RPORT" != "$PORT" ] || RPORT=$(free_port)
URL=http://127.0.0.1:$PORT

# ---------------------------------------------------------------- redis

redis-server --bind 127.0.0.1 --port "$RPORT" --dir "$P" \
    --save '' --appendonly no --daemonize no \
    --logfile "$P/redis.log" --pidfile "$P/redis.pid" &
REDIS_PID=$!
RCLI="redis-cli -h 127.0.0.1 -p $RPORT"
i=0
until $RCLI ping >/dev/null 2>&1; do
    i=$((i + 1))
    [ $i -le 50 ] && kill -0 "$REDIS_PID" 2>/dev/null \
        || { tail -5 "$P/redis.log" >&2; die "redis-server did not start"; }
    sleep 0.1
done

# The module's GCRA script, from its C string literal.
perl -0ne '
    /ngx_http_sbx_rl_script\[\]\s*=\s*(.*?);\n/s or exit 1;
    my ($b, $s) = ($1, "");
    while ($b =~ /"((?:[^"\\]|\\.)*)"/g) {
        my $x = $1; $x =~ s/\\n/\n/g; $x =~ s/\\(["\\\x27])/$1/g; $s .= $x;
    }
    print $s' "$ROOT/ngx_sbx_module/ngx_http_sbx_ratelimit.c" > "$P/gcra.lua" \
    || die "no GCRA script in ngx_http_sbx_ratelimit.c"
chmod 644 "$P/gcra.lua"

# ---------------------------------------------------------------- nginx

printf 'ok\n' > "$P/ok.txt"
chmod 644 "$P/ok.txt"

cat > "$P/nginx.conf" <<EOF
# generated by bench/ratelimit.sh
load_module $NGX_MODULES/ndk_http_module.so;
load_module $NGX_MODULES/ngx_http_lua_module.so;
load_module $BUILD/ngx_http_sbx_module.so;

daemon off;
worker_processes 1;
error_log $P/error.log warn;
pid $P/nginx.pid;

events { worker_connections 1024; }

http {
    access_log off;
    client_body_temp_path $P/client_body_temp;
    proxy_temp_path $P/proxy_temp;
    fastcgi_temp_path $P/fastcgi_temp;
    uwsgi_temp_path $P/uwsgi_temp;
    scgi_temp_path $P/scgi_temp;
    keepalive_requests 1000000;
    default_type text/plain;

    sbx_redis 127.0.0.1:$RPORT;
    limit_req_zone \$binary_remote_addr zone=bench:1m rate=1000000r/s;

    init_by_lua_block {
        local ok, redis = pcall(require, "resty.redis")
        if not ok then
            redis = require "nginx.redis"   -- Debian's lua-nginx-redis
        end
        BENCH_REDIS = redis
        local f = assert(io.open("$P/gcra.lua"))
        BENCH_GCRA = f:read("*a")
        f:close()
        BENCH_SHA = nil
    }

    server {
        listen 127.0.0.1:$PORT;

        location = /base {
            alias $P/ok.txt;
        }

        location = /limitreq {
            limit_req zone=bench burst=100000 nodelay;
            alias $P/ok.txt;
        }

        location = /sbx {
            sbx_rate_limit key=\$binary_remote_addr rate=1000000r/s name=bench;
            alias $P/ok.txt;
        }

        location = /lua {
            access_by_lua_block {
                -- what sbx_rate_limit key=\$binary_remote_addr
                -- rate=1000000r/s name=bench does with sbx_redis
                local red = BENCH_REDIS:new()
                red:set_timeout(50)
                local ok, err = red:connect("127.0.0.1", $RPORT)
                if not ok then
                    ngx.log(ngx.ERR, "redis connect: ", err)
                    return ngx.exit(503)
                end
                local key = "lua:rl:bench:" .. ngx.var.binary_remote_addr
                local res
                if BENCH_SHA then
                    res, err = red:evalsha(BENCH_SHA, 1, key,
                                           "1", "1000000", "1")
                end
                if not BENCH_SHA or (not res and err
                                     and err:find("NOSCRIPT", 1, true)) then
                    BENCH_SHA, err = red:script("load", BENCH_GCRA)
                    if BENCH_SHA then
                        res, err = red:evalsha(BENCH_SHA, 1, key,
                                               "1", "1000000", "1")
                    end
                end
                if not res then
                    ngx.log(ngx.ERR, "redis evalsha: ", err)
                    return ngx.exit(503)
                end
                red:set_keepalive(60000, 256)
                ngx.header["RateLimit-Policy"] = '"bench";q=1000000;w=1'
                ngx.header["RateLimit"] = '"bench";r=' .. res[3]
                    .. ';t=' .. math.ceil(res[4] / 1000000)
                if res[1] == 0 then
                    ngx.header["Retry-After"] = math.ceil(res[5] / 1000000)
                    return ngx.exit(429)
                end
            }
            alias $P/ok.txt;
        }

        location = /flood {
            sbx_rate_limit key=flood rate=1r/h burst=1 name=flood;
            alias $P/ok.txt;
        }
    }
}
EOF

"$NGINX_BIN" -p "$P/" -c "$P/nginx.conf" -e "$P/error.log" &
NGX_PID=$!

i=0
until curl -s -o /dev/null "$URL/base"; do
    i=$((i + 1))
    if [ $i -gt 50 ] || ! kill -0 "$NGX_PID" 2>/dev/null; then
        tail -20 "$P/error.log" >&2
        die "nginx did not start"
    fi
    sleep 0.1
done

WORKER=$(pgrep -P "$NGX_PID" | head -1)
[ -n "$WORKER" ] || die "no nginx worker"

# ---------------------------------------------------------------- checks

check() {   # check TARGET EXPECTED_STATUS HEADER_REGEX
    got=$(curl -s -D "$P/hdr.$1" -o "$P/body.$1" -w '%{http_code}' \
          "$URL/$1") || die "curl $URL/$1 failed"
    [ "$got" = "$2" ] || die "/$1 answered $got, expected $2:" \
        "$(head -c 200 "$P/body.$1")"
    [ -z "$3" ] || grep -qiE "$3" "$P/hdr.$1" \
        || die "/$1: no header matching '$3': $(cat "$P/hdr.$1")"
}
check base 200 ''
check limitreq 200 ''
check sbx 200 '^RateLimit: "bench";r=[0-9]+'
check lua 200 '^RateLimit: "bench";r=[0-9]+'
check flood 200 '^RateLimit: "flood";r=0'
check flood 429 '^Retry-After: [0-9]+'
check flood 429 '^Retry-After: [0-9]+'
grep -q '^ok$' "$P/body.sbx" && grep -q '^ok$' "$P/body.lua" \
    || die "/sbx or /lua did not serve the static file"
nscripts=$($RCLI info memory | tr -d '\r' \
           | awk -F: '$1 == "number_of_cached_scripts" { print $2 }')
[ "$nscripts" = 1 ] || die "Redis holds $nscripts scripts, expected 1" \
    "(the module's and the Lua baseline's script differ)"
[ "$($RCLI --raw keys 'lua:rl:bench:*' | wc -l)" = 1 ] \
    || die "no Redis key for /lua: $($RCLI --raw keys '*')"
[ "$($RCLI --raw keys 'sbx:rl:bench:*' | wc -l)" = 1 ] \
    || die "no Redis key for /sbx: $($RCLI --raw keys '*')"

# ---------------------------------------------------------------- timing

HZ=$(getconf CLK_TCK)

redis_calls() { # redis_calls: "evalsha all" calls so far (INFO excluded)
    $RCLI info commandstats | tr -d '\r' | awk -F'[:=,]' '
        /^cmdstat_/ {
            if ($1 != "cmdstat_info") all += $3
            if ($1 == "cmdstat_evalsha") ev = $3
        }
        END { printf "%d %d\n", ev, all }'
}

wrk_run() {     # wrk_run TARGET SECONDS OUTFILE
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$2s" --latency "$URL/$1" \
        > "$3" 2>&1 || { cat "$3" >&2; die "wrk failed on /$1"; }
}

# one result line: rps p50_us p99_us non2xx sockerr requests
#   worker_us/req redis_us/req wrk_us/req busy% other% evalsha/req cmds/req
measure() {     # measure TARGET ROUND
    out=$P/wrk.$1.$2
    set -- "$1" "$2" $(redis_calls)
    child_ticks > "$P/c0"
    w0=$(proc_ticks "$WORKER"); r0=$(proc_ticks "$REDIS_PID"); b0=$(cpu_busy)
    wrk_run "$1" "$DURATION" "$out"
    w1=$(proc_ticks "$WORKER"); r1=$(proc_ticks "$REDIS_PID"); b1=$(cpu_busy)
    child_ticks > "$P/c1"
    set -- "$1" "$2" "$3" "$4" $(redis_calls)
    awk -v hz="$HZ" -v secs="$DURATION" -v ncpu="$(nproc)" \
        -v dw=$((w1 - w0)) -v dr=$((r1 - r0)) \
        -v dc=$(($(cat "$P/c1") - $(cat "$P/c0"))) -v db=$((b1 - b0)) \
        -v dev=$(($5 - $3)) -v dall=$(($6 - $4)) '
        function us(v) {
            if (v ~ /us$/) return v + 0
            if (v ~ /ms$/) return v * 1000
            if (v ~ /s$/)  return v * 1000000
            if (v ~ /m$/)  return v * 60000000
            return v + 0
        }
        /^Requests\/sec/              { rps = $2 }
        /^ +50% /                     { p50 = us($2) }
        /^ +99% /                     { p99 = us($2) }
        /Non-2xx or 3xx responses/    { non = $NF }
        /Socket errors/ {
            gsub(",", ""); err = $4 + $6 + $8 + $10
        }
        / requests in /               { reqs = $1 }
        END {
            if (reqs < 1) reqs = 1
            tick = 1000000 / hz
            printf "%s %d %d %d %d %d %.1f %.1f %.1f %.0f %.0f %.4f %.4f\n",
                rps, p50, p99, non + 0, err + 0, reqs,
                dw * tick / reqs, dr * tick / reqs, dc * tick / reqs,
                db * 100 / (hz * secs * ncpu),
                (db - dw - dr - dc) * 100 / (hz * secs * ncpu),
                dev / reqs, dall / reqs
        }' "$out" >> "$P/res.$1"
}

echo "ratelimit: nginx $("$NGINX_BIN" -v 2>&1 | sed 's,.*/,,'), 1 worker" \
     "(pid $WORKER), $(redis-server --version | awk '{ print $3 }' \
     | sed 's/v=/redis /') on 127.0.0.1:$RPORT (pid $REDIS_PID)," \
     "lua-nginx-module + lua-resty-redis in the same nginx"
echo "ratelimit: wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s --latency, GET" \
     "of a 3-byte static file; $ROUNDS interleaved rounds after ${WARMUP}s" \
     "warm-up per target (load average before: $(cut -d' ' -f1-3 /proc/loadavg))"
echo "ratelimit: checks passed: headers set, /flood denied after 1 request," \
     "one GCRA script in Redis shared by /sbx and /lua"

if [ "$WARMUP" -gt 0 ]; then
    for t in $TARGETS; do
        wrk_run "$t" "$WARMUP" "$P/warmup.$t"
    done
fi

r=1
while [ "$r" -le "$ROUNDS" ]; do
    # rotate the order each round so no target always runs first
    order=$(echo $TARGETS $TARGETS | awk -v k="$r" -v n=$NT '{
        s = ""; for (i = 0; i < n; i++) s = s " " $(((k - 1) % n) + 1 + i); print s }')
    for t in $order; do
        measure "$t" "$r"
    done
    printf 'ratelimit: round %d/%d done\n' "$r" "$ROUNDS"
    r=$((r + 1))
done

# ---------------------------------------------------------------- report

echo
echo "Medians over $ROUNDS rounds of ${DURATION}s (wrk, nginx and redis-server" \
     "share the $(nproc) CPUs; CPU us/request from /proc; Redis commands per" \
     "request from INFO commandstats, all = including the script's GET/SET/TIME)"
printf '%-9s %9s %8s %8s %8s %9s %7s %9s %8s %7s %6s %6s %8s %7s\n' target \
    req/s p50_us p99_us non-2xx requests sockerr worker_us redis_us wrk_us \
    busy% other% evalsha all_cmd
for t in $TARGETS; do
    f=$P/res.$t
    printf '%-9s %9.0f %8.0f %8.0f %8d %9d %7d %9.1f %8.1f %7.1f %6.0f %6.0f %8.3f %7.3f\n' \
        "$t" "$(median_col "$f" 1)" "$(median_col "$f" 2)" \
        "$(median_col "$f" 3)" "$(sum_col "$f" 4)" "$(sum_col "$f" 6)" \
        "$(sum_col "$f" 5)" "$(median_col "$f" 7)" "$(median_col "$f" 8)" \
        "$(median_col "$f" 9)" "$(median_col "$f" 10)" \
        "$(median_col "$f" 11)" "$(median_col "$f" 12)" \
        "$(median_col "$f" 13)"
done
echo "(non-2xx, requests and sockerr: totals over all rounds; non-2xx on" \
     "/flood are the expected 429s; busy%: all CPUs; other%: CPU of processes" \
     "outside this benchmark)"

echo
echo "per round (req/s p50_us p99_us):"
for t in $TARGETS; do
    printf '  %-9s' "$t"
    awk '{ printf "  [%.0f %d %d]", $1, $2, $3 }' "$P/res.$t"
    echo
done

# every target but /flood must answer 200 only; /flood 429 only
for t in base limitreq sbx lua; do
    n=$(sum_col "$P/res.$t" 4)
    [ "$n" -eq 0 ] || echo "WARNING: /$t had $n non-2xx answers"
done
nf=$(sum_col "$P/res.flood" 4); rf=$(sum_col "$P/res.flood" 6)
[ "$nf" -eq "$rf" ] || echo "WARNING: /flood: $nf of $rf answers were 429"

echo
other=$(cat "$P"/res.* | awk '{ print $11 }' | sort -g | awk '{ a[NR] = $1 }
        END { print a[int((NR + 1) / 2)] }')
awk -v a="$(median_col "$P/res.base" 1)" \
    -v b="$(median_col "$P/res.limitreq" 1)" \
    -v c="$(median_col "$P/res.sbx" 1)" -v d="$(median_col "$P/res.lua" 1)" \
    -v e="$(median_col "$P/res.flood" 1)" \
    -v cw="$(median_col "$P/res.sbx" 7)" -v dw="$(median_col "$P/res.lua" 7)" \
    -v other="$other" 'BEGIN {
    if (other > 10)
        printf "WARNING: other processes used %d%% of the CPUs during the runs:" \
            " throughput figures are distorted; the CPU per request is the" \
            " steadier figure\n", other
    busy = (other > 10) ? ", not conclusive: machine busy" : ""
    printf "nginx worker CPU per request: sbx %.1f us, lua %.1f us\n", cw, dw
    printf "sbx_rate_limit+Redis / OpenResty+lua-resty-redis: %.2f" \
        "  (target >= 1.2: %s)\n", c / d, (c / d >= 1.2 ? "met" : "MISSED") busy
    printf "flood (deny cache) / limit_req:                    %.2f" \
        "  (target >= 0.9: %s)\n", e / b, (e / b >= 0.9 ? "met" : "MISSED") busy
    printf "limit_req / no limit: %.2f; sbx_rate_limit+Redis / no limit: %.2f\n",
        b / a, c / a
}'

bad=$(grep -cE '\[(alert|emerg|crit|error)\]' "$P/error.log" || true)
[ "$bad" -eq 0 ] || { echo "ratelimit.sh: error log has $bad error/alert lines:";
                      grep -E '\[(alert|emerg|crit|error)\]' "$P/error.log" \
                          | head -5; }
