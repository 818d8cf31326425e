#!/usr/bin/perl
# Chaos: Redis killed (SIGKILL), restarted, paused (CLIENT PAUSE) and made
# slow (DEBUG SLEEP from another connection, short and long) while forked
# clients keep sending rate-limited requests through two workers with
# sbx_redis timeout=50ms.  No answer may wait past the deadline (with
# slack) or be anything but a contract status: 200 or 429 rate_limited,
# and on `closed` routes 503 ratelimit_unavailable.  The fallbacks behave
# as documented (docs/directives.md, ngx_http_sbx_ratelimit.c): `local`
# keeps enforcing the limit in shared memory, `open` allows, `closed`
# answers 503; once Redis answers again the limits are counted in Redis
# again.  The workers survive and hold no more descriptors than before.

use strict;
use warnings;

use lib 't/lib';
use IO::Socket::INET;
use POSIX ();
use SbxLoad;
use SbxTest;
use Test::More;
use Time::HiRes qw(sleep time);

sub metric {
    my ($text, $name) = @_;
    return $text =~ /^\Q$name\E\s+(\d+)$/m ? $1 : undef;
}

my $t = SbxTest->new;
my @redis_args = (args => ['--enable-debug-command', 'yes']);
$t->redis_start(@redis_args);
my $rport = $t->redis_port;

$t->write_file('html/index.html', "ok\n");
$t->write_file('hello.lua',
    "return function(req) return {status=200, body='hello'} end\n");

$t->conf(<<'EOF');
sbx_redis 127.0.0.1:%%REDIS_PORT%% timeout=50ms connect_timeout=200ms prefix=t71:;
sbx_pool default size=2 queue=64;
sbx_connector hello { script %%PREFIX%%/hello.lua; }
server {
    listen 127.0.0.1:%%PORT%%;
    root %%PREFIX%%/html;
    location = /status { access_log off; sbx_status; }
    location /local {
        sbx_rate_limit key=$http_x_key rate=50r/s burst=20 name=lo;
        sbx_rate_limit_fallback local;
        sbx_connector hello;
    }
    location /open {
        sbx_rate_limit key=$http_x_key rate=50r/s burst=20 name=op;
        sbx_rate_limit_fallback open;
        try_files /index.html =404;
    }
    location /closed {
        sbx_rate_limit key=$http_x_key rate=50r/s burst=20 name=cl;
        sbx_rate_limit_fallback closed;
        try_files /index.html =404;
    }
    location /tight {
        sbx_rate_limit key=$http_x_key rate=1r/h burst=2 name=ti;
        sbx_rate_limit_fallback local;
        try_files /index.html =404;
    }
}
EOF

$t->start(workers => 2);

sub hget {
    my ($path, $key) = @_;
    my $t0 = time;
    my $r = $t->get($path, { headers => { 'X-Key' => $key }, timeout => 10 });
    return wantarray ? ($r, time - $t0) : $r;
}

# how long recovery may take: the circuit probes at most every 2 s, and a
# probe fails while Redis answers slower than timeout=50ms (a loaded
# machine); each worker has its own circuit
my $RECOVER = 30;

my $seq = 0;
sub fresh { return 'fresh' . ++$seq . "-$$" }

# the limit is counted in Redis: a request on a fresh key leaves its TAT
sub counted_in_redis {
    my ($path, $name) = @_;
    my $k = fresh();
    my $r = hget($path, $k);
    return 0 unless $r->{status} == 200;
    return $t->redis_cli('EXISTS', "t71:$name:$k") eq '1';
}

ok($t->wait_for(sub { counted_in_redis('/closed', 'cl') }, $RECOVER),
   'Redis counts the limits at start');
for (1 .. 5) { hget($_, 'warm') for qw(/local /open /closed /tight) }

my $master = $t->master_pid;
my @workers = $t->worker_pids;
sleep 0.3;
my %fd_before = map { $_ => SbxTest::fd_count($_) } @workers;

