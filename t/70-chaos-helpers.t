#!/usr/bin/perl
# Chaos: helpers SIGKILLed at random, at a high rate, while forked clients
# keep two workers busy (content mode on two pools, connector mode around
# proxy_pass).  Every answer must be a contract status with the JSON error
# body (200, or 502 sandbox_failure, 503 overloaded, 504), none may wait
# past its bound (queue wait + timeout + grace, with slack) or fail at the
# transport level; afterwards the pools are back to full size, no helper is
# left a zombie, the workers hold no more descriptors than before, and they
# are the same workers (none died).
#
# SBX_CHAOS_SECONDS (default 25) sets how long the killer runs,
# SBX_CHAOS_MIN_KILLS (default 1000) how many kills it must land.

use strict;
use warnings;

use lib 't/lib';
use SbxLoad;
use SbxTest;
use Test::More;
use Time::HiRes qw(sleep time);

my $KILL_SECONDS = $ENV{SBX_CHAOS_SECONDS} // 25;
# how many helpers must have been killed; a much slower build (sanitizers)
# may lower it, the count is printed either way
my $MIN_KILLS = $ENV{SBX_CHAOS_MIN_KILLS} // 1000;

sub proc_state {
    my ($pid) = @_;
    my $stat = SbxTest::slurp("/proc/$pid/stat") // return '';
    return $stat =~ /\)\s+(\S)/ ? $1 : '';
}

# every child of $pid, zombies included (the kernel's own list)
sub children {
    my ($pid) = @_;
    my @kids;
    opendir my $dh, "/proc/$pid/task" or return ();
    for my $tid (grep { /^\d+$/ } readdir $dh) {
        my $c = SbxTest::slurp("/proc/$pid/task/$tid/children") // '';
        push @kids, split ' ', $c;
    }
    closedir $dh;
    return @kids;
}

sub zombies_of {
    my (@workers) = @_;
    return grep { proc_state($_) eq 'Z' } map { children($_) } @workers;
}

sub metric_sum {
    my ($text, $re) = @_;
    my $sum = 0;
    $sum += $1 while $text =~ /^$re\s+(\d+)$/mg;
    return $sum;
}

my $t = SbxTest->new;

# some work per call, so that kills land on busy helpers too
$t->write_file('echo.lua', <<'EOF');
return function(req)
  local n = 0
  for i = 1, 20000 do n = n + i end
  return { status = 200, headers = { ["content-type"] = "application/json" },
           body = json.encode({ ok = true, n = n, uri = req.uri }) }
end
EOF
$t->write_file('busy.lua', <<'EOF');
return function(req)
  local t0 = os.clock()
  while os.clock() - t0 < 0.002 do end
  return { status = 200, body = "busy" }
end
EOF
$t->write_file('resp.lua', <<'EOF');
return {
  request = function(req) return req end,
  response = function(res, req)
    res.body = "wrapped:" .. (res.body or "")
    return res
  end,
}
EOF
$t->write_file('html/up/data', "upstream\n");

$t->conf(<<'EOF');
sbx_pool default size=4 queue=64;
sbx_pool b size=3 queue=32;
sbx_connector echo { script %%PREFIX%%/echo.lua; capabilities json; limits timeout=1s; }
sbx_connector busy { script %%PREFIX%%/busy.lua; pool b; limits timeout=1s; }
sbx_connector resp { script %%PREFIX%%/resp.lua; limits timeout=1s; }
upstream backend { server 127.0.0.1:%%PORT2%%; keepalive 4; }
server {
    listen 127.0.0.1:%%PORT2%%;
    access_log off;
    root %%PREFIX%%/html;
}
server {
    listen 127.0.0.1:%%PORT%%;
    location /echo { sbx_connector echo; }
    location /busy { sbx_connector busy; }
    location /up/ { sbx_connector resp; proxy_pass http://backend; }
    location = /status { access_log off; sbx_status; }
}
EOF

$t->start(workers => 2);

my $FULL = 7;    # 4 + 3 helpers per worker
ok($t->wait_for(sub {
    my $by = $t->helpers_by_worker;
    keys %$by == 2 && !grep { @$_ != $FULL } values %$by;
}, 10), "each worker has its $FULL helpers");

# warm up with one connection at a time, then measure at rest
for (1 .. 10) {
    is($t->get($_)->{status}, 200, "warm-up $_") for qw(/echo /busy /up/data);
}
is($t->get('/up/data')->{content}, "wrapped:upstream\n",
   'connector mode wraps the upstream answer');

my $master = $t->master_pid;
my @workers = $t->worker_pids;
is(scalar @workers, 2, 'two workers');
sleep 0.5;
my %fd_before = map { $_ => SbxTest::fd_count($_) } @workers;
my $m0 = $t->get('/status')->{content} // '';
my $restarts0 = metric_sum($m0, qr/sbx_helper_restarts_total\{[^}]*reason="signal"[^}]*\}/);

