#!/usr/bin/perl
# Rate limits in Redis: a real redis-server on a loopback port.  Exact
# counts, several limits, two nginx instances sharing one budget, the deny
# cache (no Redis call for a denied key), NOSCRIPT after SCRIPT FLUSH, Redis
# paused (the per-command deadline holds) and killed (fallback local, open,
# closed; recovery), password, db and unix socket.

use strict;
use warnings;

use lib 't/lib';
use SbxTest;
use Test::More;
use POSIX qw(WNOHANG);
use Time::HiRes qw(time sleep);

my $t = SbxTest->new;
$t->redis_start;
my $rport = $t->redis_port;

$t->write_file('html/index.html', "ok\n");

my $locations = <<'EOF';
    root %%PREFIX%%/html;

    location = /status { sbx_status; }

    location /basic {
        sbx_rate_limit key=$http_x_key rate=5r/m burst=3 name=basic;
        try_files /index.html =404;
    }
    location /multi {
        sbx_rate_limit key=$http_x_key rate=10r/m burst=5 name=per_key;
        sbx_rate_limit key=$http_x_tenant rate=6r/m burst=2 name=per_tenant;
        try_files /index.html =404;
    }
    location /shared {
        sbx_rate_limit key=$http_x_key rate=1r/h burst=10 name=shared;
        try_files /index.html =404;
    }
    location /local {
        sbx_rate_limit key=$http_x_key rate=1r/h burst=2 name=fl;
        sbx_rate_limit_fallback local;
        try_files /index.html =404;
    }
    location /open {
        sbx_rate_limit key=$http_x_key rate=1r/h burst=1 name=fo;
        sbx_rate_limit_fallback open;
        try_files /index.html =404;
    }
    location /closed {
        sbx_rate_limit key=$http_x_key rate=1r/h burst=100 name=fc;
        sbx_rate_limit_fallback closed;
        try_files /index.html =404;
    }
EOF

sub conf_for {
    my ($port) = @_;
    return <<"EOF";
sbx_redis 127.0.0.1:$port timeout=50ms connect_timeout=200ms prefix=t31:;
server {
    listen 127.0.0.1:%%PORT%%;
$locations
}
EOF
}

$t->conf(conf_for($rport));
$t->start(workers => 2);

sub hget {
    my ($inst, $path, %h) = @_;
    return $inst->get($path, { headers => \%h });
}

sub hdr {
    my ($r, $name) = @_;
    my $v = $r->{headers}{lc $name};
    return ref $v ? join(', ', @$v) : $v;
}

sub cmdstat {
    my ($cmd) = @_;
    my $info = $t->redis_cli('INFO', 'commandstats');
    return $info =~ /^cmdstat_\Q$cmd\E:calls=(\d+)/m ? $1 : 0;
}

sub statuses { return [map { $_->{status} } @_] }

# ---- counts, headers, keys in Redis -----------------------------------

{
    my @r = map { hget($t, '/basic', 'X-Key' => 'k1') } 1 .. 5;
    is_deeply(statuses(@r), [200, 200, 200, 429, 429],
              'Redis GCRA: burst=3 then 429');
    is(hdr($r[0], 'RateLimit-Policy'), '"basic";q=3;w=36', 'policy');
    like(hdr($r[0], 'RateLimit') // '', qr/^"basic";r=2;t=1[12]$/,
         'RateLimit from the script');
    $t->error_ok($r[3], 429, 'rate_limited', '429 JSON body');
    my $ra = hdr($r[3], 'Retry-After') // '';
    ok($ra =~ /^\d+$/ && $ra >= 11 && $ra <= 12, "Retry-After $ra");

    my $v = $t->redis_cli('GET', 't31:basic:k1');
    like($v, qr/^\d{15,}$/, 'TAT stored under prefix:name:key');
    my $ttl = $t->redis_cli('PTTL', 't31:basic:k1');
    ok($ttl > 0 && $ttl <= 37000, "key expires with its TAT ($ttl ms)");
}

