#!/usr/bin/perl
# sbx_catalog (DESIGN.md section 8) and the connector lifecycle: the catalog
# reflects the configuration (metadata, state, sunset, capabilities, limits,
# pool, digest and pin, routes) and the live counters; deprecated answers
# carry Deprecation (RFC 9745) and Sunset (RFC 8594); retired answers 410.

use strict;
use warnings;

use lib 't/lib';
use Digest::SHA qw(sha256_hex);
use JSON::PP;
use SbxTest;
use Test::More;

my $t = SbxTest->new;

$t->write_file('a.lua', "return function(req) return {status=200, body='a'} end\n");
$t->write_file('b.lua', "return function(req) return {status=200, body='b'} end\n");
$t->write_file('e.lua', "return function(req) error('x') end\n");
my $sha_a = sha256_hex($t->read_file('a.lua'));
my $sha_b = sha256_hex($t->read_file('b.lua'));

$t->conf(<<"EOF");
sbx_pool p1 size=1;
sbx_connector a {
    script %%PREFIX%%/a.lua;
    sha256 $sha_a;
    version 2.0.1;
    owner "team-a\@example.com";
    description "Adds \\"quotes\\" and a \\\\ backslash";
    capabilities json base64;
    limits memory=16m instructions=500000 timeout=300ms;
    pool p1;
    state ga;
}
sbx_connector b {
    script %%PREFIX%%/b.lua;
    state deprecated;
    sunset 2030-06-01;
}
sbx_connector b2 {
    script %%PREFIX%%/e.lua;
    state deprecated 2026-11-01;
    sunset "Sun, 06 Nov 2033 08:49:37 GMT";
}
sbx_connector b3 { script %%PREFIX%%/b.lua; state deprecated; }
sbx_connector c { script %%PREFIX%%/a.lua; state retired; sunset 2020-01-01; }
sbx_connector d { script %%PREFIX%%/b.lua; state beta; }
server {
    listen 127.0.0.1:%%PORT%%;
    location /a      { sbx_connector a; }
    location = /a2   { sbx_connector a; }
    location /b      { sbx_connector b; }
    location /b2     { sbx_connector b2; }
    location /b3     { sbx_connector b3; }
    location /c      { sbx_connector c; }
    location /plain  { return 200 "plain\\n"; }
    location = /catalog { sbx_catalog; }
}
EOF

my $started = time;
$t->start(workers => 2);

