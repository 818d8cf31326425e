#!/usr/bin/perl
# Data residency: sbx_geoip_db, sbx_country_group, sbx_residency rules and
# sbx_residency_unknown, against real MaxMind DB files written by
# t/lib/SbxMMDB.pm.  Client addresses come from X-Forwarded-For through
# nginx's realip module (trusted proxy 127.0.0.1), which is also what the
# module is documented to rely on.

use strict;
use warnings;

use lib 't/lib';
use IO::Socket::IP;
use JSON::PP;
use SbxMMDB;
use SbxTest;
use Test::More;

my %A = %SbxMMDB::ADDR;

my $t = SbxTest->new;
my $p = $t->prefix;

SbxMMDB::write_city("$p/city.mmdb");
$t->write_file('ok.txt', "static ok\n");
$t->write_file('geo.lua', <<'EOF');
return {
  request = function(req)
    return { status = 200,
             body = (req.client.country or "") .. "/"
                    .. (req.client.continent or "") }
  end
}
EOF

# IPv6 loopback: only the [::1] listener part depends on it
my $have6 = IO::Socket::IP->new(LocalHost => '::1', LocalPort => 0,
                                Listen => 1, ReuseAddr => 1) ? 1 : 0;

# location NAME serving a static file, with the given directives
sub loc {
    my ($name, @lines) = @_;
    my $body = join(' ', map { "$_;" } @lines);
    return "    location = /$name { $body alias %%PREFIX%%/ok.txt; }\n";
}

my $locations = join('',
    loc('allow-de',     'sbx_residency allow DE'),
    loc('deny-us',      'sbx_residency deny US'),
    loc('eu',           'sbx_residency allow eu'),
    loc('eea',          'sbx_residency allow eea'),
    loc('dach',         'sbx_residency allow dach'),
    loc('alps',         'sbx_residency allow alps'),
    loc('deny-eu',      'sbx_residency deny eu'),
    loc('multi',        'sbx_residency allow JP ZA US-NY'),
    loc('order-deny',   'sbx_residency deny DE', 'sbx_residency allow eu'),
    loc('order-allow',  'sbx_residency allow eu', 'sbx_residency deny DE'),
    loc('sub-deny',     'sbx_residency deny DE-BY', 'sbx_residency allow DE'),
    loc('sub-allow',    'sbx_residency allow DE-BY US-CA'),
    loc('sub-fr',       'sbx_residency allow FR-75'),
    loc('unk-allow',    'sbx_residency allow DE',
                        'sbx_residency_unknown allow'),
    loc('unk-deny',     'sbx_residency deny US',
                        'sbx_residency_unknown deny'),
    loc('unk-default',  'sbx_residency deny US'),
    loc('unk-only',     'sbx_residency deny JP',
                        'sbx_residency_unknown allow'),
    loc('dry',          'sbx_residency allow DE',
                        'sbx_residency_dry_run on'),
    loc('quiet',        'sbx_residency allow AT',
                        'sbx_residency_log_level notice'),
    loc('off',          'sbx_residency off'),
);

my $v6server = !$have6 ? '' : <<'EOF';
server {
    listen [::1]:%%PORT5%%;
    access_log %%PREFIX%%/geo.log geo;
    default_type text/plain;
    add_header X-Country $sbx_country always;
    location = /vars { return 200 "[$sbx_country] [$sbx_continent]\n"; }
    location = /allow-de { sbx_residency allow DE; alias %%PREFIX%%/ok.txt; }
    location = /unk-allow {
        sbx_residency allow DE;
        sbx_residency_unknown allow;
        alias %%PREFIX%%/ok.txt;
    }
    location /realip/ {
        set_real_ip_from ::1;
        real_ip_header X-Forwarded-For;
        sbx_residency allow DE;
        alias %%PREFIX%%/;
    }
}
EOF

$t->conf(<<"EOF");
sbx_country_group dach DE AT CH;
sbx_country_group alps dach IT SI;
sbx_connector geo {
    script %%PREFIX%%/geo.lua;
    capabilities json;
}
log_format geo '\$request_uri c=\$sbx_country k=\$sbx_continent '
               'r=\$sbx_residency d=\$sbx_decision s=\$status';
