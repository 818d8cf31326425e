#!/usr/bin/perl
# Audit log (DESIGN.md section 7): one JSON line per request to a connector
# route with every field, each decision, the hash chain across workers and
# tools/sbx-audit-verify, tampering, anonymize, reopen, reload and restart.

use strict;
use warnings;

use lib 't/lib';
use Digest::SHA qw(sha256_hex);
use IO::Socket::IP;
use JSON::PP;
use POSIX ();
use SbxMMDB;
use SbxTest;
use Test::More;
use Time::HiRes qw(sleep);

my %A = %SbxMMDB::ADDR;
my $VERIFY = SbxTest::root() . '/tools/sbx-audit-verify';

my $t = SbxTest->new;
my $p = $t->prefix;
my $audit = "$p/audit.log";

SbxMMDB::write_city("$p/city.mmdb");

$t->write_file('ok.lua', <<'EOF');
return function(req)
  return { status = 200, headers = { ["content-type"] = "text/plain" },
           body = req.id }
end
EOF
$t->write_file('err.lua', 'return function(req) error("boom") end' . "\n");
$t->write_file('old.lua', 'return function(req) return {status=200} end' . "\n");
$t->write_file('dep.lua', 'return function(req) return {status=200, body="d"} end' . "\n");
$t->write_file('backtrack.lua', <<'EOF');
return function(req)
  local s = ("a"):rep(300)
  return { status = 200, body = tostring(s:find(("a-"):rep(4) .. "b")) }
end
EOF
$t->write_file('slow.lua', <<'EOF');
return function(req)
  local t0 = os.clock()
  while os.clock() - t0 < 0.6 do end
  return { status = 200, body = "slow" }
end
EOF

my $have6 = IO::Socket::IP->new(LocalHost => '::1', LocalPort => 0,
                                Listen => 1, ReuseAddr => 1) ? 1 : 0;

sub conf {
    my ($audit_line) = @_;
    my $v6 = $have6 ? "    listen [::1]:%%PORT2%%;\n" : '';
    return <<"EOF";
sbx_geoip_db %%PREFIX%%/city.mmdb;
$audit_line
sbx_pool solo size=1 queue=1;
sbx_connector ok {
    script %%PREFIX%%/ok.lua;
    version 1.2.3;
}
sbx_connector err { script %%PREFIX%%/err.lua; }
sbx_connector old { script %%PREFIX%%/old.lua; state retired; }
sbx_connector dep {
    script %%PREFIX%%/dep.lua;
    state deprecated;
    sunset 2030-01-01;
}
sbx_connector backtrack {
    script %%PREFIX%%/backtrack.lua;
    limits timeout=200ms;
}
sbx_connector slow {
    script %%PREFIX%%/slow.lua;
    pool solo;
    limits instructions=1000000000 timeout=5s;
}
server {
    listen 127.0.0.1:%%PORT%%;
$v6    set_real_ip_from 127.0.0.1;
    real_ip_header X-Forwarded-For;
    location /ok        { sbx_connector ok; }
    location /err       { sbx_connector err; }
    location /old       { sbx_connector old; }
    location /dep       { sbx_connector dep; }
    location /backtrack { sbx_connector backtrack; }
    location /slow      { sbx_connector slow; }
    location /de        { sbx_connector ok; sbx_residency allow DE; }
    location /plain     { return 200 "plain\\n"; }
}
EOF
}

sub lines_of {
    my ($path) = @_;
    my $text = $t->read_file($path) // '';
    return split /\n/, $text;
}