my @keys = map { "k$_" } 1 .. 40;
my $key = sub { { 'X-Key' => $keys[rand @keys] } };
# a request waits for Redis at most timeout=50ms, then the fallback
# decides; the deadline leaves a wide margin for a loaded machine
my $DEADLINE = 2;
my $load = SbxLoad->new(
    t => $t, name => 'redis', clients => 4, timeout => 10,
    deadline => $DEADLINE,
    requests => [
        { tag => 'local', path => '/local', headers => $key,
          allow => [200, 429], body => qr/^hello$/ },
        { tag => 'open', path => '/open', headers => $key,
          allow => [200, 429], body => qr/^ok$/ },
        { tag => 'closed', path => '/closed', headers => $key,
          allow => [200, 429, 503], body => qr/^ok$/,
          codes => { 503 => ['ratelimit_unavailable'] } },
    ],
);
$load->start;
sleep 3;

sub tagcount {
    my ($p, $tag, $st) = @_;
    return $p->{tags}{$tag}{$st} // 0;
}

my $m = sub { $t->get('/status')->{content} // '' };

# ---- killed ------------------------------------------------------------------

{
    my $fb0 = metric($m->(), 'sbx_ratelimit_fallback_total') // 0;
    my $p0 = $load->progress;
    kill 'KILL', $t->{redis_pid};
    $t->redis_stop;            # reaps it
    my $t0 = time;

    my ($r, $took) = hget('/local', 'during-kill');
    is($r->{status}, 200, 'Redis killed: the local fallback answers');
    cmp_ok($took, '<', $DEADLINE, sprintf('within the deadline (%.3fs)', $took));

    my $k = fresh();
    my @st = map { hget('/tight', $k)->{status} } 1 .. 4;
    is("@st", '200 200 429 429',
       'Redis killed: fallback local enforces the limit (burst=2)');

    my $c = hget('/closed', fresh());
    $t->error_ok($c, 503, 'ratelimit_unavailable',
                 'Redis killed: fallback closed answers 503');
    is(hget('/open', fresh())->{status}, 200, 'Redis killed: fallback open allows');

    sleep(5 - (time - $t0)) if time - $t0 < 5;
    my $p1 = $load->progress;
    cmp_ok(tagcount($p1, 'closed', 503) - tagcount($p0, 'closed', 503), '>', 0,
           'the clients saw 503 on the closed route while Redis was down');
    cmp_ok(tagcount($p1, 'open', 200) - tagcount($p0, 'open', 200), '>', 0,
           'and 200 on the open route');
    my $fb1 = metric($m->(), 'sbx_ratelimit_fallback_total') // 0;
    cmp_ok($fb1, '>', $fb0, "fallback decisions counted ($fb0 -> $fb1)");
}

# ---- restarted ---------------------------------------------------------------

{
    $t->redis_start(port => $rport, @redis_args);
    ok($t->wait_for(sub { counted_in_redis('/closed', 'cl') }, $RECOVER),
       'Redis restarted: limits counted in Redis again');
    ok($t->wait_for(sub { counted_in_redis('/local', 'lo') }, $RECOVER),
       'on the local-fallback route too');
    sleep 2;
}

# ---- paused ------------------------------------------------------------------

{
    $t->redis_cli('CLIENT', 'PAUSE', '3000', 'ALL');
    my $t0 = time;
    my ($r, $took) = hget('/local', fresh());
    is($r->{status}, 200, 'Redis paused: the fallback answers');
    cmp_ok($took, '<', 1, sprintf('long before Redis wakes (%.3fs)', $took));
    my $k = fresh();
    my @st = map { hget('/tight', $k)->{status} } 1 .. 3;
    is("@st", '200 200 429', 'Redis paused: the local fallback enforces the limit');
    sleep(3.2 - (time - $t0)) if time - $t0 < 3.2;
    ok($t->wait_for(sub { counted_in_redis('/closed', 'cl') }, $RECOVER),
       'after the pause: counted in Redis again');
    sleep 1;
}

# ---- slow: DEBUG SLEEP from another connection, back to back ------------------

sub sleeper {
    my ($secs, $for) = @_;
    my $pid = fork // die "fork: $!";
    if ($pid == 0) {
        my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
                                      PeerPort => $rport, Proto => 'tcp')
            or POSIX::_exit(1);
        my $end = time + $for;
        my $cmd = "*3\r\n\$5\r\nDEBUG\r\n\$5\r\nSLEEP\r\n\$"
                . length($secs) . "\r\n$secs\r\n";
        while (time < $end) {
            print {$s} $cmd;
            my $line = <$s>;
            last unless defined $line && $line =~ /^\+OK/;
        }
        POSIX::_exit(0);
    }
    return $pid;
}