map \$sbx_country \$sbx_region {
    default other;
    DE      eu-central;
    US      us;
}
server {
    listen 127.0.0.1:%%PORT%%;
    access_log %%PREFIX%%/geo.log geo;
    default_type text/plain;
    set_real_ip_from 127.0.0.1;
    set_real_ip_from 9.9.0.0/16;
    real_ip_header X-Forwarded-For;
    real_ip_recursive on;
    add_header X-Country \$sbx_country always;
    add_header X-Continent \$sbx_continent always;
    add_header X-Region \$sbx_region always;

    location = /vars {
        return 200 "[\$sbx_country] [\$sbx_continent] [\$remote_addr]\\n";
    }
    location = /open { alias %%PREFIX%%/ok.txt; }
$locations
    location /static/ {
        sbx_residency allow FR;
        alias %%PREFIX%%/;
    }
    location = /conn {
        sbx_residency allow eu;
        sbx_connector geo;
    }
    location = /conn-open { sbx_connector geo; }
    location = /status { sbx_status; }
}
# no realip: X-Forwarded-For means nothing
server {
    listen 127.0.0.1:%%PORT2%%;
    default_type text/plain;
    location = /vars { return 200 "[\$sbx_country] [\$remote_addr]\\n"; }
    location = /allow-de { sbx_residency allow DE; alias %%PREFIX%%/ok.txt; }
}
# realip, but the connection does not come from a trusted proxy
server {
    listen 127.0.0.1:%%PORT3%%;
    default_type text/plain;
    set_real_ip_from 192.0.2.1;
    real_ip_header X-Forwarded-For;
    real_ip_recursive on;
    location = /vars { return 200 "[\$sbx_country] [\$remote_addr]\\n"; }
    location = /allow-de { sbx_residency allow DE; alias %%PREFIX%%/ok.txt; }
}
# realip without recursion: the last address of the header is the client
server {
    listen 127.0.0.1:%%PORT4%%;
    default_type text/plain;
    set_real_ip_from 127.0.0.1;
    set_real_ip_from 9.9.0.0/16;
    real_ip_header X-Forwarded-For;
    real_ip_recursive off;
    location = /vars { return 200 "[\$sbx_country] [\$remote_addr]\\n"; }
    location = /allow-de { sbx_residency allow DE; alias %%PREFIX%%/ok.txt; }
}
$v6server
# after the servers that use it: rules are resolved once the block is read
sbx_geoip_db %%PREFIX%%/city.mmdb;
EOF

$t->start;

sub from {
    my ($addr, $path, %o) = @_;
    my %h = (defined $addr ? ('X-Forwarded-For' => $addr) : ());
    return $t->get($path, { headers => \%h, port => $o{port} });
}

# ---- variables, with no rule on the location ----------------------------

my $r = from($A{de_by}, '/vars');
is($r->{content}, "[DE] [EU] [$A{de_by}]\n",
   '$sbx_country/$sbx_continent for a German address (return, no rule)');
is(from($A{us_ca}, '/vars')->{content}, "[US] [NA] [$A{us_ca}]\n",
   'US address');
is(from($A{jp}, '/vars')->{content}, "[JP] [AS] [$A{jp}]\n", 'JP address');
is(from($A{nocc}, '/vars')->{content}, "[] [EU] [$A{nocc}]\n",
   'record with a continent and no country: country empty');
is(from($A{priv}, '/vars')->{content}, "[] [] [$A{priv}]\n",
   'private address: no country, no continent');
is(from($A{none}, '/vars')->{content}, "[] [] [$A{none}]\n",
   'address missing from the database: empty');
is(from(undef, '/vars')->{content}, "[] [] [127.0.0.1]\n",
   'loopback without a proxy header: empty');
is(from($A{de6}, '/vars')->{content}, "[DE] [EU] [$A{de6}]\n",
   'IPv6 address (DE)');
is(from($A{za6}, '/vars')->{content}, "[ZA] [AF] [$A{za6}]\n",
   'IPv6 address (ZA)');
is(from($A{none6}, '/vars')->{content}, "[] [] [$A{none6}]\n",
   'IPv6 address missing from the database');
is(from("::ffff:$A{fr}", '/vars')->{content},
   "[FR] [EU] [::ffff:$A{fr}]\n", 'IPv4-mapped IPv6 address looks up IPv4');