# bound of one request: wait in the queue (max(timeout, 1s)) + the call
# (timeout + 50ms + 10%), here 2.15s; the deadline adds generous slack
my $load = SbxLoad->new(
    t => $t, name => 'chaos', clients => 5, timeout => 15, deadline => 6,
    requests => [
        { tag => 'echo', path => '/echo', weight => 3,
          allow => [200, 502, 503, 504], body => qr/^\{.*"ok":true/ },
        { tag => 'busy', path => '/busy', weight => 2,
          allow => [200, 502, 503, 504], body => qr/^busy$/ },
        { tag => 'conn', path => '/up/data', weight => 1,
          allow => [200, 502, 503, 504], body => qr/^wrapped:upstream\n$/ },
    ],
);
$load->start;
sleep 1;

# The killer.  Phase 1: a random ready helper (seccomp filter installed:
# its scripts are loaded) of a random worker every ~8ms, a pace below the
# pools' crash-loop guard (more than 10 x size deaths a second delays the
# respawn by 1s), so that the pools keep respawning at once and thousands
# of kills land.  Phase 2: any helper at all, as fast as the loop goes:
# helpers killed while starting (their respawn backs off) and the crash-loop
# guard.
my ($kills, %killed) = (0);
my %phase_kills;
for my $phase (1, 2) {
    my $secs = $phase == 1 ? $KILL_SECONDS * 0.8 : $KILL_SECONDS * 0.2;
    my $t0 = time;
    while (time - $t0 < $secs) {
        my $w = $workers[rand @workers];
        my @h = grep { proc_state($_) =~ /^[RSD]$/ } children($w);
        @h = grep {
            (SbxTest::slurp("/proc/$_/status") // '') =~ /^Seccomp:\t2$/m
        } @h if $phase == 1;
        if (@h) {
            my $pid = $h[rand @h];
            if (kill 'KILL', $pid) {
                $kills++;
                $phase_kills{$phase}++;
                $killed{$pid} = 1;
            }
        }
        sleep($phase == 1 ? 0.008 : 0.001);
    }
}
my $killing = $KILL_SECONDS;
sleep 1;
my $res = $load->stop;

my $unique = keys %killed;
note(sprintf('%d SIGKILLs (%d helpers) in %.1fs, %d requests: %s',
             $kills, $unique, $killing, $res->{total}, SbxLoad::summary($res)));
note(sprintf('slowest answer %.3fs', $res->{max_s}));
diag("chaos: $kills kills of $unique helpers in ${\ sprintf '%.1f', $killing}s; "
     . "$res->{total} requests (" . SbxLoad::summary($res) . ')')
    if $ENV{TEST_VERBOSE};

note("phase 1 (ready helpers, paced): " . ($phase_kills{1} // 0) . ' kills; '
     . 'phase 2 (any helper, unpaced): ' . ($phase_kills{2} // 0) . ' kills');
cmp_ok($unique, '>=', $MIN_KILLS, "at least $MIN_KILLS helpers killed ($unique)");
cmp_ok($res->{total}, '>', 1000, "the clients ran ($res->{total} requests)");
is($res->{clients_failed}, 0, 'every client ran to the end');
is($res->{violations}, 0, 'every answer a contract status with its JSON '
   . 'body, in time, no transport error')
    or diag(join("\n", @{ $res->{samples} }));
cmp_ok($res->{status}{200} // 0, '>', 0, 'requests succeeded under fire');
cmp_ok($res->{status}{502} // 0, '>', 0,
       'kills hit requests in flight (502 sandbox_failure seen)');

# --- afterwards ------------------------------------------------------------

is($t->master_pid, $master, 'same master');
is_deeply([ $t->worker_pids ], \@workers, 'same workers: none died');

my $by;
ok($t->wait_for(sub {
    $by = $t->helpers_by_worker;
    keys %$by == 2 && !grep { @$_ != $FULL } values %$by;
}, 25), "pools back to full size ($FULL helpers per worker)")
    or diag(explain($by));

my @z;
ok($t->wait_for(sub { @z = zombies_of(@workers); !@z }, 5),
   'no zombie children of the workers') or diag("zombies: @z");

for my $round (1 .. 3) {
    my @st = map { $t->get($_)->{status} } qw(/echo /busy /up/data) x 5;
    is("@st", join(' ', (200) x 15), "the pools serve again (round $round)");
}

my %fd_after;
ok($t->wait_for(sub {
    %fd_after = map { $_ => SbxTest::fd_count($_) } @workers;
    !grep { $fd_after{$_} > $fd_before{$_} + 2 } @workers;
}, 10), 'no descriptor growth in the workers')
    or diag(join(', ', map { "$_: $fd_before{$_} -> $fd_after{$_}" } @workers));
note(join(', ', map { "worker $_ fds $fd_before{$_} -> $fd_after{$_}" } @workers));

my $m1 = $t->get('/status')->{content} // '';
my $restarts = metric_sum($m1, qr/sbx_helper_restarts_total\{[^}]*reason="signal"[^}]*\}/)
             - $restarts0;
cmp_ok($restarts, '>=', $unique,
       "sbx_helper_restarts_total{reason=signal} grew by every killed helper "
       . "($restarts >= $unique)");
my ($gd) = $m1 =~ /^sbx_helpers\{pool="default"\}\s+(\d+)$/m;
my ($gb) = $m1 =~ /^sbx_helpers\{pool="b"\}\s+(\d+)$/m;
is($gd, 8, 'sbx_helpers{pool="default"} is 8 again');
is($gb, 6, 'sbx_helpers{pool="b"} is 6 again');

my @helpers = $t->helper_pids;
$t->stop;
ok(!grep({ SbxTest->alive($_) } @helpers, @workers),
   'no helper or worker left after stop');
$t->check_error_log;

done_testing;
