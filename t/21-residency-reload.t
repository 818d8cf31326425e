#!/usr/bin/perl
# Data residency across reloads: the database handle belongs to the
# configuration cycle.  A replaced file changes nothing until
# `nginx -s reload`, then every answer comes from the new file; no answer
# mixes the two; a broken replacement is refused and the old one stays.

use strict;
use warnings;

use lib 't/lib';
use HTTP::Tiny;
use POSIX ();
use SbxMMDB;
use SbxTest;
use Test::More;
use Time::HiRes qw(sleep time);

my %A = %SbxMMDB::ADDR;
my ($E1, $E2) = (1700000001, 1700000002);

my $t = SbxTest->new;
my $p = $t->prefix;
my $db = "$p/geo.mmdb";

# v2 moves Bavaria to France and California to Japan
my @v2 = map {
    my @r = @$_;
    @r = ($r[0], 'FR', 'EU', ['IDF']) if $r[0] eq '5.1.0.0/16';
    @r = ($r[0], 'JP', 'AS', [])      if $r[0] eq '8.8.0.0/16';
    \@r;
} @SbxMMDB::NETWORKS;

SbxMMDB::write_city($db, epoch => $E1);
$t->write_file('ok.txt', "static ok\n");

$t->conf(<<'EOF');
sbx_geoip_db %%PREFIX%%/geo.mmdb;
server {
    listen 127.0.0.1:%%PORT%%;
    default_type text/plain;
    set_real_ip_from 127.0.0.1;
    real_ip_header X-Forwarded-For;
    location = /vars {
        return 200 "$sbx_country $sbx_geoip_build_epoch\n";
    }
    location = /allow-de {
        sbx_residency allow DE;
        alias %%PREFIX%%/ok.txt;
    }
    location = /bavaria {
        sbx_residency allow DE-BY;
        alias %%PREFIX%%/ok.txt;
    }
}
EOF

$t->start(workers => 2);

sub from {
    my ($addr, $path) = @_;
    return $t->get($path, { headers => { 'X-Forwarded-For' => $addr } });
}

sub vars { return from($_[0], '/vars')->{content} // '' }

is(vars($A{de_by}), "DE $E1\n", 'v1: Bavaria is DE');
is(vars($A{us_ca}), "US $E1\n", 'v1: California is US');
is(from($A{de_by}, '/allow-de')->{status}, 200, 'v1: allow DE lets it in');
is(from($A{de_by}, '/bavaria')->{status}, 200, 'v1: allow DE-BY too');

# replace the file the way geoipupdate does (write, rename)
SbxMMDB::write_city($db, networks => \@v2, epoch => $E2);

my %seen;
$seen{ vars($A{de_by}) }++ for 1 .. 10;
is_deeply(\%seen, { "DE $E1\n" => 10 },
          'replaced file: answers unchanged until reload');

# requests keep flowing while nginx reloads; each answer is one whole
# database's view: (DE, E1) or (FR, E2)
pipe my $rd, my $wr or die "pipe: $!";
my $child = fork // die "fork: $!";
if ($child == 0) {
    close $rd;
    my $http = HTTP::Tiny->new(timeout => 5, keep_alive => 0);
    my $url = 'http://127.0.0.1:' . $t->port . '/vars';
    my $end = time + 2.5;
    while (time < $end) {
        my $r = $http->get($url,
                           { headers => { 'X-Forwarded-For' => $A{de_by} } });
        my $c = $r->{content} // '';
        $c =~ s/\n/\\n/g;
        print {$wr} "$r->{status} $c\n";
    }
    close $wr;
    POSIX::_exit(0);
}
close $wr;
sleep 0.3;
ok($t->reload, 'reload with the replaced file');
my @answers = <$rd>;
close $rd;
waitpid $child, 0;

my %kinds;
$kinds{$_}++ for @answers;
my @bad = grep { !/^200 (?:DE \Q$E1\E|FR \Q$E2\E)\\n$/ } keys %kinds;
ok(@answers > 20, 'requests were answered during the reload ('
                  . scalar(@answers) . ')');
is_deeply(\@bad, [], 'no answer mixes the two databases or fails')
    or diag(explain(\%kinds));
ok($kinds{"200 FR $E2\\n\n"}, 'new answers appear during the run');

is(vars($A{de_by}), "FR $E2\n", 'v2: Bavaria range is now FR');
is(vars($A{us_ca}), "JP $E2\n", 'v2: California range is now JP');
is(vars($A{de_be}), "DE $E2\n", 'v2: Berlin unchanged, new epoch');
$t->error_ok(from($A{de_by}, '/allow-de'), 451, 'residency_denied',
             'v2: the rule now denies the moved range');
is(from($A{de_be}, '/allow-de')->{status}, 200, 'v2: Berlin still allowed');
is(from($A{de_by}, '/bavaria')->{status}, 451,
   'v2: subdivision rule follows the new data');

# a corrupt replacement: reload refused, old data still served
$t->write_file("$db.tmp", "not a database\n" x 100);
rename "$db.tmp", $db or die "rename: $!";
my $len = length $t->error_log;
ok(!$t->reload(may_fail => 1, timeout => 10),
   'reload with a corrupt file is refused');
like(substr($t->error_log, $len), qr/\[emerg\].*sbx_geoip_db.*\Q$db\E/,
     'the refusal names the database path');
is(vars($A{de_by}), "FR $E2\n", 'after the refused reload: old data served');

# a Country database under a subdivision rule: refused, old data served
SbxMMDB::write_country($db, epoch => $E1);
$len = length $t->error_log;
ok(!$t->reload(may_fail => 1, timeout => 10),
   'reload with a Country database under a DE-BY rule is refused');
like(substr($t->error_log, $len),
     qr/\[emerg\].*rule "allow DE-BY" names a subdivision but database/,
     'the refusal explains the missing subdivisions');
is(vars($A{us_ca}), "JP $E2\n", 'still the last good database');

# back to v1
SbxMMDB::write_city($db, epoch => $E1);
ok($t->reload, 'reload with v1 again');
is(vars($A{de_by}), "DE $E1\n", 'v1 again: Bavaria is DE');
is(from($A{de_by}, '/allow-de')->{status}, 200, 'v1 again: allowed');

$t->stop;
$t->check_error_log(allow => [ qr/sbx_geoip_db.*MMDB_open/,
                               qr/names a subdivision but database/ ]);

done_testing;
