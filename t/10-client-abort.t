#!/usr/bin/perl
# Clients that go away: a client that closes its connection while its call
# runs in a helper, waits in the pool's queue, is pipelined behind another
# call, or (connector mode) waits for the upstream or the response hook.
# Nothing may crash or leak: the worker and the helpers stay the same
# processes, the pool keeps serving at full speed, every abandoned request
# still gets its audit line, and the error log has no alert.

use strict;
use warnings;

use lib 't/lib';
use IO::Socket::INET;
use JSON::PP;
use SbxTest;
use Test::More;
use Time::HiRes qw(sleep time);

my $t = SbxTest->new;
my $dir = $t->prefix;

$t->write_file('work.lua', <<'EOF');
return function(req)
  log.info("ran " .. (req.query.i or ""))
  local ms = tonumber(req.query.ms) or 0
  local t0 = os.clock()
  while (os.clock() - t0) * 1000 < ms do end
  return { status = 200, headers = { ["content-type"] = "text/plain" },
           body = "done " .. (req.query.i or "") }
end
EOF

$t->write_file('hooks.lua', <<'EOF');
local function spin(ms)
  local t0 = os.clock()
  while (os.clock() - t0) * 1000 < ms do end
end
return {
  request = function(req)
    spin(tonumber(req.query.req_ms) or 0)
    return req
  end,
  response = function(res, req)
    spin(tonumber(req.query.res_ms) or 0)
    return { status = res.status, body = "wrapped " .. res.body }
  end,
}
EOF

$t->conf(<<'EOF');
sbx_pool one size=1 pipeline=4 queue=64;
sbx_pool hook size=1 pipeline=4 queue=64;
sbx_connector work {
    script %%PREFIX%%/work.lua; pool one; capabilities log;
    limits timeout=5s instructions=1000000000;
}
sbx_connector hooks {
    script %%PREFIX%%/hooks.lua; pool hook;
    limits timeout=5s instructions=1000000000;
}
sbx_connector upwork {
    script %%PREFIX%%/work.lua; pool hook; capabilities log;
    limits timeout=5s instructions=1000000000;
}
sbx_audit_log %%PREFIX%%/audit.log;

server {
    listen 127.0.0.1:%%PORT2%%;
    location / { sbx_connector upwork; }
}

server {
    listen 127.0.0.1:%%PORT%%;
    client_max_body_size 8m;
    location /work  { sbx_connector work; }
    location /hooks {
        sbx_connector hooks;
        proxy_pass http://127.0.0.1:%%PORT2%%/up;
    }
}
EOF
$t->start(workers => 1);

my ($worker) = $t->worker_pids;
ok($t->wait_for(sub { $t->helper_pids == 2 }, 10), 'two pools, two helpers');
my @helpers = $t->helper_pids;

# sends a GET and closes the connection after $wait seconds without
# reading the answer
sub abandon {
    my ($path, $wait) = @_;
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
                                  PeerPort => $t->port, Proto => 'tcp')
        or die "connect: $!";
    print {$s} "GET $path HTTP/1.1\r\nHost: localhost\r\n\r\n";
    sleep $wait;
    close $s;
}

sub audit_lines {
    my $text = $t->read_file('audit.log') // '';
    return map { eval { decode_json($_) } // {} } split /\n/, $text;
}

my $lines0 = () = audit_lines();

# ---- while the call runs in the helper ---------------------------------------

abandon('/work?ms=400&i=running', 0.1) for 1 .. 3;

# ---- while queued and pipelined: one long call, several behind it ----------

{
    my @socks;
    my $busy = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
                                     PeerPort => $t->port) or die;
    print {$busy} "GET /work?ms=600&i=busy HTTP/1.1\r\nHost: x\r\n"
                . "Connection: close\r\n\r\n";
    sleep 0.1;
    for my $i (1 .. 10) {
        my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
                                      PeerPort => $t->port) or die;
        print {$s} "GET /work?ms=50&i=q$i HTTP/1.1\r\nHost: x\r\n\r\n";
        push @socks, $s;
    }
    sleep 0.1;
    close $_ for @socks;        # gone while queued or pipelined
    local $/;
    my $answer = <$busy> // '';
    like($answer, qr/^HTTP\/1\.1 200 .*done busy/s,
         'the call in front still answers its client');
    close $busy;
    sleep 0.5;
    my @ran = $t->error_log =~ /ran (q\d+)/g;
    # pipeline=4: up to 3 calls were sent to the helper behind the busy one
    # before their clients left; the others were still queued
    cmp_ok(scalar @ran, '<=', 3, 'calls whose client left while queued '
           . 'never run (' . scalar(@ran) . " ran: @ran)");
}

# ---- connector mode: during the request hook, the upstream, the response
#      hook -----------------------------------------------------------------

abandon('/hooks/a?req_ms=300', 0.1);
abandon('/hooks/b?ms=300', 0.1);            # the upstream is slow
abandon('/hooks/c?res_ms=300', 0.1);

# ---- a big call half written to the helper when its client leaves --------
# A runs; B and C wait; when A ends, B runs and C (2 MB, more than the
# socket holds) is half written behind it.  C's client leaving must not
# fail B: the rest of C is written from a copy and its answer dropped.

