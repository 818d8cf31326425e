#!/usr/bin/perl
# Helper processes: what they are (binary, seccomp, no_new_privs, not root,
# empty environment, no inherited descriptors), pool sizes, a helper killed
# mid-request, queue overflow, max_requests recycling, reload under load,
# a dead worker's helpers.

use strict;
use warnings;

use lib 't/lib';
use Cwd qw(abs_path);
use POSIX ();
use SbxTest;
use Test::More;
use Time::HiRes qw(sleep time);

# user + system CPU time of a process, in clock ticks
sub cpu_ticks {
    my ($pid) = @_;
    my $stat = SbxTest::slurp("/proc/$pid/stat") // return 0;
    my @f = split ' ', ($stat =~ /\)\s+(.*)/s)[0] // '';
    return ($f[11] // 0) + ($f[12] // 0);
}

# GET in a child process; the result lands in $file as
# "status\nretry-after\ncontent-type\nbody"
sub spawn_get {
    my ($t, $path, $file) = @_;
    my $pid = fork // die "fork: $!";
    if ($pid == 0) {
        my $r = $t->get($path, { timeout => 30 });
        if (open my $fh, '>', "$file.tmp") {
            print {$fh} join("\n", $r->{status},
                $r->{headers}{'retry-after'} // '',
                $r->{headers}{'content-type'} // '', $r->{content} // '');
            close $fh;
            rename "$file.tmp", $file;
        }
        POSIX::_exit(0);
    }
    return $pid;
}

sub read_result {
    my ($file) = @_;
    my $s = SbxTest::slurp($file) // return { status => 0, headers => {}, content => '' };
    my ($status, $ra, $ct, $body) = split /\n/, $s, 4;
    return { status => $status, content => $body // '',
             headers => { 'retry-after' => $ra eq '' ? undef : $ra,
                          'content-type' => $ct } };
}

my $helper_bin = abs_path(SbxTest::helper_bin());

# --- what a helper is -----------------------------------------------------------

{
    my $t = SbxTest->new;
    $t->write_file('a.lua', "return function(req) return {status=200, body='a'} end\n");
    $t->conf(<<'EOF');
sbx_pool default size=1;
sbx_pool big size=3;
sbx_connector a { script %%PREFIX%%/a.lua; }
sbx_connector b { script %%PREFIX%%/a.lua; pool big; }
server {
    listen 127.0.0.1:%%PORT%%;
    location /a { sbx_connector a; }
    location /b { sbx_connector b; }
}
EOF
    $t->start(workers => 2);
    is($t->get('/a')->{status}, 200, 'pool default answers');
    is($t->get('/b')->{status}, 200, 'pool big answers');

    # every helper started and set up: a helper that is still loading its
    # scripts has no seccomp filter yet (it installs it last)
    my $by;
    ok($t->wait_for(sub {
        $by = $t->helpers_by_worker;
        my @all = map { @$_ } values %$by;
        keys %$by == 2 && !grep({ @$_ != 4 } values %$by)
            && !grep({ (SbxTest::slurp("/proc/$_/status") // '') !~ /^Seccomp:\t2$/m }
                     @all);
    }, 20), 'each of 2 workers has 1 + 3 helpers (pool sizes), all set up')
        or diag(explain($by));

    my @helpers = $t->helper_pids;
    cmp_ok(scalar @helpers, '==', 8, '8 helpers in all');
    for my $pid (@helpers) {
        my $exe = readlink("/proc/$pid/exe") // '';
        $exe =~ s/ \(deleted\)\z//;
        is($exe, $helper_bin, "helper $pid runs the helper binary");
        my $st = SbxTest::slurp("/proc/$pid/status") // '';
        like($st, qr/^Seccomp:\t2$/m, "helper $pid: Seccomp 2 (filter)");
        like($st, qr/^NoNewPrivs:\t1$/m, "helper $pid: NoNewPrivs 1");
        my ($uids) = $st =~ /^Uid:\t(.*)$/m;
        ok(defined $uids && !grep({ $_ == 0 } split /\s+/, $uids),
           "helper $pid: no uid is 0 ($uids)");
        my ($cap) = $st =~ /^CapEff:\t(\w+)$/m;
        like($cap // 'x', qr/^0+$/, "helper $pid: no effective capabilities");
        my $env = SbxTest::slurp("/proc/$pid/environ") // '';
        my @vars = grep { length } split /\0/, $env;
        ok(!grep({ !/^TZ=/ } @vars), "helper $pid: environment is empty but TZ")
            or diag("environ: @vars");

        my @fds;
        if (opendir my $dh, "/proc/$pid/fd") {
            @fds = grep { /^\d+$/ } readdir $dh;
            closedir $dh;
        }
        my @targets = map { readlink("/proc/$pid/fd/$_") // '' } @fds;
        my @sockets = grep { /^socket:/ } @targets;
        cmp_ok(scalar @sockets, '<=', 1, "helper $pid: one socket at most "
               . '(no listening socket inherited)') or diag("fds: @targets");
        my $prefix = $t->prefix;
        ok(!grep({ index($_, $prefix) == 0 || m{^/var/log} } @targets),
           "helper $pid: no log or config file open") or diag("fds: @targets");
    }

    my @workers = $t->worker_pids;
    $t->stop;
    ok(!grep({ SbxTest->alive($_) } @helpers, @workers),
       'no helper or worker left after stop');
    $t->check_error_log;
}

# --- kill, queue, recycle, reload --------------------------------------------------

my $t = SbxTest->new;
my $dir = $t->prefix;

$t->write_file('slow.lua', <<'EOF');
return function(req)
  local s = tonumber(req.query.s) or 1
  local t0 = os.clock()
  while os.clock() - t0 < s do end
  return { status = 200, body = "slow done" }
end
EOF
$t->write_file('fast.lua', "return function(req) return {status=200, body='v1'} end\n");
$t->write_file('rec.lua', "return function(req) return {status=200, body='rec'} end\n");

$t->conf(<<'EOF');
sbx_pool default size=1;
sbx_pool solo size=1 queue=1;
sbx_pool recyc size=1 max_requests=3;
sbx_connector slow {
    script %%PREFIX%%/slow.lua;
    pool solo;
    limits instructions=1000000000 timeout=20s;
}
sbx_connector fast { script %%PREFIX%%/fast.lua; }
sbx_connector rec { script %%PREFIX%%/rec.lua; pool recyc; }
server {
    listen 127.0.0.1:%%PORT%%;
    location /slow { sbx_connector slow; }
    location /fast { sbx_connector fast; }
    location /rec  { sbx_connector rec; }
}
EOF
$t->start(workers => 1);

ok($t->wait_for(sub { $t->helper_pids == 3 }, 10), 'three pools, three helpers')
    or diag('helpers: ' . join(' ', $t->helper_pids));
is($t->get('/slow?s=0')->{status}, 200, 'slow connector answers');

# SIGKILL a helper in the middle of a request ---------------------------------

{
    my @before = $t->helper_pids;
    my $file = "$dir/kill.result";
    my $child = spawn_get($t, '/slow?s=10', $file);
    # the busy helper is the one burning CPU time: a helper merely in
    # state R (starting, recycling, under a loaded machine) may be another
    my $busy;
    $t->wait_for(sub {
        my %t0 = map { $_ => cpu_ticks($_) } $t->helper_pids;
        sleep 0.3;
        my ($best, $most) = (undef, 0);
        for my $pid (keys %t0) {
            my $d = cpu_ticks($pid) - $t0{$pid};
            ($best, $most) = ($pid, $d) if $d > $most;
        }
        $busy = $best if $most >= 10;      # 0.1 s of CPU in 0.3 s
        $busy;
    }, 5);
    ok($busy, 'found the busy helper') or diag("helpers: @before");
    my $t0 = time;
    kill 'KILL', $busy if $busy;
    waitpid($child, 0);
    my $took = time - $t0;
    my $r = read_result($file);
    $t->error_ok($r, 502, 'sandbox_failure', 'killed helper → 502 sandbox_failure');
    cmp_ok($took, '<', 3, 'the 502 comes at once, not at the 20s timeout');

    ok($t->wait_for(sub {
        my @now = $t->helper_pids;
        @now == 3 && !grep { $busy && $_ == $busy } @now;
    }, 5), 'pool back to full size with a new helper');
    is($t->get('/slow?s=0')->{status}, 200, 'the pool serves again');
    ok($t->wait_for(sub { $t->error_log =~ /\[error\].*(?:signal 9|SIGKILL|killed)/i }, 3),
       'helper death logged at error level with its cause');
}

# queue overflow ------------------------------------------------------------------

{
    my @kids;
    for my $i (1 .. 4) {
        push @kids, spawn_get($t, '/slow?s=1.5', "$dir/queue.$i");
        sleep 0.15;
    }
    waitpid($_, 0) for @kids;
    my @res = map { read_result("$dir/queue.$_") } 1 .. 4;
    my @ok = grep { $_->{status} == 200 } @res;
    my @over = grep { $_->{status} == 503 } @res;
    is(scalar @ok, 2, 'size=1 queue=1: two requests served (running + queued)')
        or diag(join ' ', map { $_->{status} } @res);
    is(scalar @over, 2, 'the other two get 503');
    for my $r (@over) {
        $t->error_ok($r, 503, 'overloaded', '503 overloaded body');
        like($r->{headers}{'retry-after'} // '', qr/^[1-9]\d*$/,
             'Retry-After in whole seconds');
    }
    is($t->get('/slow?s=0')->{status}, 200, 'pool serves after the burst');
}

# max_requests recycling -------------------------------------------------------------

{
    my @sets;
    my @status;
    for my $i (1 .. 7) {
        my $r = $t->get('/rec');
        push @status, $r->{status};
        $t->wait_for(sub { $t->helper_pids == 3 }, 5);
        push @sets, join(' ', $t->helper_pids);
    }
    is("@status", '200 200 200 200 200 200 200', 'recycling fails no request');
    is($sets[0], $sets[1], 'same helpers for requests 1 and 2');
    my %seen;
    my @all = grep { !$seen{$_}++ } map { split / / } @sets;
    cmp_ok(scalar @all, '>=', 5, 'max_requests=3: helper recycled twice in '
           . '7 requests (new pids)') or diag(join "\n", @sets);
    like($t->error_log, qr/\[info\].*recycl/i, 'recycling logged at info');
    unlike($t->error_log, qr/\[(?:error|warn)\].*recycl/i,
           'recycling not logged as an error');
}

# reload under a stream of requests ------------------------------------------------------

{
    my $log = "$dir/stream.log";
    my $stop = "$dir/stream.stop";
    my $child = fork // die "fork: $!";
    if ($child == 0) {
        open my $fh, '>', $log or POSIX::_exit(1);
        $fh->autoflush(1);
        my $deadline = time + 20;
        while (!-e $stop && time < $deadline) {
            my $r = $t->get('/fast', { timeout => 10 });
            print {$fh} "$r->{status} $r->{content}\n";
        }
        close $fh;
        POSIX::_exit(0);
    }

    sleep 0.5;
    my @old_helpers = $t->helper_pids;
    $t->write_file('fast.lua', "return function(req) return {status=200, body='v2'} end\n");
    ok($t->reload, 'reload 1 under load');
    sleep 0.5;
    $t->write_file('fast.lua', "return function(req) return {status=200, body='v3'} end\n");
    ok($t->reload, 'reload 2 under load');
    sleep 0.5;
    open my $s, '>', $stop;
    close $s;
    waitpid($child, 0);

    my @lines = split /\n/, SbxTest::slurp($log) // '';
    cmp_ok(scalar @lines, '>', 10, 'the stream ran (' . scalar(@lines) . ' requests)');
    my @bad = grep { !/^200 v[123]$/ } @lines;
    is(scalar @bad, 0, 'no failed request during reloads') or diag("@bad[0..9]");
    is($lines[-1], '200 v3', 'the new script answers after reload');
    ok($t->wait_for(sub { !grep { SbxTest->alive($_) } @old_helpers }, 10),
       'old helpers exit after reload');
    is($t->get('/fast')->{content}, 'v3', 'v3 served');
}

# a worker that dies takes its helpers with it -------------------------------------------

{
    my ($w) = $t->worker_pids;
    my @hs = $t->helper_pids($w);
    cmp_ok(scalar @hs, '==', 3, 'worker has its 3 helpers');
    kill 'KILL', $w;
    ok($t->wait_for(sub { !grep { SbxTest->alive($_) } @hs }, 5),
       'helpers of a killed worker exit');
    ok($t->wait_for(sub { $t->helper_pids == 3 }, 10),
       'the new worker has its helpers');
    is($t->get('/fast')->{status}, 200, 'and serves');
}

my @helpers = $t->helper_pids;
$t->stop;
ok(!grep({ SbxTest->alive($_) } @helpers), 'no helper left after stop');
$t->check_error_log(allow => [ qr/worker process \d+ exited on signal 9/ ]);

done_testing;
