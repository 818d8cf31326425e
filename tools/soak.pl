#!/usr/bin/perl
# Soak: mixed traffic against a real nginx with the module for DURATION
# seconds, sampling the processes as it goes.
#
#   make soak [DURATION=600]
#   SBX_BUILD=build perl tools/soak.pl --duration 600 [--clients 4]
#       [--workers 2] [--interval S] [--keep]
#
# Traffic (forked clients, t/lib/SbxLoad.pm): content-mode JSON transforms,
# rate-limited keys in Redis (one hot key that is limited), residency with
# a MaxMind DB (t/lib/SbxMMDB.pm) behind realip X-Forwarded-For (allowed
# and denied countries, an address the database does not know), and about
# 1 % hostile scripts in their own pool, in the style of t/03-limits.t:
# an infinite loop, a memory bomb, a plain error, unbounded recursion and a
# backtracking pattern that only the wall-clock timeout stops.
#
# Samples every few seconds: RSS of the workers and the helpers (table:
# "wrk RSS" mean of the workers, "hlp RSS" mean of the default pool's
# helpers, "hlp max" the largest helper of any pool), open
# descriptors of the workers, helper restarts by reason (sbx_status),
# answers by status.  Prints a table and a summary, and exits non-zero on:
#   - any answer that is not a contract status with its JSON body, any
#     transport error or answer past the deadline (SbxLoad::judge);
#   - growth after warm-up: the mean of the last third of the samples
#     against the mean of the first third, worker RSS and mean helper RSS
#     beyond 10 % + 2 MiB, worker descriptors beyond +4;
#   - a worker that died or was replaced, a crash, [alert], [crit] or
#     [emerg] in the error log;
#   - an audit chain that does not verify (tools/sbx-audit-verify).

use strict;
use warnings;

use Cwd qw(abs_path);
use File::Basename qw(dirname);
use Getopt::Long;
use lib dirname(abs_path(__FILE__)) . '/../t/lib';
use POSIX ();
use SbxLoad;
use SbxMMDB;
use SbxTest;
use Time::HiRes qw(sleep time);

my %o = (duration => 120, clients => 4, workers => 2);
GetOptions(\%o, 'duration=i', 'clients=i', 'workers=i', 'interval=f', 'keep')
    or die "usage: $0 [--duration S] [--clients N] [--workers N] "
         . "[--interval S] [--keep]\n";
$o{interval} //= $o{duration} >= 300 ? 5 : 2;
$ENV{SBX_KEEP} = 1 if $o{keep};
$| = 1;

my @fail;

sub rss_kb {
    my ($pid) = @_;
    my $st = SbxTest::slurp("/proc/$pid/status") // return 0;
    return $st =~ /^VmRSS:\s+(\d+)/m ? $1 : 0;
}

sub mean {
    return 0 unless @_;
    my $s = 0;
    $s += $_ for @_;
    return $s / @_;
}

# ---- set-up --------------------------------------------------------------------

my $t = SbxTest->new;
my $p = $t->prefix;
my $have_redis = !system('sh', '-c', 'command -v redis-server >/dev/null');
$t->redis_start if $have_redis;
SbxMMDB::write_city("$p/geo.mmdb");

$t->write_file('transform.lua', <<'EOF');
return function(req)
  local doc = req.body and json.decode(req.body) or {}
  local out = { id = req.id, items = {}, total = 0 }
  for i, item in ipairs(doc.items or {}) do
    out.items[i] = { sku = string.upper(item.sku), qty = item.qty * 2 }
    out.total = out.total + item.qty * 2
  end
  out.country = req.client.country
  return { status = 200, headers = { ["content-type"] = "application/json" },
           body = json.encode(out) }
end
EOF
$t->write_file('hello.lua', <<'EOF');
return function(req)
  return { status = 200, body = "hello " .. (req.client.country or "-") }
end
EOF
my %hostile = (
    loop      => 'while true do end',
    memory    => 'local t = {} for i = 1, 1e8 do t[i] = ("x"):rep(1000) .. i end',
    error     => 'error("connector bug")',
    recursion => 'local function f(n) return 1 + f(n + 1) end return f(1)',
    backtrack => 'local s = ("a"):rep(300) '
               . 'return {status = 200, body = tostring(s:find(("a-"):rep(4) .. "b"))}',
);
my $hostile_conf = '';
for my $name (sort keys %hostile) {
    $t->write_file("h_$name.lua", "return function(req)\n  $hostile{$name}\nend\n");
    my $limits = $name eq 'backtrack' ? 'timeout=200ms'
               : 'memory=16m instructions=1000000 timeout=2s';
    $hostile_conf .= "sbx_connector h_$name { script %%PREFIX%%/h_$name.lua; "
                   . "limits $limits; pool hostile; }\n";
}

