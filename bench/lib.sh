# bench/lib.sh: shell functions shared by the scripts of bench/ (sourced).
# child_ticks and measure_worker need $P (a scratch directory) and $HZ
# (clock ticks per second).

free_port() {
    perl -MIO::Socket::INET -e \
        'print IO::Socket::INET->new(LocalAddr => "127.0.0.1", LocalPort => 0,
                                     Listen => 1, ReuseAddr => 1)->sockport'
}

canon_eq() {    # canon_eq FILE1 FILE2: same JSON value
    perl -MJSON::PP -e '
        my $j = JSON::PP->new->canonical;
        my @v = map { local $/; open my $f, "<", $_ or die; $j->encode($j->decode(<$f>)) } @ARGV;
        exit($v[0] eq $v[1] ? 0 : 1)' "$1" "$2" 2>/dev/null
}

proc_ticks() {  # utime+stime of PID, or 0
    awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0
}

helper_ticks() {    # helper_ticks WORKER: live helpers and reaped ones
    s=$(awk '{ print $16 + $17 }' "/proc/$1/stat")
    for h in $(pgrep -P "$1"); do
        s=$((s + $(proc_ticks "$h")))
    done
    echo "$s"
}

cpu_busy() {    # all CPUs: busy ticks (not idle, not iowait)
    awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat
}

child_ticks() { # CPU of this shell's reaped children (wrk), in ticks
    times > "$P/times"      # a builtin: runs in this shell, not a subshell
    awk -v hz="$HZ" 'NR == 2 {
        t = 0
        for (i = 1; i <= 2; i++) { split($i, a, "m"); t += a[1] * 60 + a[2] }
        printf "%d\n", t * hz + 0.5 }' "$P/times"
}

median_col() {  # median_col FILE COLUMN
    awk -v c="$2" '{ print $c }' "$1" | sort -g | awk '{ a[NR] = $1 }
        END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}

sum_col() {     # sum_col FILE COLUMN
    awk -v c="$2" '{ s += $c } END { print s + 0 }' "$1"
}

wrk_stats() {   # wrk_stats WRK_OUTPUT: "rps p50_us p99_us non2xx sockerr requests"
    awk '
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
            printf "%s %d %d %d %d %d\n", rps, p50, p99, non + 0, err + 0, reqs
        }' "$1"
}

stop_pid() {    # stop_pid PID [SIGNAL]: SIGNAL (QUIT), then KILL after 5 s
    kill -"${2:-QUIT}" "$1" 2>/dev/null || return 0
    i=0
    while kill -0 "$1" 2>/dev/null && [ $i -lt 50 ]; do
        sleep 0.1; i=$((i + 1))
    done
    kill -KILL "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

wait_http() {   # wait_http URL PID ERROR_LOG: until URL answers (5 s)
    i=0
    until curl -s -o /dev/null "$1"; do
        i=$((i + 1))
        if [ $i -gt 50 ] || ! kill -0 "$2" 2>/dev/null; then
            tail -20 "$3" >&2
            return 1
        fi
        sleep 0.1
    done
}

conf_main() {   # conf_main DIR [lua]: main context of a one-worker bench
    if [ "${2:-}" = lua ]; then     # nginx; lua: with lua-nginx-module too
        echo "load_module $NGX_MODULES/ndk_http_module.so;"
        echo "load_module $NGX_MODULES/ngx_http_lua_module.so;"
    fi
    cat <<CONF
load_module $BUILD/ngx_http_sbx_module.so;

daemon off;
worker_processes 1;
error_log $1/error.log warn;
pid $1/nginx.pid;

events { worker_connections 1024; }
CONF
}

conf_http() {   # conf_http DIR: http-level lines every bench nginx shares
    cat <<CONF
    access_log off;
    client_body_temp_path $1/client_body_temp;
    proxy_temp_path $1/proxy_temp;
    fastcgi_temp_path $1/fastcgi_temp;
    uwsgi_temp_path $1/uwsgi_temp;
    scgi_temp_path $1/scgi_temp;
    keepalive_requests 1000000;
CONF
}

# measure_worker TARGET ROUND: one wrk run (the caller's wrk_run) with the
# CPU of $WORKER and its helpers; appends to $P/res.TARGET
#   rps p50_us p99_us non2xx sockerr requests
#   worker_us/req helpers_us/req wrk_us/req busy% other%
measure_worker() {
    out=$P/wrk.$1.$2
    child_ticks > "$P/c0"
    w0=$(proc_ticks "$WORKER"); h0=$(helper_ticks "$WORKER"); b0=$(cpu_busy)
    wrk_run "$1" "$DURATION" "$out"
    w1=$(proc_ticks "$WORKER"); h1=$(helper_ticks "$WORKER"); b1=$(cpu_busy)
    child_ticks > "$P/c1"
    c0=$(cat "$P/c0"); c1=$(cat "$P/c1")
    wrk_stats "$out" > "$P/stats"
    awk -v hz="$HZ" -v secs="$DURATION" -v ncpu="$(nproc)" \
        -v dw=$((w1 - w0)) -v dh=$((h1 - h0)) -v dc=$((c1 - c0)) \
        -v db=$((b1 - b0)) '{
            tick = 1000000 / hz
            printf "%s %d %d %d %d %d %.1f %.1f %.1f %.0f %.0f\n",
                $1, $2, $3, $4, $5, $6,
                dw * tick / $6, dh * tick / $6, dc * tick / $6,
                db * 100 / (hz * secs * ncpu),
                (db - dw - dh - dc) * 100 / (hz * secs * ncpu)
        }' "$P/stats" >> "$P/res.$1"
}