$r = from($A{de_by}, '/open');
is($r->{status}, 200, 'location without rules: 200');
is($r->{headers}{'x-country'}, 'DE', 'add_header $sbx_country');
is($r->{headers}{'x-continent'}, 'EU', 'add_header $sbx_continent');
is($r->{headers}{'x-region'}, 'eu-central', 'map on $sbx_country');
$r = from($A{us_ny}, '/open');
is($r->{headers}{'x-region'}, 'us', 'map on $sbx_country (US)');
$r = from($A{priv}, '/open');
is($r->{status}, 200, 'no rule: unknown address is not denied');
ok(!exists $r->{headers}{'x-country'},
   'unknown country: add_header sends no X-Country (empty value)');
is($r->{headers}{'x-region'}, 'other', 'map default for unknown country');

# ---- decisions -------------------------------------------------------------

my @cases = (
    # location, address key, expected status, what it shows
    [ 'allow-de', 'de_by', 200, 'allow DE: DE passes' ],
    [ 'allow-de', 'de6',   200, 'allow DE: IPv6 DE passes' ],
    [ 'allow-de', 'fr',    451, 'allow DE: FR matches nothing → deny' ],
    [ 'allow-de', 'us6',   451, 'allow DE: IPv6 US denied' ],
    [ 'deny-us',  'us_ca', 451, 'deny US: US denied' ],
    [ 'deny-us',  'us6',   451, 'deny US: IPv6 US denied' ],
    [ 'deny-us',  'de_by', 200, 'deny US: no allow rule, DE passes' ],
    [ 'deny-us',  'jp',    200, 'deny US: JP passes' ],
    [ 'eu',       'de_by', 200, 'allow eu: DE' ],
    [ 'eu',       'fr',    200, 'allow eu: FR' ],
    [ 'eu',       'at',    200, 'allow eu: AT' ],
    [ 'eu',       'no',    451, 'allow eu: NO is not in the EU' ],
    [ 'eu',       'ch',    451, 'allow eu: CH is not in the EU' ],
    [ 'eu',       'us_ca', 451, 'allow eu: US' ],
    [ 'eu',       'nocc',  451, 'allow eu: continent EU without country' ],
    [ 'eea',      'no',    200, 'allow eea: NO' ],
    [ 'eea',      'de_be', 200, 'allow eea: DE (eu inside eea)' ],
    [ 'eea',      'ch',    451, 'allow eea: CH is not in the EEA' ],
    [ 'dach',     'ch',    200, 'custom group dach: CH' ],
    [ 'dach',     'at',    200, 'custom group dach: AT' ],
    [ 'dach',     'fr',    451, 'custom group dach: FR' ],
    [ 'alps',     'ch',    200, 'nested group alps > dach: CH' ],
    [ 'alps',     'no',    451, 'nested group alps: NO' ],
    [ 'deny-eu',  'fr',    451, 'deny eu: FR' ],
    [ 'deny-eu',  'ch',    200, 'deny eu: CH passes' ],
    [ 'multi',    'jp',    200, 'several names in one rule: JP' ],
    [ 'multi',    'za6',   200, 'several names in one rule: ZA' ],
    [ 'multi',    'us_ny', 200, 'several names in one rule: US-NY' ],
    [ 'multi',    'us_ca', 451, 'several names in one rule: US-CA is not' ],
    [ 'order-deny',  'de_by', 451, 'deny DE before allow eu: DE denied' ],
    [ 'order-deny',  'fr',    200, 'deny DE before allow eu: FR allowed' ],
    [ 'order-deny',  'us_ca', 451, 'deny DE, allow eu: US matches nothing' ],
    [ 'order-allow', 'de_by', 200, 'allow eu before deny DE: DE allowed' ],
    [ 'order-allow', 'ch',    451, 'allow eu, deny DE: CH matches nothing' ],
    [ 'sub-deny',  'de_by', 451, 'deny DE-BY before allow DE: Bavaria' ],
    [ 'sub-deny',  'de6',   451, 'deny DE-BY: IPv6 Bavaria' ],
    [ 'sub-deny',  'de_be', 200, 'deny DE-BY, allow DE: Berlin' ],
    [ 'sub-allow', 'de_by', 200, 'allow DE-BY US-CA: Bavaria' ],
    [ 'sub-allow', 'us_ca', 200, 'allow DE-BY US-CA: California' ],
    [ 'sub-allow', 'us6',   200, 'allow DE-BY US-CA: IPv6 California' ],
    [ 'sub-allow', 'de_be', 451, 'allow DE-BY US-CA: Berlin' ],
    [ 'sub-allow', 'us_ny', 451, 'allow DE-BY US-CA: New York' ],
    [ 'sub-fr',    'fr',    200, 'second subdivision of a record (FR-75)' ],
    [ 'unk-allow', 'priv',  200, 'unknown allow: private address' ],
    [ 'unk-allow', 'none',  200, 'unknown allow: address not in the DB' ],
    [ 'unk-allow', 'none6', 200, 'unknown allow: IPv6 not in the DB' ],
    [ 'unk-allow', 'nocc',  200, 'unknown allow: record without country' ],
    [ 'unk-allow', 'fr',    451, 'unknown allow: a known FR still denied' ],
    [ 'unk-allow', undef,   200, 'unknown allow: loopback' ],
    [ 'unk-deny',  'priv',  451, 'unknown deny: private address' ],
    [ 'unk-deny',  'none6', 451, 'unknown deny: IPv6 not in the DB' ],
    [ 'unk-deny',  'nocc',  451, 'unknown deny: record without country' ],
    [ 'unk-deny',  'jp',    200, 'unknown deny, deny US: JP passes' ],
    [ 'unk-default', 'priv', 451, 'unknown defaults to deny' ],
    [ 'unk-default', undef,  451, 'unknown defaults to deny: loopback' ],
    [ 'allow-de',  'priv',  451, 'allow DE: private address denied' ],
    [ 'unk-only',  'priv',  200, 'deny JP, unknown allow: private passes' ],
    [ 'unk-only',  'jp',    451, 'deny JP, unknown allow: JP denied' ],
    [ 'off',       'priv',  200, 'sbx_residency off: no check' ],
);