{
    my @r = map { hget($t, '/multi', 'X-Key' => "m$_", 'X-Tenant' => 't1') }
            1 .. 3;
    is_deeply(statuses(@r), [200, 200, 429], 'several limits, one call');
    like(hdr($r[0], 'RateLimit') // '',
         qr/^"per_key";r=4;t=\d+, "per_tenant";r=1;t=\d+$/,
         'one item per limit');
    is($t->redis_cli('EXISTS', 't31:per_key:m3'), '0',
       'denied request stored nothing (atomic all-or-nothing)');
    like(hdr($r[2], 'RateLimit') // '',
         qr/^"per_key";r=5;t=0, "per_tenant";r=0;t=\d+$/,
         'the 429 reports the key limit untouched (nothing was counted)');
    my @e = map { hget($t, '/multi', 'X-Key' => 'solo') } 1 .. 6;
    is_deeply(statuses(@e), [200, 200, 200, 200, 200, 429],
              'empty key skips its limit');
}

# ---- deny cache ---------------------------------------------------------

{
    $t->redis_cli('CONFIG', 'RESETSTAT');
    my @r = map { hget($t, '/basic', 'X-Key' => 'dc') } 1 .. 4;
    is_deeply(statuses(@r), [200, 200, 200, 429], 'key limited');
    my $calls = cmdstat('evalsha');
    is($calls, 4, 'four requests, four EVALSHA');

    my @more = map { hget($t, '/basic', 'X-Key' => 'dc') } 1 .. 20;
    is(scalar(grep { $_->{status} == 429 } @more), 20,
       'further requests on the limited key denied');
    is(cmdstat('evalsha'), $calls, 'deny cache: they cost no Redis call');
    like(hdr($more[0], 'Retry-After') // '', qr/^\d+$/,
         'cached deny keeps Retry-After');
    is(hget($t, '/basic', 'X-Key' => 'fresh')->{status}, 200,
       'other keys still asked');
    is(cmdstat('evalsha'), $calls + 1, 'one call for the other key');
}

# ---- NOSCRIPT -----------------------------------------------------------

{
    $t->redis_cli('SCRIPT', 'FLUSH');
    $t->redis_cli('CONFIG', 'RESETSTAT');
    my $r = hget($t, '/basic', 'X-Key' => 'ns');
    is($r->{status}, 200, 'answer after SCRIPT FLUSH');
    like(hdr($r, 'RateLimit') // '', qr/^"basic";r=2;/,
         'counted in Redis, not by the fallback');
    is(cmdstat('eval'), 1, 'NOSCRIPT answered with one EVAL');
    is(hget($t, '/basic', 'X-Key' => 'ns')->{status}, 200, 'next one');
    is(cmdstat('eval'), 1, 'then EVALSHA again');
}

# ---- two nginx instances share one budget ---------------------------------

{
    my $t2 = SbxTest->new;
    $t2->write_file('html/index.html', "ok\n");
    $t2->conf(conf_for($rport));
    $t2->start(workers => 2);

    # 4 clients, 10 requests each, alternating instances: 40 requests for
    # one key with a budget of 10
    my @kids;
    for my $k (1 .. 4) {
        my $pid = fork // die "fork: $!";
        if ($pid == 0) {
            my $ok = 0;
            for my $i (1 .. 10) {
                my $inst = ($i + $k) % 2 ? $t : $t2;
                my $r = hget($inst, '/shared', 'X-Key' => 'both');
                $ok++ if $r->{status} == 200;
            }
            POSIX::_exit($ok);
        }
        push @kids, $pid;
    }
    my $allowed = 0;
    for my $pid (@kids) {
        waitpid($pid, 0);
        $allowed += $? >> 8;
    }
    is($allowed, 10, 'two nodes, concurrent clients: exactly the limit');

    $t2->check_error_log;
    $t2->stop;
    $t2->cleanup;
}

# ---- Redis paused: the deadline holds, the breaker opens ------------------

