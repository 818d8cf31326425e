#!/usr/bin/perl
# Chaos: `nginx -s reload` and `nginx -s reopen` in a loop under load, the
# connector's script changed before each reload, the MaxMind DB file
# replaced (write + rename, as geoipupdate does) all the time by another
# process, and the audit log rotated (rename + reopen) every fourth round.
# The connectors are well behaved, so every answer must be what the
# request asks for: 200 (451 residency_denied for the client the rule
# denies), never a 5xx, a connection reset or a timeout.  Afterwards every
# audit file verifies with tools/sbx-audit-verify, and together they hold
# one line per request to a connector route.
#
# SBX_CHAOS_SECONDS (default 25) sets how long the reload loop runs.

use strict;
use warnings;

use lib 't/lib';
use POSIX ();
use SbxLoad;
use SbxMMDB;
use SbxTest;
use Test::More;
use Time::HiRes qw(sleep time);

my $SECONDS = $ENV{SBX_CHAOS_SECONDS} // 25;
my %A = %SbxMMDB::ADDR;
my @EPOCHS = (1700000001, 1700000002);

my $t = SbxTest->new;
my $p = $t->prefix;
my $db = "$p/geo.mmdb";
my $audit = "$p/audit.log";
SbxMMDB::write_city($db, epoch => $EPOCHS[0]);

sub script_v {
    my ($v) = @_;
    $t->write_file('hello.lua', <<"EOF");
return function(req)
  return { status = 200, body = "v$v " .. (req.client.country or "-") }
end
EOF
}
script_v(0);
$t->write_file('html/index.html', "static\n");

$t->conf(<<'EOF');
sbx_geoip_db %%PREFIX%%/geo.mmdb;
sbx_audit_log %%PREFIX%%/audit.log chain=on;
sbx_pool default size=2 queue=64;
sbx_connector hello { script %%PREFIX%%/hello.lua; }
server {
    listen 127.0.0.1:%%PORT%%;
    root %%PREFIX%%/html;
    default_type text/plain;
    set_real_ip_from 127.0.0.1;
    real_ip_header X-Forwarded-For;
    location = /vars { return 200 "$sbx_country $sbx_geoip_build_epoch\n"; }
    location /eu {
        sbx_residency allow eu;
        sbx_connector hello;
    }
    location /rl {
        sbx_rate_limit key=$http_x_key rate=100000r/s burst=100000 name=r;
        sbx_connector hello;
    }
    location /static { try_files /index.html =404; }
}
EOF

$t->start(workers => 2);

my $direct = 0;    # requests to connector routes made here, not by the load
my $de = { 'X-Forwarded-For' => $A{de_by} };
is($t->get('/eu', { headers => $de })->{content}, 'v0 DE', 'v0 answers');
$direct++;

# the database replaced every ~150ms, alternating between two builds that
# agree on every country (only the build epoch differs)
my $stop_db = "$p/db.stop";
my $replacer = fork // die "fork: $!";
if ($replacer == 0) {
    my $i = 0;
    my $end = time + $SECONDS + 30;
    while (!-e $stop_db && time < $end) {
        SbxMMDB::write_city($db, epoch => $EPOCHS[++$i % 2]);
        sleep 0.15;
    }
    POSIX::_exit(0);
}

# one connection per request: graceful reload closes no connection with a
# request on it, so no reset is acceptable
my $load = SbxLoad->new(
    t => $t, name => 'reload', clients => 4, timeout => 10, deadline => 5,
    keep_alive => 0,
    requests => [
        { tag => 'eu-de', path => '/eu', weight => 3, headers => $de,
          allow => [200], body => qr/^v\d+ DE$/ },
        { tag => 'eu-us', path => '/eu',
          headers => { 'X-Forwarded-For' => $A{us_ca} },
          allow => [451] },
        { tag => 'rl', path => '/rl', weight => 2,
          headers => sub { { 'X-Key' => 'k' . int(rand 20),
                             'X-Forwarded-For' => $A{fr} } },
          allow => [200], body => qr/^v\d+ FR$/ },
        { tag => 'vars', path => '/vars', headers => $de,
          allow => [200], body => qr/^DE 170000000[12]\n$/ },
        { tag => 'static', path => '/static', allow => [200],
          body => qr/^static\n$/ },
    ],
);
$load->start;
sleep 1;

