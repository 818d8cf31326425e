# bench/lib.sh: shell functions shared by bench/run.sh, bench/audit.sh and
# bench/ratelimit.sh (sourced).  child_ticks needs $P (a scratch directory)
# and $HZ (clock ticks per second).

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