{
    $t->redis_cli('CLIENT', 'PAUSE', '4000', 'ALL');
    my $t0 = time;
    my $r = hget($t, '/local', 'X-Key' => 'paused');
    my $took = time - $t0;
    is($r->{status}, 200, 'Redis paused: fallback answers');
    ok($took < 1.5, sprintf('answer long before Redis wakes (%.3fs)', $took));
    like(hdr($r, 'RateLimit') // '', qr/^"fl";r=1;/,
         'counted by the local fallback');

    # enough timeouts on both workers to open their circuits
    my @p = map { hget($t, '/open', 'X-Key' => "p$_") } 1 .. 16;
    is(scalar(grep { $_->{status} == 200 } @p), 16,
       'every request answered while paused');
    ok(time - $t0 < 3.5, 'all of them before Redis woke up');
    like($t->error_log, qr/EVALSHA on "127\.0\.0\.1:\d+" failed: timed out/,
         'timeout logged');
    like($t->error_log, qr/circuit open, rate limits use the fallback/,
         'circuit breaker opened');

    # after the pause: probes close the circuit again
    sleep(4.1 - (time - $t0)) if time - $t0 < 4.1;
    my $back = $t->wait_for(sub {
        hget($t, '/closed', 'X-Key' => 'after-pause')->{status} == 200
    }, 10);
    ok($back, 'circuit closed again after the pause');
    like($t->error_log, qr/answers again, circuit closed/, 'recovery logged');
}

# ---- Redis down: fallbacks -------------------------------------------------

{
    $t->redis_stop;

    my @l = map { hget($t, '/local', 'X-Key' => 'down') } 1 .. 4;
    is_deeply(statuses(@l), [200, 200, 429, 429],
              'fallback local: the same limit in shared memory');

    my @o = map { hget($t, '/open', 'X-Key' => 'down') } 1 .. 4;
    is_deeply(statuses(@o), [200, 200, 200, 200], 'fallback open allows');
    like(hdr($o[0], 'RateLimit-Policy') // '', qr/^"fo";q=1;/,
         'policy still announced');

    my $c = hget($t, '/closed', 'X-Key' => 'down');
    $t->error_ok($c, 503, 'ratelimit_unavailable', 'fallback closed: 503');

    my $m = $t->get('/status')->{content} // '';
    my ($fb) = $m =~ /^sbx_ratelimit_fallback_total (\d+)/m;
    my ($re) = $m =~ /^sbx_redis_errors_total (\d+)/m;
    ok(($fb // 0) >= 9, 'fallback decisions counted (' . ($fb // 'none')
       . ')');
    ok(($re // 0) >= 1, 'Redis errors counted (' . ($re // 'none') . ')');

    # recovery
    $t->redis_start(port => $rport);
    my $back = $t->wait_for(sub {
        hget($t, '/closed', 'X-Key' => 'rec')->{status} == 200
    }, 15);
    ok($back, 'recovered after Redis restarted');
    my $r = hget($t, '/closed', 'X-Key' => 'rec2');
    is($r->{status}, 200, 'closed route answers again');
    is($t->redis_cli('EXISTS', 't31:fc:rec2'), '1', 'counted in Redis again');
}

$t->check_error_log;
$t->stop;
$t->redis_stop;

# ---- password, db, unix socket -------------------------------------------

{
    my $u = SbxTest->new;
    $u->redis_start(requirepass => 's3cret', unixsocket => 1);
    my $sock = $u->redis_socket;
    $u->write_file('html/index.html', "ok\n");
    $u->conf(<<"EOF");
sbx_redis unix:$sock password=s3cret db=3 prefix=u:;
server {
    listen 127.0.0.1:%%PORT%%;
    root %%PREFIX%%/html;
    location / {
        sbx_rate_limit key=\$http_x_key rate=1r/h burst=1 name=u;
        sbx_rate_limit_fallback closed;
    }
}
EOF
    $u->start;
    my $ok = $u->wait_for(sub {
        hget($u, '/', 'X-Key' => 'a')->{status} == 200
    }, 5);
    ok($ok, 'unix socket with password: allowed');
    is(hget($u, '/', 'X-Key' => 'a')->{status}, 429, 'then limited');
    is($u->redis_cli('-n', '3', 'EXISTS', 'u:u:a'), '1', 'key is in db 3');
    is($u->redis_cli('-n', '0', 'EXISTS', 'u:u:a'), '0', 'not in db 0');
    $u->check_error_log;
    $u->stop;

    # a wrong password: the fallback decides, nothing hangs
    $u->conf($u->conf =~ s/password=s3cret/password=wrong/r);
    $u->start;
    my $c = hget($u, '/', 'X-Key' => 'b');
    $u->error_ok($c, 503, 'ratelimit_unavailable',
                 'wrong password: closed fallback answers 503');
    like($u->error_log, qr/AUTH on "unix:[^"]+" failed/, 'AUTH failure logged');
    $u->stop;
    $u->cleanup;
}

done_testing;