sub catalog {
    my $r = $t->get('/catalog');
    is($r->{status}, 200, 'catalog: 200');
    like($r->{headers}{'content-type'} // '', qr{^application/json},
         'catalog: application/json');
    my $doc = eval { decode_json($r->{content}) };
    ok(ref $doc eq 'HASH', 'catalog: JSON object') or diag($r->{content});
    return { map { $_->{name} => $_ } @{ ($doc // {})->{connectors} // [] } };
}

# --- lifecycle ----------------------------------------------------------------

my $r = $t->get('/a');
is($r->{status}, 200, 'ga: 200');
ok(!exists $r->{headers}{deprecation}, 'ga: no Deprecation');
ok(!exists $r->{headers}{sunset}, 'ga: no Sunset');
$t->get('/a2');

$r = $t->get('/b');
is($r->{status}, 200, 'deprecated: still answers');
is($r->{content}, 'b', 'deprecated: runs its script');
my $dep = $r->{headers}{deprecation} // '';
like($dep, qr/^@(\d+)$/, 'Deprecation is an RFC 9745 date (@epoch)');
my ($when) = $dep =~ /^@(\d+)$/;
ok(defined $when && $when <= time && $when >= $started - 60,
   'Deprecation: the time the configuration was loaded');
is($r->{headers}{sunset}, 'Sat, 01 Jun 2030 00:00:00 GMT',
   'Sunset is the HTTP-date of "sunset 2030-06-01"');

$r = $t->get('/b2');
$t->error_ok($r, 500, 'transform_error', 'deprecated + script error: 500');
is($r->{headers}{deprecation}, '@1793491200',
   'deprecated: Deprecation on an error answer too, '
   . 'the date of "state deprecated 2026-11-01"');
is($r->{headers}{sunset}, 'Sun, 06 Nov 2033 08:49:37 GMT',
   'Sunset from an HTTP-date');

$r = $t->get('/b3');
like($r->{headers}{deprecation} // '', qr/^@\d+$/, 'deprecated, no sunset: '
     . 'Deprecation');
ok(!exists $r->{headers}{sunset}, 'deprecated, no sunset: no Sunset');

for my $m (qw(GET POST)) {
    $r = $t->request($m, '/c', $m eq 'POST' ? { content => 'body' } : {});
    $t->error_ok($r, 410, 'connector_retired', "retired: $m answers 410");
}
ok(!exists $r->{headers}{deprecation}, 'retired: no Deprecation header');

is($t->get('/plain')->{content}, "plain\n", 'other locations unaffected');

# --- catalog --------------------------------------------------------------------

my $cat = catalog();
is_deeply([ sort keys %$cat ], [ qw(a b b2 b3 c d) ],
          'every connector, including the retired and the unused one');

my $a = $cat->{a} // {};
is_deeply([ sort keys %$a ],
          [ sort qw(name version owner description state deprecation
                    sunset capabilities
                    limits pool sha256 pinned routes counters) ],
          'a connector has every field');
is($a->{version}, '2.0.1', 'version');
is($a->{owner}, 'team-a@example.com', 'owner');
is($a->{description}, 'Adds "quotes" and a \\ backslash',
   'description (escaped in JSON)');
is($a->{state}, 'ga', 'state ga');
is($a->{sunset}, undef, 'no sunset: null');
is($a->{deprecation}, undef, 'not deprecated: deprecation null');
is_deeply($a->{capabilities}, [ qw(json base64) ], 'capabilities');
is_deeply($a->{limits}, { memory => 16 * 1024 * 1024, instructions => 500000,
                          timeout_ms => 300 }, 'limits');
is($a->{pool}, 'p1', 'pool');
is($a->{sha256}, $sha_a, 'sha256 is the digest of the script');
ok($a->{pinned} && JSON::PP::is_bool($a->{pinned}), 'pinned: true');
is_deeply([ sort @{ $a->{routes} // [] } ], [ '/a', '= /a2' ],
          'routes: the locations that use it, as written');

my $b = $cat->{b} // {};
is($b->{state}, 'deprecated', 'b: deprecated');
is($b->{sunset}, 'Sat, 01 Jun 2030 00:00:00 GMT', 'b: sunset');
like($b->{deprecation} // '', qr/^\w{3}, \d\d \w{3} \d{4} [\d:]{8} GMT$/,
     'b: deprecation, an HTTP-date (configuration time)');
is($cat->{b2}{deprecation}, 'Sun, 01 Nov 2026 00:00:00 GMT',
   'b2: deprecation, the date given to state deprecated');
is($b->{version}, undef, 'b: no version: null');
is($b->{owner}, undef, 'b: no owner: null');
is($b->{description}, undef, 'b: no description: null');
ok(JSON::PP::is_bool($b->{pinned}) && !$b->{pinned}, 'b: pinned false');
is($b->{sha256}, $sha_b, 'b: the digest even when not pinned');
is($b->{pool}, 'default', 'b: pool default');
is_deeply($b->{capabilities}, [], 'b: no capabilities: []');
is_deeply($b->{limits}, { memory => 32 * 1024 * 1024,
                          instructions => 10000000, timeout_ms => 500 },
          'b: default limits');

is($cat->{c}{state}, 'retired', 'c: retired');
is($cat->{c}{sunset}, 'Wed, 01 Jan 2020 00:00:00 GMT', 'c: sunset in the past');
is($cat->{d}{state}, 'beta', 'd: beta');
is_deeply($cat->{d}{routes}, [], 'd: no route: []');

# counters, summed over both workers; the log phase runs after the answer
ok($t->wait_for(sub { (catalog()->{c}{counters}{requests} // 0) == 2 }, 5),
   'counters settle');
$cat = catalog();
is($cat->{a}{counters}{requests}, 2, 'a: 2 requests');
is($cat->{a}{counters}{allowed}, 2, 'a: 2 allowed');
is($cat->{c}{counters}{requests}, 2, 'c: 2 requests');
is($cat->{c}{counters}{allowed}, 0, 'c: none allowed');
is($cat->{c}{counters}{denials}{retired}, 2, 'c: 2 denials retired');
is($cat->{b2}{counters}{denials}{transform_error}, 1,
   'b2: 1 transform_error');
is_deeply([ sort keys %{ $cat->{a}{counters}{denials} } ],
          [ sort qw(residency_denied rate_limited retired transform_error
                    transform_timeout overloaded sandbox_failure
                    ratelimit_unavailable) ],
          'denials: every decision but allowed');
is($cat->{d}{counters}{requests}, 0, 'd: unused: 0');

$r = $t->request('POST', '/catalog', { content => 'x' });
is($r->{status}, 405, 'POST /catalog: 405');

# --- reload: a new state is in effect and the counters stay ----------------------

my $conf = $t->conf;
$conf =~ s/state ga;/state retired;/;
$t->conf($conf);
$t->reload;
$r = $t->get('/a');
$t->error_ok($r, 410, 'connector_retired', 'reload: a is retired now');
$cat = catalog();
is($cat->{a}{state}, 'retired', 'reload: catalog shows the new state');
cmp_ok($cat->{a}{counters}{requests}, '>=', 2, 'reload: counters kept');

$t->stop;
$t->check_error_log;

done_testing;
