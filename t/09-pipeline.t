#!/usr/bin/perl
# Pipelining (sbx_pool pipeline=N): calls sent ahead to a busy helper.
# Every call is answered; a call never waits behind one that runs long;
# and a helper killed with calls pipelined behind the running one fails
# that one call only: the others never started and run elsewhere.

use strict;
use warnings;

use lib 't/lib';
use SbxTest;
use Test::More;
use POSIX ();
use Time::HiRes qw(sleep time);

my $t = SbxTest->new;
$t->write_file('work.lua', <<'EOF');
return function(req)
  local ms = tonumber(req.query.ms) or 0
  local t0 = os.clock()
  local n = 0
  while (os.clock() - t0) * 1000 < ms do n = n + 1 end
  return { status = 200, body = "done " .. req.query.i }
end
EOF
$t->conf(<<'EOF');
sbx_pool deep size=1 pipeline=8 queue=256;
sbx_pool fail size=1 pipeline=8 queue=256;
sbx_pool tight size=1 pipeline=8 queue=1;
sbx_connector work {
    script %%PREFIX%%/work.lua; pool deep;
    limits timeout=2s instructions=1000000000;
}
sbx_connector victim { script %%PREFIX%%/work.lua; pool fail; limits timeout=2s; }
sbx_connector tight {
    script %%PREFIX%%/work.lua; pool tight;
    limits timeout=2s instructions=1000000000;
}
server {
    listen 127.0.0.1:%%PORT%%;
    location /work   { sbx_connector work; }
    location /victim { sbx_connector victim; }
    location /tight  { sbx_connector tight; }
}
EOF
$t->start;

my $dir = $t->prefix;

# runs $n clients, each doing $per requests of $path; returns the statuses
# and bodies, in no particular order
sub clients {
    my ($n, $per, $path, $until) = @_;
    my @pids;
    for my $c (1 .. $n) {
        my $pid = fork;
        die "fork: $!" unless defined $pid;
        if ($pid == 0) {
            my @out;
            my $i = 0;
            while (1) {
                last if !$until && $i >= $per;
                last if $until && time >= $until;
                $i++;
                my $r = $t->get("$path&i=$c.$i", { timeout => 10 });
                my $ok = $r->{status} == 200 && $r->{content} eq "done $c.$i";
                push @out, $r->{status} . ($ok || $r->{status} != 200
                                           ? '' : 'x');
            }
            open my $fh, '>', "$dir/out.$c" or POSIX::_exit(1);
            print {$fh} "@out\n";
            close $fh;
            POSIX::_exit(0);
        }
        push @pids, $pid;
    }
    waitpid($_, 0) for @pids;
    my @all;
    for my $c (1 .. $n) {
        open my $fh, '<', "$dir/out.$c" or next;
        push @all, split ' ', scalar(<$fh> // '');
        unlink "$dir/out.$c";
    }
    return @all;
}

# --- many clients on one helper ------------------------------------------

my @s = clients(16, 25, '/work?ms=0');
is(scalar @s, 400, '16 clients x 25 requests on one helper: all answered');
is(scalar(grep { $_ ne '200' } @s), 0,
   'every answer is 200 with its own body (no answer given to another call)')
    or diag("@s");

# --- a long call gets nothing pipelined behind it -----------------------------

my $slow = fork;
die "fork: $!" unless defined $slow;
if ($slow == 0) {
    my $r = $t->get('/work?ms=600&i=slow', { timeout => 10 });
    POSIX::_exit($r->{status} == 200 ? 0 : 1);
}
sleep 0.15;
my $t0 = time;
my $r = $t->get('/work?ms=0&i=fast', { timeout => 10 });
my $took = time - $t0;
waitpid($slow, 0);
is($? >> 8, 0, 'the long call is answered');
is($r->{status}, 200, 'a call that arrived during it is answered too');
cmp_ok($took, '>', 0.2,
       'and waited in the queue (one helper, so it could not run before)');

# --- pipelined calls count against queue= ------------------------------------

{
    my @pids;
    for my $c (1 .. 4) {
        my $pid = fork;
        die "fork: $!" unless defined $pid;
        if ($pid == 0) {
            my $r = $t->get("/tight?ms=400&i=$c", { timeout => 10 });
            open my $fh, '>', "$dir/tight.$c" or POSIX::_exit(1);
            print {$fh} "$r->{status}\n";
            close $fh;
            POSIX::_exit(0);
        }
        push @pids, $pid;
    }
    waitpid($_, 0) for @pids;
    my @st;
    for my $c (1 .. 4) {
        open my $fh, '<', "$dir/tight.$c" or next;
        push @st, scalar(<$fh>) + 0;
        close $fh;
    }
    is(scalar(grep { $_ == 200 } @st), 2,
       'size=1 queue=1 pipeline=8: two served (running + one waiting)')
        or diag("@st");
    is(scalar(grep { $_ == 503 } @st), 2, 'the other two: 503 overloaded');
}

# --- kills with calls pipelined ------------------------------------------------

my $kills = 0;
my $killer = fork;
die "fork: $!" unless defined $killer;
if ($killer == 0) {
    my $n = 0;
    my $end = time + 3;
    while (time < $end) {
        sleep 0.05;
        # the other pool is idle meanwhile: killing its helper is harmless
        for my $h ($t->helper_pids) {
            $n++ if kill 'KILL', $h;
        }
    }
    open my $fh, '>', "$dir/kills" or POSIX::_exit(1);
    print {$fh} "$n\n";
    close $fh;
    POSIX::_exit(0);
}
my @v = clients(8, 0, '/victim?ms=1', time + 3.5);
waitpid($killer, 0);
open my $kf, '<', "$dir/kills" or die "kills: $!";
$kills = <$kf> + 0;
close $kf;

my %count;
$count{$_}++ for @v;
diag("pipelined kills: $kills kills, answers: "
     . join(' ', map { "$_=$count{$_}" } sort keys %count));
cmp_ok($kills, '>', 5, 'helpers were killed under load');
is(scalar(grep { $_ ne '200' && $_ ne '502' } @v), 0,
   'every answer is 200 or 502 (503 only if the pool was down)')
    or diag(join ' ', sort keys %count);
# a 502 is either a call that was running when its helper died, or one
# refused at once while the pool had no helper left (fail closed, backoff)
my $log = $t->error_log;
my $died = () = $log =~ /connector "victim": the helper died while running/g;
my $down = () = $log =~ /connector "victim": no helper of pool/g;
diag("502s: $died died with their helper, $down refused while it was down");
is($died + $down, $count{502} // 0, 'every 502 is logged with its reason');
cmp_ok($died, '<=', $kills,
       'at most one failed call per kill: pipelined calls were run again');
cmp_ok($count{200} // 0, '>', 50, 'and the rest were served');

ok($t->wait_for(sub { scalar($t->helper_pids) == 3 }, 15),
   'every pool back to one helper');

$t->stop;
$t->check_error_log;
done_testing();