{
    # replies come late but mostly within timeout=50ms
    my $pid = sleeper('0.03', 5);
    sleep 0.5;
    my @t;
    for (1 .. 10) {
        my ($r, $took) = hget('/closed', fresh());
        push @t, $took;
        ok($r->{status} == 200 || $r->{status} == 503,
           "Redis slow (30ms): 200 or 503 ($r->{status})");
    }
    my ($max) = sort { $b <=> $a } @t;
    cmp_ok($max, '<', $DEADLINE, sprintf('slowest %.3fs', $max));
    waitpid($pid, 0);
    is($?, 0, 'the 30ms sleeper ran');
}

{
    # replies later than timeout=50ms: the fallback decides, the circuit
    # opens, and the deadline still holds
    my $len = length $t->error_log;
    my $pid = sleeper('0.2', 5);
    sleep 0.5;
    my ($r, $took) = hget('/local', fresh());
    is($r->{status}, 200, 'Redis slow (200ms): the local fallback answers');
    cmp_ok($took, '<', 1, sprintf('without waiting for Redis (%.3fs)', $took));
    waitpid($pid, 0);
    is($?, 0, 'the 200ms sleeper ran');
    like(substr($t->error_log, $len), qr/circuit open, rate limits use the fallback/,
         'the circuit opened');
    ok($t->wait_for(sub { counted_in_redis('/closed', 'cl') }, $RECOVER),
       'Redis fast again: counted in Redis again');
    like(substr($t->error_log, $len), qr/answers again, circuit closed/,
         'recovery logged');
    sleep 1;
}

# ---- killed once more, with a restart right away --------------------------------

{
    for my $i (1 .. 3) {
        kill 'KILL', $t->{redis_pid};
        $t->redis_stop;
        sleep 0.3;
        $t->redis_start(port => $rport, @redis_args);
        sleep 0.7;
    }
    ok($t->wait_for(sub { counted_in_redis('/closed', 'cl') }, $RECOVER),
       'after three quick kill/restart cycles: counted in Redis again');
    sleep 1;
}

my $res = $load->stop;
note(sprintf('%d requests in %.1fs: %s; slowest %.3fs', $res->{total},
             $res->{elapsed}, SbxLoad::summary($res), $res->{max_s}));
for my $tag (sort keys %{ $res->{tags} }) {
    my $c = $res->{tags}{$tag};
    note("  $tag: " . join(', ', map { "$_: $c->{$_}" } sort keys %$c));
}

cmp_ok($res->{total}, '>', 500, "the clients ran ($res->{total} requests)");
is($res->{clients_failed}, 0, 'every client ran to the end');
is($res->{violations}, 0, "every answer a contract status with its body, "
   . "within ${DEADLINE}s, no transport error")
    or diag(join("\n", @{ $res->{samples} }));
cmp_ok($res->{tags}{closed}{503} // 0, '>', 0, 'closed route: 503s seen');
cmp_ok($res->{tags}{closed}{200} // 0, '>', 0, 'closed route: 200s seen');

is($t->master_pid, $master, 'same master');
is_deeply([ $t->worker_pids ], \@workers, 'same workers: none died');

my %fd_after;
ok($t->wait_for(sub {
    %fd_after = map { $_ => SbxTest::fd_count($_) } @workers;
    !grep { $fd_after{$_} > $fd_before{$_} + 2 } @workers;
}, 10), 'no descriptor growth in the workers')
    or diag(join(', ', map { "$_: $fd_before{$_} -> $fd_after{$_}" } @workers));
note(join(', ', map { "worker $_ fds $fd_before{$_} -> $fd_after{$_}" } @workers));

my $mt = $m->();
cmp_ok(metric($mt, 'sbx_redis_errors_total') // 0, '>', 0,
       'Redis errors counted');

$t->stop;
$t->check_error_log;
$t->redis_stop;

done_testing;
