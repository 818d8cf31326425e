#!/usr/bin/perl
# Recycling at max_requests, many times in a row and under concurrency:
# every request is served, the pool stays at its size, and a helper that
# replaces a recycled one is never mistaken for it.

use strict;
use warnings;

use lib 't/lib';
use SbxTest;
use Test::More;
use POSIX ();

my $t = SbxTest->new;
$t->write_file('one.lua',
    "return function(req) return {status=200, body='one'} end\n");
$t->conf(<<'EOF');
sbx_pool once size=1 max_requests=1;
sbx_pool few size=2 max_requests=3 queue=64;
sbx_connector once { script %%PREFIX%%/one.lua; pool once; }
sbx_connector few { script %%PREFIX%%/one.lua; pool few; }
server {
    listen 127.0.0.1:%%PORT%%;
    location /once { sbx_connector once; }
    location /few  { sbx_connector few; }
}
EOF
$t->start;

my @status = map { $t->get('/once')->{status} } 1 .. 30;
is(scalar(grep { $_ == 200 } @status), 30,
   'max_requests=1: 30 requests in a row, 30 answers 200')
    or diag("@status");

# concurrent clients on a recycling pool
my @pids;
my $dir = $t->prefix;
for my $c (1 .. 8) {
    my $pid = fork;
    die "fork: $!" unless defined $pid;
    if ($pid == 0) {
        my @s = map { $t->get('/few')->{status} } 1 .. 15;
        open my $fh, '>', "$dir/few.$c" or POSIX::_exit(1);
        print {$fh} "@s\n";
        close $fh;
        POSIX::_exit(0);
    }
    push @pids, $pid;
}
waitpid($_, 0) for @pids;

my @all;
for my $c (1 .. 8) {
    open my $fh, '<', "$dir/few.$c" or next;
    my $s = <$fh> // '';
    push @all, split ' ', $s;
}
is(scalar @all, 120, '8 clients x 15 requests answered');
is(scalar(grep { $_ != 200 } @all), 0,
   'max_requests=3 under concurrency: no request failed')
    or diag("@all");

ok($t->wait_for(sub { scalar($t->helper_pids) == 3 }, 5),
   'pools back to their size (1 + 2 helpers)');

my $log = $t->error_log;
unlike($log, qr/malformed frame|broke the protocol|no helper of pool/,
       'no successor helper was killed as malformed, no request refused');
like($log, qr/recycled after 1 request/, 'recycling is logged');

$t->stop;
$t->check_error_log;

done_testing();