report_worker() {   # report_worker TARGETS...: medians and rounds table
    echo "Medians over $ROUNDS rounds of ${DURATION}s (wrk shares the" \
         "$(nproc) CPUs with nginx and the helpers; CPU us/request from /proc)"
    printf '%-10s %10s %9s %9s %9s %7s %9s %9s %9s %6s %6s\n' target req/s \
        p50_us p99_us non-2xx sockerr worker_us helper_us wrk_us busy% other%
    for t in "$@"; do
        f=$P/res.$t
        printf '%-10s %10.0f %9.0f %9.0f %9d %7d %9.1f %9.1f %9.1f %6.0f %6.0f\n' \
            "$t" "$(median_col "$f" 1)" "$(median_col "$f" 2)" \
            "$(median_col "$f" 3)" "$(sum_col "$f" 4)" "$(sum_col "$f" 5)" \
            "$(median_col "$f" 7)" "$(median_col "$f" 8)" \
            "$(median_col "$f" 9)" "$(median_col "$f" 10)" \
            "$(median_col "$f" 11)"
    done
    echo "(non-2xx and sockerr: totals over all rounds; busy%: both CPUs;" \
         "other%: CPU of processes outside this benchmark)"
    echo
    echo "per round (req/s p50_us p99_us):"
    for t in "$@"; do
        printf '  %-10s' "$t"
        awk '{ printf "  [%.0f %d %d]", $1, $2, $3 }' "$P/res.$t"
        echo
    done
}

start_nginx() { # start_nginx DIR URL [LABEL]: nginx on DIR/nginx.conf until
    # URL answers; sets NGX_PID (added to PIDS) and WORKER, its one worker
    "$NGINX_BIN" -p "$1/" -c "$1/nginx.conf" -e "$1/error.log" &
    NGX_PID=$!
    PIDS="$PIDS $NGX_PID"
    wait_http "$2" "$NGX_PID" "$1/error.log" \
        || die "nginx${3:+ ($3)} did not start"
    WORKER=$(pgrep -P "$NGX_PID" | head -1)
    [ -n "$WORKER" ] || die "no nginx worker${3:+ ($3)}"
}

warm_up() {     # warm_up TARGETS...: wrk_run each for $WARMUP s, not measured
    [ "$WARMUP" -gt 0 ] || return 0
    for t in "$@"; do
        wrk_run "$t" "$WARMUP" "$P/warmup.$t"
    done
}