my $redis = $have_redis
    ? "sbx_redis 127.0.0.1:%%REDIS_PORT%% timeout=100ms prefix=soak:;\n" : '';
my $hostile_locs = join('', map { "    location = /h/$_ { sbx_connector h_$_; }\n" }
                            sort keys %hostile);
$t->conf($redis . $hostile_conf . <<'EOF' . $hostile_locs . "}\n");
sbx_geoip_db %%PREFIX%%/geo.mmdb;
sbx_audit_log %%PREFIX%%/audit.log chain=on;
sbx_pool default size=4 queue=128 max_requests=20000 memory=512m;
sbx_pool hostile size=2 queue=64 memory=256m;
sbx_connector transform { script %%PREFIX%%/transform.lua; capabilities json; }
sbx_connector hello { script %%PREFIX%%/hello.lua; }
server {
    listen 127.0.0.1:%%PORT%%;
    access_log off;
    set_real_ip_from 127.0.0.1;
    real_ip_header X-Forwarded-For;
    client_body_buffer_size 64k;
    location = /status { sbx_status; }
    location /transform { sbx_connector transform; }
    location /limited {
        sbx_rate_limit key=$http_x_key rate=20r/s burst=10 name=soak;
        sbx_connector hello;
    }
    location /eu {
        sbx_residency allow eu;
        sbx_connector hello;
    }
EOF

$t->start(workers => $o{workers});
my $FULL = 6;
$t->wait_for(sub {
    my $by = $t->helpers_by_worker;
    keys %$by == $o{workers} && !grep { @$_ != $FULL } values %$by;
}, 15) or die "soak: the pools did not come up\n";

my $master = $t->master_pid;
my @workers = sort { $a <=> $b } $t->worker_pids;

# ---- traffic ---------------------------------------------------------------------

my %A = %SbxMMDB::ADDR;
my $items = join(',', map { qq({"sku":"sku-$_","qty":$_}) } 1 .. 20);
my @requests = (
    { tag => 'transform', path => '/transform', method => 'POST', weight => 40,
      headers => { 'Content-Type' => 'application/json',
                   'X-Forwarded-For' => $A{fr} },
      content => qq({"items":[$items]}),
      allow => [200, 503], codes => { 503 => ['overloaded'] },
      body => qr/"total":420\b.*"country":"FR"|"country":"FR".*"total":420\b/ },
    { tag => 'limited', path => '/limited', weight => 20,
      headers => sub { { 'X-Key' => 'k' . int(rand 500) } },
      allow => [200, 429, 503], codes => { 503 => ['overloaded'] },
      body => qr/^hello / },
    { tag => 'limited-hot', path => '/limited', weight => 5,
      headers => { 'X-Key' => 'hot' },
      allow => [200, 429, 503], codes => { 503 => ['overloaded'] },
      body => qr/^hello / },
    { tag => 'eu-allowed', path => '/eu', weight => 15,
      headers => sub { { 'X-Forwarded-For' => (rand() < 0.5 ? $A{de_by} : $A{at}) } },
      allow => [200, 503], codes => { 503 => ['overloaded'] },
      body => qr/^hello (?:DE|AT)$/ },
    { tag => 'eu-denied', path => '/eu', weight => 10,
      headers => sub { { 'X-Forwarded-For' =>
                         (rand() < 0.7 ? $A{us_ny} : $A{none}) } },
      allow => [451] },
    (map { +{ tag => "hostile-$_", path => "/h/$_", weight => 0.2,
              allow => [$_ eq 'backtrack' ? 504 : 500, 503],
              codes => { 503 => ['overloaded'] } } } sort keys %hostile),
);

my $load = SbxLoad->new(t => $t, name => 'soak', clients => $o{clients},
                        timeout => 15, deadline => 10, requests => \@requests,
                        max_time => $o{duration} + 60);

sub metrics {
    my $m = $t->get('/status', { timeout => 5 })->{content} // '';
    my (%restarts, %decisions);
    while ($m =~ /^sbx_helper_restarts_total\{([^}]*)\}\s+(\d+)$/mg) {
        my ($l, $v) = ($1, $2);
        my ($reason) = $l =~ /reason="([^"]*)"/;
        $restarts{$reason // '?'} += $v;
    }
    while ($m =~ /^sbx_requests_total\{([^}]*)\}\s+(\d+)$/mg) {
        my ($l, $v) = ($1, $2);
        my ($d) = $l =~ /decision="([^"]*)"/;
        $decisions{$d // '?'} += $v;
    }
    return (\%restarts, \%decisions);
}