for my $c (@cases) {
    my ($loc, $key, $want, $name) = @$c;
    my $addr = defined $key ? $A{$key} : undef;
    $r = from($addr, "/$loc");
    is($r->{status}, $want, "$name (/$loc from " . ($addr // 'loopback')
                            . ")");
    if ($want == 200) {
        is($r->{content}, "static ok\n", "$name: static file served")
            if $r->{status} == 200 && $loc eq 'allow-de';
    }
}

# ---- the 451 answer ----------------------------------------------------

$r = from($A{fr}, '/allow-de');
my $rid = $t->error_ok($r, 451, 'residency_denied',
                       '451 body {"error":"residency_denied",...} as JSON');
is($r->{reason}, 'Unavailable For Legal Reasons', '451 reason phrase');
is($r->{headers}{'x-country'}, 'FR', 'add_header ... always on a 451');
unlike($r->{content}, qr/static ok/, '451 does not leak the file');

$r = from($A{fr}, '/static/ok.txt');
is($r->{status}, 200, 'prefix location with a rule: FR serves the file');
is($r->{content}, "static ok\n", 'prefix location: file content');
$r = from($A{de_by}, '/static/ok.txt');
$t->error_ok($r, 451, 'residency_denied', 'prefix location: DE denied');

# HEAD: no body, still 451
$r = $t->request('HEAD', '/allow-de',
                 { headers => { 'X-Forwarded-For' => $A{us_ca} } });
is($r->{status}, 451, 'HEAD denied with 451');

# ---- the error log names the rule ----------------------------------------

my $conf = $t->conf_path;
my $log = $t->error_log;
my $line = $t->conf_line('location = /deny-us ');
my $want = qq{sbx_residency: denied country "US" by rule "deny US" }
         . "at $conf:$line,";
like($log, qr/\[error\].*\Q$want\E/,
     'deny by rule: error log has the country, rule, file and line');
like($log, qr/\[error\].*denied country "FR": no rule matched/,
     'deny by no match: error log says so');
like($log, qr/\[error\].*denied client with unknown country/,
     'deny of an unknown client: error log says so');

$r = from($A{de_by}, '/quiet');
is($r->{status}, 451, 'sbx_residency_log_level notice: still denied');
ok($t->wait_for(sub { $t->error_log =~ /\[notice\].*denied country "DE"/ },
                3), 'sbx_residency_log_level notice: logged at notice');
unlike($t->error_log, qr/\[error\].*denied country "DE".*"GET \/quiet /,
       'and not at error');

# ---- dry run ------------------------------------------------------------

$r = from($A{fr}, '/dry');
is($r->{status}, 200, 'dry run: FR would be denied but passes');
is($r->{content}, "static ok\n", 'dry run: file served');
like($t->error_log, qr/dry run, would deny country "FR"/,
     'dry run: the decision is logged');
$r = from($A{de_by}, '/dry');
is($r->{status}, 200, 'dry run: DE passes');

# ---- realip ---------------------------------------------------------

# trusted chain with recursion: 9.9.0.0/16 is a trusted proxy, skipped
is(from("$A{de_by}, $A{us_ny}", '/vars')->{content},
   "[DE] [EU] [$A{de_by}]\n",
   'recursive realip skips a trusted proxy (9.9.0.0/16)');
is(from("$A{de_by}, $A{us_ny}", '/allow-de')->{status}, 200,
   'recursive realip: the rule sees the client behind the proxies');
# an untrusted hop is the client, whatever it claims before it
is(from("$A{de_by}, $A{fr}", '/vars')->{content},
   "[FR] [EU] [$A{fr}]\n", 'recursive realip stops at an untrusted hop');
is(from("$A{de_by}, $A{fr}", '/allow-de')->{status}, 451,
   'a forged first X-Forwarded-For entry does not help');

my $p2 = $t->port(2);
is(from($A{de_by}, '/vars', port => $p2)->{content}, "[] [127.0.0.1]\n",
   'without realip the module ignores X-Forwarded-For');
is(from($A{de_by}, '/allow-de', port => $p2)->{status}, 451,
   'without realip a forged X-Forwarded-For is not trusted');

my $p3 = $t->port(3);
is(from($A{de_by}, '/vars', port => $p3)->{content}, "[] [127.0.0.1]\n",
   'realip from an untrusted proxy: header ignored');
is(from($A{de_by}, '/allow-de', port => $p3)->{status}, 451,
   'untrusted proxy: denied as unknown');

my $p4 = $t->port(4);
is(from("$A{de_by}, $A{us_ny}", '/vars', port => $p4)->{content},
   "[US] [$A{us_ny}]\n", 'realip without recursion: last hop is the client');
is(from("$A{de_by}, $A{us_ny}", '/allow-de', port => $p4)->{status}, 451,
   'realip without recursion: denied for the last hop (US)');
is(from($A{de_by}, '/allow-de', port => $p4)->{status}, 200,
   'realip without recursion: single entry');

# ---- IPv6 listener ------------------------------------------------------

SKIP: {
    skip 'no IPv6 loopback (::1) on this machine', 7 unless $have6;
    my $u = 'http://[::1]:' . $t->port(5);
    my $ok = $t->wait_for(sub {
        IO::Socket::IP->new(PeerHost => '::1', PeerPort => $t->port(5),
                            Timeout => 1) }, 5);
    ok($ok, 'nginx listens on [::1]');
    $r = $t->get("$u/vars");
    is($r->{content}, "[] []\n", '[::1] client: no country');
    is($t->get("$u/allow-de")->{status}, 451,
       '[::1] client under unknown deny: 451');
    is($t->get("$u/unk-allow")->{status}, 200,
       '[::1] client under unknown allow: 200');
    $r = $t->get("$u/realip/ok.txt",
                 { headers => { 'X-Forwarded-For' => $A{de6} } });
    is($r->{status}, 200, 'IPv6 listener, realip from ::1, IPv6 DE client');
    is($r->{headers}{'x-country'}, 'DE', 'and $sbx_country is DE');
    $r = $t->get("$u/realip/ok.txt",
                 { headers => { 'X-Forwarded-For' => $A{us6} } });
    is($r->{status}, 451, 'IPv6 listener, realip, IPv6 US client: 451');
}

# ---- connector routes -----------------------------------------------------

$r = from($A{de_by}, '/conn');
is($r->{status}, 200, 'connector route with allow eu: DE passes');
is($r->{content}, 'DE/EU', 'req.client.country and continent in the script');
$r = from($A{us_ca}, '/conn');
$t->error_ok($r, 451, 'residency_denied',
             'connector route: US denied before the script runs');
is($r->{headers}{'x-country'}, 'US', 'connector route 451: X-Country');
$r = from($A{priv}, '/conn');
$t->error_ok($r, 451, 'residency_denied', 'connector route: unknown denied');
is(from($A{za6}, '/conn-open')->{content}, 'ZA/AF',
   'connector without rules: IPv6 client country in req.client');
is(from($A{priv}, '/conn-open')->{content}, '/',
   'connector without rules: unknown client has no country');
is(from($A{de_by}, '/conn-open')->{content}, 'DE/EU',
   'connector without rules: DE');

$r = $t->get('/status');
like($r->{content},
     qr/sbx_requests_total\{connector="geo",decision="residency_denied"\} 2\b/,
     'metrics count the two residency denials of the connector route')
    or diag(join("\n", grep { /sbx_requests_total/ }
                       split /\n/, $r->{content} // ''));

# ---- access log variables -------------------------------------------------

my %seen;
ok($t->wait_for(sub {
    my $a = $t->read_file('geo.log') // '';
    return $a =~ m{^/conn-open c=DE }m;
}, 3), 'access log written');
my $alog = $t->read_file('geo.log') // '';
like($alog, qr{^/vars c=DE k=EU }m, 'log_format: $sbx_country/$sbx_continent');
like($alog, qr{^/vars c=- k=- }m, 'log_format: unknown client logs "-"');
like($alog, qr{^/allow-de c=FR k=EU r=denied d=residency_denied s=451$}m,
     'log_format: a denial ($sbx_residency, $sbx_decision, 451)');
like($alog, qr{^/allow-de c=DE k=EU r=allowed \S+ s=200$}m,
     'log_format: an allowed request');
like($alog, qr{^/dry c=FR k=EU r=dry_run \S+ s=200$}m,
     'log_format: dry run');
like($alog, qr{^/open c=DE k=EU r=- }m,
     'log_format: $sbx_residency is empty without rules');

$t->stop;
$t->check_error_log;

# ---- configuration errors -------------------------------------------------

sub conf_fails {
    my ($http, $re, $name) = @_;
    my $c = SbxTest->new;
    my $cp = $c->prefix;
    SbxMMDB::write_city("$cp/city.mmdb");
    SbxMMDB::write_country("$cp/country.mmdb");
    $c->conf($http);
    my ($rc, $out) = $c->nginx_t;
    isnt($rc, 0, "$name: nginx -t fails");
    $re = $re->($c) if ref $re eq 'CODE';
    like($out, $re, "$name: message") or diag($out);
    return $c;
}

sub conf_ok {
    my ($http, $name, $setup) = @_;
    my $c = SbxTest->new;
    my $cp = $c->prefix;
    SbxMMDB::write_city("$cp/city.mmdb");
    SbxMMDB::write_country("$cp/country.mmdb");
    $setup->($c) if $setup;
    $c->conf($http);
    my ($rc, $out) = $c->nginx_t;
    is($rc, 0, "$name: nginx -t passes") or diag($out);
    return $c;
}

sub srv {
    return "server { listen 127.0.0.1:%%PORT%%; location / { $_[0] } }\n";
}

conf_fails("sbx_geoip_db %%PREFIX%%/country.mmdb;\n"
           . srv('sbx_residency allow DE-BY;'),
           sub {
               my $cp = $_[0]->prefix;
               my $m = '"sbx_residency" rule "allow DE-BY" names a '
                     . "subdivision but database \"$cp/country.mmdb\" "
                     . '(type "GeoLite2-Country") has no subdivisions';
               qr/\[emerg\].*\Q$m\E.*nginx\.conf:\d+/;
           },
           'Country DB with a subdivision rule');

conf_ok("sbx_geoip_db %%PREFIX%%/country.mmdb;\n"
        . srv('sbx_residency allow DE eu;'),
        'Country DB with country rules');

conf_fails("sbx_geoip_db %%PREFIX%%/missing.mmdb;\n",
           sub {
               my $cp = $_[0]->prefix;
               qr/\[emerg\].*sbx_geoip_db.*\Q$cp\E\/missing\.mmdb.*
                  (?:No\ such\ file|Error\ opening)/x;
           },
           'missing database');

my $c = SbxTest->new;
$c->write_file('corrupt.mmdb', "this is not a MaxMind DB file\n" x 50);
$c->conf("sbx_geoip_db %%PREFIX%%/corrupt.mmdb;\n");
my ($rc, $out) = $c->nginx_t;
isnt($rc, 0, 'corrupt database: nginx -t fails');
like($out, qr/\[emerg\].*sbx_geoip_db.*\Q${\ $c->prefix }\E\/corrupt\.mmdb.*
              (?:invalid|metadata)/xi,
     'corrupt database: message names the path and the reason')
    or diag($out);

# a real database cut in half: metadata gone
$c = SbxTest->new;
SbxMMDB::write_city($c->prefix . '/whole.mmdb');
my $whole = $c->read_file('whole.mmdb');
$c->write_file('half.mmdb', substr($whole, 0, length($whole) / 2));
$c->conf("sbx_geoip_db %%PREFIX%%/half.mmdb;\n");
($rc, $out) = $c->nginx_t;
isnt($rc, 0, 'truncated database: nginx -t fails');
like($out, qr/half\.mmdb/, 'truncated database: message names the path')
    or diag($out);

# an mmdb without country.iso_code (an ASN database, say) would make every
# client "unknown": refused
$c = SbxTest->new;
SbxMMDB::write_db($c->prefix . '/asn.mmdb', type => 'GeoLite2-ASN',
                  networks => [ [ '81.2.69.0/24', undef, 'EU' ],
                                [ '2a02:1000::/32', undef, 'EU' ] ]);
$c->conf("sbx_geoip_db %%PREFIX%%/asn.mmdb;\n");
($rc, $out) = $c->nginx_t;
isnt($rc, 0, 'database without country.iso_code: nginx -t fails');
like($out, qr/\[emerg\].*sbx_geoip_db.*asn\.mmdb.*GeoLite2-ASN.*(?x)
              has\ no\ country\.iso_code.*nginx\.conf:\d+/,
     'database without country.iso_code: message names the path, type and '
     . 'line') or diag($out);

conf_fails(srv('sbx_residency allow DE;'),
           qr/\[emerg\].*"sbx_residency" needs a database.*nginx\.conf:\d+/,
           'rules without sbx_geoip_db');

conf_fails("sbx_geoip_db %%PREFIX%%/city.mmdb;\n"
           . srv('sbx_residency allow DE QQ;'),
           sub {
               my $l = $_[0]->conf_line('sbx_residency allow DE QQ;');
               qr/\[emerg\].*unknown country code or group "QQ".*conf:$l\b/;
           },
           'unknown country code');

conf_fails("sbx_geoip_db %%PREFIX%%/city.mmdb;\n"
           . srv('sbx_residency deny nordics;'),
           qr/\[emerg\].*unknown country code or group "nordics"/,
           'unknown group');

conf_fails("sbx_geoip_db %%PREFIX%%/city.mmdb;\n"
           . srv('sbx_residency allow de;'),
           qr/\[emerg\].*unknown country code or group "de"/,
           'lower case country code');

conf_fails("sbx_geoip_db %%PREFIX%%/city.mmdb;\n"
           . "sbx_country_group bad DE QQ;\n",
           qr/\[emerg\].*"sbx_country_group".*"QQ".*nginx\.conf:\d+/,
           'group with an unknown member');

conf_fails("sbx_geoip_db %%PREFIX%%/city.mmdb;\n"
           . "sbx_country_group a b;\nsbx_country_group b a;\n",
           qr/\[emerg\].*nests too deep or includes itself/,
           'groups that include each other');

conf_fails("sbx_geoip_db %%PREFIX%%/city.mmdb;\n"
           . srv('sbx_residency permit DE;'),
           qr/\[emerg\].*invalid parameter "permit"/,
           'sbx_residency with neither allow nor deny');

conf_fails("sbx_geoip_db %%PREFIX%%/city.mmdb;\n"
           . srv('sbx_residency_unknown maybe;'),
           qr/\[emerg\].*invalid value "maybe".*nginx\.conf:\d+/,
           'sbx_residency_unknown with a bad value');

conf_fails("sbx_geoip_db %%PREFIX%%/city.mmdb;\n"
           . "sbx_geoip_db %%PREFIX%%/city.mmdb;\n",
           qr/\[emerg\].*"sbx_geoip_db" directive is duplicate/,
           'sbx_geoip_db twice');

# redefining a built-in group is allowed, and takes effect
conf_ok("sbx_geoip_db %%PREFIX%%/city.mmdb;\n"
        . "sbx_country_group eu DE FR;\n"
        . srv('sbx_residency allow eu;'),
        'built-in group redefined');

done_testing;