sub records {
    my ($path) = @_;
    return map { decode_json($_) } lines_of($path // $audit);
}

sub verify {
    my ($path) = @_;
    return $t->run_cmd([ $VERIFY, $path ], timeout => 30);
}

# audit lines are written in the log phase, after the answer: wait for n
sub wait_lines {
    my ($n, $path) = @_;
    return $t->wait_for(sub { lines_of($path // $audit) >= $n }, 5);
}

my $sha = {
    map { $_ => sha256_hex($t->read_file("$_.lua")) }
        qw(ok err old dep backtrack slow)
};

my @FIELDS = qw(ts id connector version script_sha256 decision status client
                country limit duration_ms helper_ms redis_ms bytes_in
                bytes_out worker helper headers seq prev);

# --- configuration (in a prefix of its own: its error log has [emerg]) --------

{
    my ($rc, $out);
    my $c = SbxTest->new;
    $c->write_file('ok.lua', $t->read_file('ok.lua'));
    for my $bad ('headers=authorization', 'headers=x-a,Cookie',
                 'headers=proxy-authorization', 'chain=maybe', 'anonymize=1',
                 'headers=', 'headers=a,,b', 'bogus=1',
                 'chain=on chain=off') {
        $c->conf("sbx_audit_log %%PREFIX%%/audit.log $bad;\n"
                 . "sbx_connector ok { script %%PREFIX%%/ok.lua; }\n");
        ($rc, $out) = $c->nginx_t;
        isnt($rc, 0, "sbx_audit_log ... $bad: refused");
        like($out, qr/sbx_audit_log.*in \Q${\ $c->prefix}\E\/nginx\.conf:\d+/,
             "$bad: the message names the directive, file and line");
    }
    $c->conf("sbx_audit_log %%PREFIX%%/audit.log chain=on chain=off;\n");
    ($rc, $out) = $c->nginx_t;
    like($out, qr/duplicate "chain=" in "sbx_audit_log"/,
         'a parameter given twice is named');
    $c->conf("sbx_audit_log %%PREFIX%%/audit.log;\nsbx_audit_log off;\n");
    ($rc, $out) = $c->nginx_t;
    like($out, qr/"sbx_audit_log" directive is duplicate/, 'duplicate refused');
    $c->conf("sbx_audit_log off;\n"
             . "sbx_connector ok { script %%PREFIX%%/ok.lua; }\n");
    ($rc, $out) = $c->nginx_t;
    is($rc, 0, 'sbx_audit_log off: accepted') or diag($out);
    $c->cleanup;
}

# --- one line per request, every field, every decision ----------------------

$t->conf(conf('sbx_audit_log %%PREFIX%%/audit.log headers=x-tenant,X-Missing;'));
$t->start(workers => 1);

my (@sent, $r);

$r = $t->get('/ok?x=1', { headers => {
    'X-Tenant' => 'acme "corp"', 'X-Forwarded-For' => $A{de_by},
    'Authorization' => 'Bearer SECRET-TOKEN-1',
    'Cookie' => 'session=SECRET-COOKIE-2' } });
is($r->{status}, 200, 'ok: 200');
push @sent, [ ok => 'allowed', 200, $r->{content} ];

$r = $t->post('/ok', 'SECRET-BODY-3' x 10);
push @sent, [ ok => 'allowed', 200, $r->{content} ];

$r = $t->get('/err');
push @sent, [ err => 'transform_error', 500,
              $t->error_ok($r, 500, 'transform_error', 'err: 500') ];

$r = $t->get('/old');
push @sent, [ old => 'retired', 410,
              $t->error_ok($r, 410, 'connector_retired', 'old: 410') ];

$r = $t->get('/dep');
is($r->{status}, 200, 'deprecated: 200');
push @sent, [ dep => 'allowed', 200, undef ];

$r = $t->get('/backtrack');
push @sent, [ backtrack => 'transform_timeout', 504,
              $t->error_ok($r, 504, 'transform_timeout', 'backtrack: 504') ];

$r = $t->get('/de', { headers => { 'X-Forwarded-For' => $A{us_ca} } });
push @sent, [ ok => 'residency_denied', 451,
              $t->error_ok($r, 451, 'residency_denied', 'US client: 451') ];

$r = $t->get('/de', { headers => { 'X-Forwarded-For' => $A{de_be} } });
is($r->{status}, 200, 'DE client: 200');
push @sent, [ ok => 'allowed', 200, $r->{content} ];

# header bytes that are not UTF-8 (a surrogate, a bad continuation, 0xff)
my $raw = $t->raw_request("GET /ok HTTP/1.0\r\nHost: localhost\r\n"
    . "X-Tenant: \xc3\xa9-\xed\xa0\x80-\xc3\xc3-\xff\r\n\r\n");
like($raw // '', qr{^HTTP/1\.[01] 200 }, 'raw request with odd header bytes');
push @sent, [ ok => 'allowed', 200, undef ];

# three at once on a pool of one helper with a queue of one: one overloaded
{
    my @kids;
    for my $i (1 .. 3) {
        my $pid = fork // die "fork: $!";
        if ($pid == 0) {
            my $res = $t->get('/slow', { timeout => 20 });
            open my $fh, '>', "$p/slow.$i";
            print {$fh} "$res->{status} $res->{content}";
            close $fh;
            POSIX::_exit(0);
        }
        push @kids, $pid;
        sleep 0.15;
    }
    waitpid($_, 0) for @kids;
    my @st = map { ($t->read_file("slow.$_") // '0') =~ /^(\d+)/ } 1 .. 3;
    is(join(',', sort @st), '200,200,503', 'slow: two served, one overloaded')
        or diag("@st");
    for my $s (@st) {
        push @sent, [ slow => $s == 503 ? 'overloaded' : 'allowed', $s, undef ];
    }
}

$r = $t->get('/plain');
is($r->{status}, 200, 'a location without a connector answers');

ok(wait_lines(scalar @sent), 'lines written') or diag($t->read_file($audit));
sleep 0.2;

my @lines = lines_of($audit);
is(scalar @lines, scalar @sent,
   'exactly one line per connector request (none for /plain)');

my @rec = map { my $x = eval { decode_json($_) }; $x } @lines;
is(scalar(grep { ref $_ eq 'HASH' } @rec), scalar @lines,
   'every line is one JSON object');

my ($worker) = $t->worker_pids;
my $types_ok = 1;
for my $i (0 .. $#rec) {
    my $e = $rec[$i] // {};
    my @missing = grep { !exists $e->{$_} } @FIELDS;
    my @extra = grep { my $k = $_; !grep { $_ eq $k } @FIELDS } keys %$e;
    is("@missing|@extra", '|', "line " . ($i + 1) . ": every field, no other")
        or diag($lines[$i]);
    my @why;
    push @why, 'ts' unless ($e->{ts} // '')
        =~ /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/;
    push @why, 'id' unless ($e->{id} // '') =~ /^[0-9a-f]{32}$/;
    push @why, 'script_sha256'
        unless ($e->{script_sha256} // '') =~ /^[0-9a-f]{64}$/;
    for my $k (qw(status duration_ms bytes_in bytes_out worker seq)) {
        push @why, $k unless defined $e->{$k} && $e->{$k} =~ /^\d+$/
            && !ref $e->{$k};
    }
    for my $k (qw(helper_ms helper)) {
        push @why, $k if defined $e->{$k} && $e->{$k} !~ /^\d+$/;
    }
    push @why, 'redis_ms (no rate limit)' if defined $e->{redis_ms};
    push @why, 'limit (no rate limit)' if defined $e->{limit};
    push @why, 'client' unless ($e->{client} // '') eq '127.0.0.1'
        || ($e->{client} // '') =~ /^\d+\.\d+\.\d+\.\d+$/;
    push @why, 'seq order' unless ($e->{seq} // 0) == $i + 1;
    push @why, 'worker pid' unless ($e->{worker} // 0) == $worker;
    if (@why) {
        $types_ok = 0;
        diag('line ' . ($i + 1) . ': ' . join(', ', @why) . ": $lines[$i]");
    }
}
ok($types_ok, 'fields are typed: ts with 3 fractional digits and Z, numbers, '
   . 'strings, null');

# line by line against what was sent (the slow ones may finish in any order)
my @fixed = grep { $_->[0] ne 'slow' } @sent;
for my $i (0 .. $#fixed) {
    my ($conn, $decision, $status, $id) = @{ $fixed[$i] };
    my $e = $rec[$i] // {};
    is("$e->{connector} $e->{decision} $e->{status}",
       "$conn $decision $status", "line " . ($i + 1) . ": $conn $decision");
    is($e->{script_sha256}, $sha->{$conn}, "line " . ($i + 1)
       . ': script_sha256 is the digest of the script');
    is($e->{id}, $id, 'line ' . ($i + 1) . ': id is the request id')
        if defined $id;
}
my @slow = map { $_->{decision} } grep { $_->{connector} eq 'slow' } @rec;
is(join(',', sort @slow), 'allowed,allowed,overloaded', 'slow: decisions');

my %by;
$by{"$_->{connector}:$_->{decision}"} //= $_ for @rec;
my $first = $rec[0];
is($first->{version}, '1.2.3', 'version from the connector block');
is($first->{country}, 'DE', 'country of the client (realip + GeoIP)');
is($first->{client}, $A{de_by}, 'client is the address realip settled on');
is_deeply($first->{headers}, { 'x-tenant' => 'acme "corp"', 'x-missing' => undef },
          'headers=: listed names only, lower case, null when absent')
    or diag($lines[0]);
# the helper of the first lines was killed by the backtrack timeout since
my $de = $rec[7] // {};
ok($de->{helper} && grep({ $_ == $de->{helper} } $t->helper_pids),
   'helper is the pid of the helper that ran the script') or diag($lines[7]);
ok(defined $first->{helper_ms}, 'helper_ms is set when a helper ran');
cmp_ok($first->{bytes_out}, '>', 32 + 60, 'bytes_out counts the answer');
cmp_ok($rec[1]{bytes_in}, '>=', 130, 'bytes_in counts the request body');
is($rec[1]{country}, undef, 'country null for loopback (not in the database)');
is($rec[1]{version}, '1.2.3', 'version on every line');
is($rec[2]{version}, undef, 'version null when the connector has none');
my ($odd) = grep { ($_->{headers}{'x-tenant'} // '') =~ /^\x{e9}-/ } @rec;
is($odd->{headers}{'x-tenant'},
   "\x{e9}-\x{fffd}\x{fffd}\x{fffd}-\x{fffd}\x{fffd}-\x{fffd}",
   'header value: UTF-8 kept, invalid bytes and surrogates become U+FFFD');
my $ret = $by{'old:retired'} // {};
is($ret->{helper}, undef, 'retired: helper null (nothing ran)');
is($ret->{helper_ms}, undef, 'retired: helper_ms null');
is($by{'ok:residency_denied'}{country}, 'US', 'residency_denied: country');
is($by{'ok:residency_denied'}{helper}, undef, 'residency_denied: no helper');

my $text = $t->read_file($audit);
unlike($text, qr/SECRET-(?:TOKEN|COOKIE|BODY)/,
       'no authorization, cookie or body in the audit log');
unlike($text, qr/"(?:authorization|cookie)"/i, 'not even their names');

my ($rc, $out) = verify($audit);
is($rc, 0, 'verifier: exit 0');
is($out, 'OK ' . scalar(@lines) . " lines\n", 'verifier: OK N lines');
is($rec[0]{prev}, undef, 'first line: prev null');
is($rec[1]{prev}, sha256_hex($lines[0]), 'prev is the SHA-256 of the previous line');

# --- restart: the chain continues from the file's last line ------------------

$t->stop;
my $before = scalar lines_of($audit);

$t->start(workers => 2);
$r = $t->get('/ok');
ok(wait_lines($before + 1), 'a line after restart');
my @after = records();
is($after[$before]{seq}, $before + 1, 'restart: seq continues in the file');
is($after[$before]{prev}, sha256_hex((lines_of($audit))[$before - 1]),
   'restart: prev is the hash of the last line before the restart');

# --- concurrent load from two workers ------------------------------------------

{
    my $n_kids = 6;
    my $per = 40;
    my @kids;
    for my $k (1 .. $n_kids) {
        my $pid = fork // die "fork: $!";
        if ($pid == 0) {
            my $bad = 0;
            for my $i (1 .. $per) {
                my $path = $i % 5 == 0 ? '/err' : $i % 7 == 0 ? '/old' : "/ok?k=$k&i=$i";
                my $res = $t->get($path, { headers => {
                    'X-Tenant' => "t$k" . ('x' x ($i * 7)) } });
                $bad++ unless $res->{status} =~ /^(?:200|500|410)$/;
            }
            POSIX::_exit($bad ? 1 : 0);
        }
        push @kids, $pid;
    }
    my $fails = 0;
    for (@kids) { waitpid($_, 0); $fails++ if $? }
    is($fails, 0, 'load: every request answered');

    my $want = $before + 1 + $n_kids * $per;
    ok(wait_lines($want), "load: $want lines");
    sleep 0.2;
    my @l = lines_of($audit);
    is(scalar @l, $want, 'load: one line per request');
    is(scalar(grep { !eval { decode_json($_); 1 } } @l), 0,
       'load: no torn or interleaved line');
    my %w = map { $_->{worker} => 1 } records();
    my @cur = $t->worker_pids;
    is(scalar(grep { $w{$_} } @cur), 2, 'load: both workers wrote lines');
    ($rc, $out) = verify($audit);
    is($out, "OK $want lines\n", 'load: the chain verifies across workers');
}

# --- tampering ---------------------------------------------------------------

{
    my @l = lines_of($audit);
    my $cases = {
        edited   => sub { my @x = @_; $x[4] =~ s/"status":\d+/"status":299/; @x },
        deleted  => sub { my @x = @_; splice(@x, 4, 1); @x },
        inserted => sub { my @x = @_; splice(@x, 4, 0, $x[2]); @x },
        swapped  => sub { my @x = @_; @x[4, 5] = @x[5, 4]; @x },
        seq      => sub { my @x = @_; $x[4] =~ s/"seq":\d+/"seq":77777/; @x },
        first    => sub { my @x = @_; shift @x; @x },
        torn     => sub { my @x = @_; $x[4] = substr($x[4], 0, 40); @x },
    };
    # line number the verifier must report (1-based)
    my %at = (edited => 6, deleted => 5, inserted => 5, swapped => 5,
              seq => 5, first => 1, torn => 5);
    for my $case (sort keys %$cases) {
        my $f = "$p/tamper-$case.log";
        $t->write_file($f, join("\n", $cases->{$case}->(@l)) . "\n");
        ($rc, $out) = verify($f);
        is($rc, 1, "tampering ($case): exit 1");
        like($out, qr/^BROKEN at line $at{$case}:/, "tampering ($case): "
             . "reported at line $at{$case}") or diag($out);
    }
    my $f = "$p/tamper-tail.log";
    my $whole = join("\n", @l) . "\n";
    $t->write_file($f, substr($whole, 0, -10));
    ($rc, $out) = verify($f);
    like($out, qr/^BROKEN at line ${\ scalar @l}: incomplete/,
         'a torn last line is reported');
    ($rc, $out) = verify("$p/does-not-exist");
    is($rc, 2, 'missing file: exit 2');

    # hostile lines in place of line 5: refused there, with a reason and
    # no crash (a 100 000-deep array once made a Python verifier throw)
    my %hostile = (
        deep    => '[' x 100000 . ']' x 100000,
        nan     => '{"x":NaN,"seq":5,"prev":null}',
        control => qq({"x":"a\tb","seq":5,"prev":null}),
        latin1  => qq({"x":"\xe9","seq":5,"prev":null}),
        array   => '[{"seq":5,"prev":null}]',
        noprev  => '{"seq":5}',
        seqstr  => '{"seq":"5","prev":null}',
    );
    for my $case (sort keys %hostile) {
        my @x = @l;
        $x[4] = $hostile{$case};
        my $f = "$p/hostile-$case.log";
        $t->write_file($f, join("\n", @x) . "\n");
        ($rc, $out) = verify($f);
        is($rc, 1, "hostile line ($case): exit 1");
        like($out, qr/^BROKEN at line 5: \S/,
             "hostile line ($case): reported at line 5 with a reason")
            or diag($out);
    }
    ($rc, $out) = verify($p);
    is($rc, 2, 'a directory: exit 2');
    ($rc, $out) = $t->run_cmd([ $VERIFY ], timeout => 30);
    is($rc, 2, 'no file: usage, exit 2');
}

# --- reload: the chain survives; anonymize -----------------------------------

$t->conf(conf('sbx_audit_log %%PREFIX%%/audit.log anonymize=on;'));
$t->reload;
my $n = scalar lines_of($audit);
$r = $t->get('/ok', { headers => { 'X-Forwarded-For' => '203.0.113.77' } });
ok(wait_lines($n + 1), 'line after reload');
my $e = (records())[$n];
is($e->{client}, '203.0.113.0', 'anonymize: IPv4 cut to /24');
is($e->{seq}, $n + 1, 'reload: seq continues');
is($e->{headers}, undef, 'headers null without headers=');
$r = $t->get('/ok', { headers => {
    'X-Forwarded-For' => '2001:db8:abcd:1234:5678::1' } });
ok(wait_lines($n + 2), 'line for an IPv6 client');
is((records())[$n + 1]{client}, '2001:db8:abcd::', 'anonymize: IPv6 cut to /48');
SKIP: {
    skip 'no IPv6 loopback', 1 unless $have6;
    $r = $t->request('GET', 'http://[::1]:' . $t->port(2) . '/ok');
    ok(wait_lines($n + 3), 'line for a client on ::1');
}
($rc, $out) = verify($audit);
like($out, qr/^OK \d+ lines$/, 'reload: the chain verifies');

# --- reopen (USR1) after rename --------------------------------------------------

$n = scalar lines_of($audit);
rename $audit, "$audit.1" or die "rename: $!";
$t->reopen;
ok($t->wait_for(sub { -e $audit }, 5), 'reopen: the file is created again');
sleep 0.3;
$t->get('/ok') for 1 .. 6;
ok(wait_lines(6), 'reopen: lines go to the new file');
my @new = records();
is($new[0]{seq}, 1, 'reopen: the new file starts at seq 1');
is($new[0]{prev}, undef, 'reopen: and a new chain');
($rc, $out) = verify($audit);
like($out, qr/^OK \d+ lines$/, 'reopen: the new file verifies');
($rc, $out) = verify("$audit.1");
is($rc, 0, 'reopen: the renamed file still verifies') or diag($out);
cmp_ok(scalar(lines_of("$audit.1")), '>=', $n, 'renamed file kept its lines');

# chain=off: seq, prev null
$t->conf(conf('sbx_audit_log %%PREFIX%%/plain.log chain=off;'));
$t->reload;
$t->get('/ok') for 1 .. 2;
ok(wait_lines(2, "$p/plain.log"), 'chain=off: lines');
my @pl = records("$p/plain.log");
is_deeply([ map { [ $_->{seq}, $_->{prev} ] } @pl ], [ [ 1, undef ], [ 2, undef ] ],
          'chain=off: seq counts, prev null');

$t->stop;
$t->check_error_log;

done_testing;