sub sample {
    my ($t0, $prog) = @_;
    my @w = $t->worker_pids;
    my $by = $t->helpers_by_worker;
    my @h = map { @$_ } values %$by;
    # the pools differ in memory= (the helper's third argument): the
    # hostile pool's helpers swing with the memory bombs, the trend is
    # taken on the others
    my @good = grep { (SbxTest::slurp("/proc/$_/cmdline") // '') =~ /\x00536870912\x00?\z/ } @h;
    my ($restarts, $decisions) = metrics();
    my $restarts_n = 0;
    $restarts_n += $_ for values %$restarts;
    return {
        t          => time - $t0,
        workers    => join(' ', sort { $a <=> $b } @w),
        worker_rss => mean(map { rss_kb($_) } @w),
        worker_fds => mean(grep { $_ >= 0 } map { SbxTest::fd_count($_) } @w),
        helpers    => scalar @h,
        helper_rss => mean(map { rss_kb($_) } @good),
        helper_max => (sort { $b <=> $a } map { rss_kb($_) } @h)[0] // 0,
        restarts   => $restarts_n,
        restart_by => $restarts,
        decisions  => $decisions,
        total      => $prog->{total},
        status     => { %{ $prog->{status} } },
    };
}

print "soak: $o{duration}s, $o{clients} clients, $o{workers} workers, "
    . ($have_redis ? 'Redis' : 'no Redis (shm limiter)') . ", prefix $p\n";

my $t0 = time;
$load->start;
my @samples;
my $next = $t0 + $o{interval};
while (time < $t0 + $o{duration}) {
    my $sl = $next - time;
    sleep $sl if $sl > 0;
    $next += $o{interval};
    push @samples, sample($t0, $load->progress);
    my $s = $samples[-1];
    if ($s->{workers} ne join(' ', @workers)) {
        push @fail, sprintf('workers changed at %.0fs: %s -> %s', $s->{t},
                            join(' ', @workers), $s->{workers});
        last;
    }
}
my $res = $load->stop;
my $elapsed = time - $t0;

# ---- table -------------------------------------------------------------------------

sub pct {
    my ($s, @codes) = @_;
    my $n = 0;
    $n += $s->{$_} // 0 for @codes;
    return $n;
}

my @rows;
my $step = @samples > 24 ? int(@samples / 24 + 0.999) : 1;
my $prev = { t => 0, total => 0 };
print "\n";
printf "%7s %8s %10s %9s %8s %10s %10s %9s %8s %8s %8s %6s\n",
    't(s)', 'req/s', 'wrk RSS', 'wrk fds', 'helpers', 'hlp RSS', 'hlp max',
    'restarts', '200', '429', '451', '5xx';
for my $i (0 .. $#samples) {
    my $s = $samples[$i];
    if ($i % $step == $step - 1 || $i == $#samples) {
        my $rate = ($s->{total} - $prev->{total}) / (($s->{t} - $prev->{t}) || 1);
        printf "%7.0f %8.0f %8.1fMB %9.1f %8d %8.1fMB %8.1fMB %9d %8d %8d %8d %6d\n",
            $s->{t}, $rate, $s->{worker_rss} / 1024, $s->{worker_fds},
            $s->{helpers}, $s->{helper_rss} / 1024, $s->{helper_max} / 1024,
            $s->{restarts}, pct($s->{status}, 200), pct($s->{status}, 429),
            pct($s->{status}, 451), pct($s->{status}, 500, 502, 503, 504);
        $prev = $s;
    }
}

# ---- verdicts ------------------------------------------------------------------------

my $warm = $o{duration} * 0.2 < 10 ? 10 : $o{duration} * 0.2;
my @after = grep { $_->{t} >= $warm } @samples;
my %trend;
if (@after >= 6) {
    my $third = int(@after / 3);
    my @first = @after[0 .. $third - 1];
    my @last = @after[$#after - $third + 1 .. $#after];
    for my $k (qw(worker_rss helper_rss worker_fds)) {
        $trend{$k} = [ mean(map { $_->{$k} } @first),
                       mean(map { $_->{$k} } @last) ];
    }
    my ($a, $b) = @{ $trend{worker_rss} };
    push @fail, sprintf('worker RSS grows: %.1f -> %.1f MB', $a / 1024, $b / 1024)
        if $b > $a * 1.10 + 2048;
    ($a, $b) = @{ $trend{helper_rss} };
    push @fail, sprintf('helper RSS grows: %.1f -> %.1f MB', $a / 1024, $b / 1024)
        if $b > $a * 1.10 + 2048;
    ($a, $b) = @{ $trend{worker_fds} };
    push @fail, sprintf('worker descriptors grow: %.1f -> %.1f', $a, $b)
        if $b > $a + 4;
} else {
    push @fail, 'too few samples after warm-up for a trend ('
              . scalar(@after) . '): run longer';
}

push @fail, "$res->{violations} answers broke the contract:\n    "
          . join("\n    ", @{ $res->{samples} })
    if $res->{violations};
push @fail, "$res->{clients_failed} load clients failed" if $res->{clients_failed};
push @fail, 'no traffic' unless $res->{total};
push @fail, 'the master is gone or was replaced'
    unless ($t->master_pid // 0) == $master;
my @now = sort { $a <=> $b } $t->worker_pids;
push @fail, "workers changed: @workers -> @now" unless "@now" eq "@workers";

my $final = sample($t0, $res);
my @bad = grep { /\[alert\]|\[emerg\]|\[crit\]|exited on signal/ }
          split /\n/, $t->error_log;
push @fail, scalar(@bad) . " alert/crit/emerg/crash lines in the error log:\n    "
          . join("\n    ", @bad[0 .. ($#bad > 9 ? 9 : $#bad)]) if @bad;

# the audit chain: one line per connector request, verified
$t->stop;
my ($rc, $out) = $t->run_cmd([SbxTest::root() . '/tools/sbx-audit-verify',
                              "$p/audit.log"], timeout => 600);
chomp $out;
push @fail, "audit chain: $out" unless $rc == 0;

# ---- summary ----------------------------------------------------------------------------

print "\n";
printf "requests      %d in %.0fs (%.0f/s), slowest answer %.3fs\n",
    $res->{total}, $res->{elapsed}, $res->{total} / ($res->{elapsed} || 1),
    $res->{max_s};
print 'statuses      ', SbxLoad::summary($res), "\n";
for my $tag (sort keys %{ $res->{tags} }) {
    my $c = $res->{tags}{$tag};
    printf "  %-18s %s\n", $tag,
        join(', ', map { "$_: $c->{$_}" } sort keys %$c);
}
my $h = 0;
$h += $res->{tags}{$_}{$_ =~ /backtrack/ ? 504 : 500} // 0
    for grep { /^hostile/ } keys %{ $res->{tags} };
printf "hostile       %.2f %% of requests\n", 100 * $h / ($res->{total} || 1);
print 'decisions     ', join(', ', map { "$_: $final->{decisions}{$_}" }
                                   sort keys %{ $final->{decisions} }), "\n";
print 'restarts      ', join(', ', map { "$_: $final->{restart_by}{$_}" }
                                   sort keys %{ $final->{restart_by} }), "\n";
for my $k (sort keys %trend) {
    my ($a, $b) = @{ $trend{$k} };
    my $unit = $k =~ /rss/ ? 'MB' : '';
    my $div = $k =~ /rss/ ? 1024 : 1;
    printf "%-13s %.1f%s -> %.1f%s (first vs last third after %.0fs warm-up)\n",
        $k, $a / $div, $unit, $b / $div, $unit, $warm;
}
print "audit         $out\n";
if (@fail) {
    print "\nSOAK FAILED:\n", map { "  - $_\n" } @fail;
    $t->cleanup;
    POSIX::_exit(1);
}
print "\nSOAK PASSED\n";
$t->cleanup;
POSIX::_exit(0);
