#!/usr/bin/perl
# sbx_audit_log ... buffer=SIZE flush=TIME: lines kept per worker and
# written together, whole, with "seq" and "prev" assigned at the write.
# The chain verifies across workers; nothing is lost at the flush timer,
# when the buffer fills, on reopen (USR1) or when nginx stops.

use strict;
use warnings;

use lib 't/lib';
use JSON::PP;
use POSIX ();
use SbxTest;
use Test::More;
use Time::HiRes qw(sleep);

my $VERIFY = SbxTest::root() . '/tools/sbx-audit-verify';

my $t = SbxTest->new;
my $p = $t->prefix;
my $audit = "$p/audit.log";

$t->write_file('ok.lua', <<'EOF');
return function(req)
  return { status = 200, body = req.id }
end
EOF

sub conf {
    my ($params) = @_;
    return <<"EOF";
sbx_audit_log %%PREFIX%%/audit.log $params;
sbx_connector ok { script %%PREFIX%%/ok.lua; }
server {
    listen 127.0.0.1:%%PORT%%;
    location /ok { sbx_connector ok; }
}
EOF
}

sub lines_of {
    my ($f) = @_;
    open my $fh, '<', $f or return ();
    my @l = <$fh>;
    close $fh;
    return @l;
}

sub verify {
    my ($f) = @_;
    my $out = `$VERIFY $f 2>&1`;
    return ($? >> 8, $out);
}

# --- configuration ---------------------------------------------------------

for my $bad ('buffer=1k', 'buffer=100m', 'buffer=abc', 'flush=1s',
             'buffer=64k flush=0', 'buffer=64k flush=soon')
{
    $t->conf(conf($bad));
    my ($rc, $out) = $t->nginx_t;
    isnt($rc, 0, "sbx_audit_log $bad: refused");
    like($out, qr/sbx_audit_log.*nginx\.conf:\d+/s,
         "sbx_audit_log $bad: names the directive and the line");
}

# --- the flush timer --------------------------------------------------------

$t->conf(conf('buffer=64k flush=2s'));
$t->start(workers => 2);

my @ids = map { $t->get('/ok')->{content} } 1 .. 5;
is(scalar(lines_of($audit)), 0, 'lines are kept, not written at once');
ok($t->wait_for(sub { lines_of($audit) == 5 }, 10),
   'the flush timer writes them');
my @rec = map { decode_json($_) } lines_of($audit);
# two workers flush on their own: a worker's lines keep their order, the
# file interleaves the workers' batches
is_deeply([ sort map { $_->{id} } @rec ], [ sort @ids ],
          'every request has its line, ids intact');
is_deeply([ map { $_->{seq} } @rec ], [ 1 .. 5 ], 'seq 1..5');
my ($rc, $out) = verify($audit);
like($out, qr/^OK 5 lines$/, 'the chain verifies');

# --- a full buffer is written without waiting -------------------------------

$t->conf(conf('buffer=4k flush=60s'));
$t->reload;
my $before = lines_of($audit);
$t->get('/ok') for 1 .. 30;
cmp_ok(scalar(lines_of($audit)), '>', $before,
       'buffer=4k: a full buffer is written before the 60s flush');

# --- concurrent clients on two workers ------------------------------------

my @pids;
for my $c (1 .. 4) {
    my $pid = fork;
    die "fork: $!" unless defined $pid;
    if ($pid == 0) {
        $t->get('/ok') for 1 .. 50;
        POSIX::_exit(0);
    }
    push @pids, $pid;
}
waitpid($_, 0) for @pids;

# --- reopen writes what is kept to the old file ---------------------------------

$t->get('/ok') for 1 .. 3;
my $n = () = lines_of($audit);
rename $audit, "$audit.1" or die "rename: $!";
my $reopened = () = $t->error_log =~ /reopening logs/g;
$t->reopen;
ok($t->wait_for(sub { -e $audit }, 5), 'reopen: a new file');
# the master and both workers have reopened (the workers flush first)
ok($t->wait_for(sub {
    my $n = () = $t->error_log =~ /reopening logs/g;
    $n >= $reopened + 3;
}, 10), 'reopen: master and workers reopened');
# a worker logs "reopening logs" before nginx calls the file's flush
# handler: wait for the lines rather than for the message
my $old;
$t->wait_for(sub {
    $old = () = lines_of("$audit.1");
    $old >= 5 + 30 + 200 + 3;
}, 10);
cmp_ok($old, '>=', 5 + 30 + 200 + 3,
       "reopen: every line kept so far went to the renamed file ($old)");
($rc, $out) = verify("$audit.1");
is($rc, 0, 'reopen: the renamed file verifies, across workers and flushes')
    or diag($out);

# --- stop writes what is kept ------------------------------------------------

$t->get('/ok') for 1 .. 4;
is(scalar(lines_of($audit)), 0, 'new file: nothing written yet (60s flush)');
$t->stop;
is(scalar(lines_of($audit)), 4, 'stop: the 4 lines kept are written');
($rc, $out) = verify($audit);
like($out, qr/^OK 4 lines$/, 'stop: and verify');

# the refused configurations above were logged at emerg, on purpose
$t->check_error_log(allow => [qr/\[emerg\].*sbx_audit_log/]);
done_testing();