{
    my %out;
    my @kids;
    my $start = time;
    for my $job ([ 'A', 0, 900 ], [ 'B', 0.05, 900 ], [ 'C', 0.1, 0 ]) {
        my ($id, $at, $ms) = @$job;
        my $pid = fork // die "fork: $!";
        if ($pid == 0) {
            sleep $at;
            my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
                                          PeerPort => $t->port) or die;
            if ($id eq 'C') {
                my $body = 'x' x (2 * 1024 * 1024);
                print {$s} "POST /work?ms=0&i=big HTTP/1.1\r\nHost: x\r\n"
                         . "Content-Length: " . length($body) . "\r\n\r\n"
                         . $body;
                sleep 1.3;          # A has ended, B runs, C is half sent
                close $s;
                POSIX::_exit(0);
            }
            print {$s} "GET /work?ms=$ms&i=$id HTTP/1.1\r\nHost: x\r\n"
                     . "Connection: close\r\n\r\n";
            local $/;
            my $answer = <$s> // '';
            my ($st) = $answer =~ m{^HTTP/1\.1 (\d+)};
            $t->write_file("answer-$id", $st // 'none');
            POSIX::_exit(0);
        }
        push @kids, $pid;
    }
    waitpid($_, 0) for @kids;
    is($t->read_file('answer-A'), '200', 'A ran and answered');
    is($t->read_file('answer-B'), '200', 'B, running when C\'s client left '
       . 'half way through its call, still answers 200');
    unlike($t->error_log, qr/helper died while running|the helper went away/,
           'no helper was dropped for it');
    sleep 0.5;
}

# ---- connector mode: a client that leaves while its request-hook call waits

{
    my $n0 = () = audit_lines();

    # the hook pool's helper is busy with a 600 ms request hook
    my $busy = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
                                     PeerPort => $t->port) or die;
    print {$busy} "GET /hooks/busy?req_ms=600 HTTP/1.1\r\nHost: x\r\n"
                . "Connection: close\r\n\r\n";
    sleep 0.1;
    abandon('/hooks/gone?i=queuedhook', 0.1);
    local $/;
    my $answer = <$busy> // '';
    like($answer, qr/^HTTP\/1\.1 200 /, 'the busy request hook answers');
    close $busy;
    sleep 0.5;
    unlike($t->error_log, qr/ran queuedhook/,
           'a request hook whose client left while queued never runs '
           . '(the upstream never sees the request)');
    my @l = audit_lines();
    my ($q) = grep { ($_->{connector} // '') eq 'hooks'
                     && ($_->{status} // 0) == 499 } @l[$n0 .. $#l];
    ok($q && !defined $q->{helper} && ($q->{duration_ms} // 9999) < 400,
       'it ends when its client leaves (499 at once, no helper ran it)')
        or diag(JSON::PP->new->canonical->encode($q // {}));
}

# ---- afterwards ----------------------------------------------------------------

sleep 1.5;      # every abandoned call has run out or been dropped

my $t0 = time;
my $r = $t->get('/work?ms=0&i=after');
my $took = time - $t0;
is($r->{status}, 200, 'the pool serves after the aborts');
is($r->{content}, 'done after', 'with the right answer');
cmp_ok($took, '<', 1, 'at once: nothing abandoned is still in its way')
    or diag("took $took s");

$r = $t->get('/hooks/d?i=x');
is($r->{status}, 200, 'connector mode serves after the aborts');
is($r->{content}, 'wrapped done x', 'both hooks ran');

is_deeply([ $t->worker_pids ], [ $worker ], 'the worker is the same process');
is_deeply([ $t->helper_pids ], \@helpers,
          'the helpers are the same processes (none killed or crashed)');

# the worker did not grow fds (sockets of abandoned calls are closed)
my $fds0 = SbxTest::fd_count($worker);
abandon('/work?ms=100&i=fd', 0.05) for 1 .. 20;
sleep 3;
my $fds1 = SbxTest::fd_count($worker);
cmp_ok($fds1, '<=', $fds0 + 2,
       "no fd growth after 20 more aborts ($fds0 → $fds1)");

# every request has its audit line, the abandoned ones included
my @lines = audit_lines();
my @new = @lines[$lines0 .. $#lines];
my $front = grep { ($_->{connector} // '') =~ /^(work|hooks)$/ } @new;
# 3 running + 1 busy + 10 queued + 3 connector + A, B, C + busy and gone
# hooks + after + d + 20 fd
is($front, 3 + 1 + 10 + 3 + 3 + 2 + 1 + 1 + 20,
   'an audit line for every request to a front connector route');
my @gone = grep { ($_->{status} // 0) == 499 } @new;
# all but the busy ones, A, B, "after", "d" and the upstream's own lines
is(scalar @gone, 3 + 10 + 3 + 1 + 1 + 20, 'every abandoned request is logged '
   . 'with status 499')
    or diag('statuses: ' . join(' ', map { ($_->{connector} // '-') . '='
                                           . ($_->{status} // '-') } @new));

# a client that left while its call ran in a helper: the line still says
# which helper had it and for how long (the first of the three; the other
# two waited in the queue behind it: no helper had them)
my @running = grep { ($_->{status} // 0) == 499
                     && ($_->{connector} // '') eq 'work' } @new[0 .. 2];
is(scalar @running, 3, 'the three abandoned calls are logged');
my $first = $running[0] // {};
ok(($first->{helper} // 0) > 0 && ($first->{helper_ms} // -1) >= 50,
   'the one that ran: its helper and the time it had spent on it')
    or diag(join ' ', map { ($_->{helper} // 'null') . '/'
                            . ($_->{helper_ms} // 'null') } @running);
is(scalar(grep { !defined $_->{helper} && !defined $_->{helper_ms} }
          @running[1, 2]), 2, 'the queued ones: helper and helper_ms null');

$t->stop;
$t->check_error_log;

done_testing;