my ($reloads, $reopens, $refused, %epochs, @versions) = (0, 0, 0);
my $t0 = time;
my $v = 0;
while (time - $t0 < $SECONDS) {
    $v++;
    script_v($v);

    # every fourth round rotate the audit log; reopen, then reload at once
    if ($v % 4 == 1) {
        my $rot = sprintf('%s.%03d', $audit, $v);
        rename $audit, $rot if -e $audit;
    }
    $t->reopen;
    $reopens++;
    if ($t->reload(may_fail => 1, timeout => 20)) {
        $reloads++;
    } else {
        $refused++;
    }

    my $r = $t->get('/eu', { headers => $de });
    $direct++;
    push @versions, $r->{content} // '';
    my $e = $t->get('/vars', { headers => $de })->{content} // '';
    $epochs{$1}++ if $e =~ /^DE (\d+)$/;

    # a reopen on its own too, now and then
    if ($v % 3 == 0) {
        $t->reopen;
        $reopens++;
    }
    sleep 0.2;
}
my $res = $load->stop;

open my $s, '>', $stop_db;
close $s;
waitpid($replacer, 0);
is($?, 0, 'the database replacer ran to the end');

note("$reloads reloads, $reopens reopens in ${\ sprintf '%.1f', time - $t0}s; "
     . "$res->{total} requests: " . SbxLoad::summary($res));
for my $tag (sort keys %{ $res->{tags} }) {
    my $c = $res->{tags}{$tag};
    note("  $tag: " . join(', ', map { "$_: $c->{$_}" } sort keys %$c));
}

cmp_ok($reloads, '>=', 10, "nginx reloaded again and again ($reloads)");
is($refused, 0, 'no reload refused');
cmp_ok($res->{total}, '>', 500, "the clients ran ($res->{total} requests)");
is($res->{clients_failed}, 0, 'every client ran to the end');
is($res->{violations}, 0, 'every answer the one asked for: no 5xx, reset or '
   . 'timeout during reloads')
    or diag(join("\n", @{ $res->{samples} }));
is($versions[-1], "v$v DE", 'after the last reload the last script answers');
is(scalar(grep { !/^v\d+ DE$/ } @versions), 0,
   'right after each reload the connector answers');
my @inorder = map { /^v(\d+)/ ? $1 : -1 } @versions;
is_deeply(\@inorder, [ 1 .. $v ], 'each reload brought its own script');
cmp_ok(scalar(keys %epochs), '==', 2,
       'both database builds were served (' . join(', ', sort keys %epochs) . ')');

# --- the audit chain --------------------------------------------------------------

$t->get('/static');    # not a connector route: no audit line
my $expect = $direct;
$expect += $res->{tags}{$_}{$_ eq 'eu-us' ? 451 : 200} // 0 for qw(eu-de eu-us rl);

my @files = (sort(glob("$audit.*")), $audit);
my ($lines, @broken) = (0);
my $verify = SbxTest::root() . '/tools/sbx-audit-verify';
my $settled = $t->wait_for(sub {
    my $n = 0;
    for my $f (@files) {
        open my $fh, '<', $f or next;
        $n++ while <$fh>;
        close $fh;
    }
    $lines = $n;
    $n >= $expect;
}, 10);
for my $f (@files) {
    next unless -s $f;
    my ($rc, $out) = $t->run_cmd([$verify, $f]);
    push @broken, "$f: $out" unless $rc == 0 && $out =~ /^OK \d+ lines$/;
}
note(scalar(@files) . " audit files, $lines lines");
is(scalar @broken, 0, 'every audit file verifies (' . scalar(@files) . ' files)')
    or diag(join("\n", @broken[0 .. ($#broken > 9 ? 9 : $#broken)]));
is($lines, $expect, 'one audit line per request to a connector route');

$t->stop;
$t->check_error_log;

done_testing;