run_rounds() {  # run_rounds MEASURE TARGETS...: $ROUNDS rounds of MEASURE
    m=$1; shift  # TARGET ROUND, the order rotated so no target always leads
    r=1
    while [ "$r" -le "$ROUNDS" ]; do
        for t in $(rotate "$r" "$@"); do
            "$m" "$t" "$r"
        done
        printf '%s: round %d/%d done\n' "${BENCH_NAME%.sh}" "$r" "$ROUNDS"
        r=$((r + 1))
    done
}

rotate() {      # rotate ROUND ITEMS...: the items, starting at ROUND's turn
    k=$1; shift
    n=$#
    echo "$@ $*" | awk -v k="$k" -v n="$n" '{
        s = ""; for (i = 0; i < n; i++) s = s " " $(((k - 1) % n) + 1 + i)
        print s }'
}

die() { echo "${BENCH_NAME:-bench}: $*" >&2; exit 1; }

# bench_setup NAME DURATION ROUNDS WARMUP [COMMAND...]: what every script
# of bench/ starts with (sourced from it, $ROOT set).  Sets the defaults
# of the environment it does not set (BUILD, NGINX_BIN, DURATION, ROUNDS,
# WARMUP, CONNECTIONS, THREADS, POOL_SIZE, PIPELINE, KEEP, NGX_MODULES),
# checks wrk, curl, perl and the COMMANDs, the nginx binary and the build,
# and makes the scratch prefix $P.  At exit every pid in $PIDS gets QUIT,
# every one in $TERM_PIDS TERM, then $P and the directories in $RM_DIRS
# are removed (kept with KEEP=1).
bench_setup() {
    BENCH_NAME=$1
    BUILD=${BUILD:-$ROOT/build}
    NGINX_BIN=${NGINX:-/usr/sbin/nginx}
    unset NGINX     # nginx reads $NGINX as a list of inherited sockets
    DURATION=${DURATION:-$2}
    DURATION=${DURATION%s}
    ROUNDS=${ROUNDS:-$3}
    WARMUP=${WARMUP:-$4}
    shift 4
    CONNECTIONS=${CONNECTIONS:-64}
    THREADS=${THREADS:-1}
    POOL_SIZE=${POOL_SIZE:-2}
    PIPELINE=${PIPELINE:-4}
    KEEP=${KEEP:-0}
    NGX_MODULES=${NGX_MODULES:-/usr/lib/nginx/modules}

    for c in wrk curl perl "$@"; do
        command -v "$c" >/dev/null \
            || die "$c is missing (sh tools/install-deps.sh bench)"
    done
    [ -x "$NGINX_BIN" ] || die "no nginx at $NGINX_BIN"
    for f in "$BUILD/ngx_http_sbx_module.so" "$BUILD/sbx-lua-helper"; do
        [ -e "$f" ] || die "$f is missing (make BUILD=$BUILD)"
    done
    BUILD=$(cd "$BUILD" && pwd)

    P=$(mktemp -d /tmp/sbx-bench-XXXXXXXX)
    chmod 755 "$P"  # workers run as an unprivileged user when started as root
    PIDS=""
    TERM_PIDS=""
    RM_DIRS=""
    trap bench_cleanup EXIT
    trap 'exit 130' INT TERM
}

bench_cleanup() {
    for pid in $PIDS; do
        stop_pid "$pid"
    done
    for pid in $TERM_PIDS; do
        stop_pid "$pid" TERM
    done
    PIDS=""
    TERM_PIDS=""
    if [ "$KEEP" = 1 ]; then
        echo "$BENCH_NAME: prefix kept in $P"
    else
        rm -rf "$P" $RM_DIRS
    fi
}

need_lua_module() {     # the lua-nginx-module baseline of run, connector, ratelimit
    for f in ndk_http_module.so ngx_http_lua_module.so; do
        [ -e "$NGX_MODULES/$f" ] || die "$NGX_MODULES/$f is missing" \
            "(Debian libnginx-mod-http-lua: sh tools/install-deps.sh bench)"
    done
}
