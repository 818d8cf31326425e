#!/usr/bin/perl
# Connector authoring kit: `sbx-lua-helper check` (FILE:LINE: messages,
# syntax errors, unknown globals, bytecode, size cap) and `sbx-lua-helper
# run` (sample requests, the response hook, limits, errors, usage errors,
# the seccomp sandbox and the CPU-time limit of the CLI).

use strict;
use warnings;

use lib 't/lib';
use SbxTest;
use Test::More;
use JSON::PP;
use POSIX qw(WNOHANG);
use Time::HiRes qw(sleep time);

my $t = SbxTest->new;
my $helper = SbxTest::helper_bin();
my $reqdir = SbxTest::root() . '/conf.d/requests';
my $orders = "$reqdir/get-orders.json";
my $webhook = "$reqdir/webhook.json";
my $upstream = "$reqdir/upstream-ok.json";

ok(-x $helper, "helper binary exists ($helper)") or BAIL_OUT('no helper');

my $n = 0;

# runs the helper; returns (exit code, stdout, stderr, seconds); a callback
# gets the pid while it runs
sub run3 {
    my ($args, %o) = @_;
    my $timeout = $o{timeout} // 20;
    $n++;
    my $out = $t->prefix . "/out.$n";
    my $err = $t->prefix . "/err.$n";
    my $t0 = time;
    my $pid = fork;
    die "fork: $!" unless defined $pid;
    if ($pid == 0) {
        open STDIN, '<', '/dev/null';
        open STDOUT, '>', $out;
        open STDERR, '>', $err;
        { exec { $helper } $helper, @$args }
        POSIX::_exit(127);
    }
    $o{while_running}->($pid) if $o{while_running};
    my $rc;
    while (1) {
        my $r = waitpid($pid, WNOHANG);
        if ($r == $pid) {
            $rc = $? & 127 ? 128 + ($? & 127) : $? >> 8;
            last;
        }
        if (time - $t0 > $timeout) {
            kill 'KILL', $pid;
            waitpid($pid, 0);
            $rc = 124;
            last;
        }
        sleep 0.02;
    }
    return ($rc, $t->read_file($out) // '', $t->read_file($err) // '',
            time - $t0);
}

my ($rc, $out, $err, $secs, $doc);

# ---- check -------------------------------------------------------------

my $good = $t->write_file('good.lua', <<'EOF');
local function sign(s) return s end
return {
  request = function(req)
    req.headers["x-checked"] = sign(req.uri)
    return req
  end,
  response = function(res, req)
    return res
  end,
}
EOF
($rc, $out, $err) = run3([ 'check', $good ]);
is($rc, 0, 'check: a good script exits 0') or diag($out, $err);
like($out, qr/^\Q$good\E: ok, hooks: request response$/m,
     'check: reports the hooks found');

my $syntax = $t->write_file('syntax.lua',
    "return function(req)\n  return {status = 200,,}\nend\n");
($rc, $out, $err) = run3([ 'check', $syntax ]);
ok($rc != 0, 'check: a syntax error exits non-zero');
is($rc, 1, 'check: a syntax error exits 1');
like($out, qr/^\Q$syntax\E:2: .*near ','$/m,
     'check: syntax error as FILE:LINE: message');

my $globals = $t->write_file('globals.lua', <<'EOF');
return function(req)
  local x = 1
  local f = io.open("/etc/passwd")
  os.execute("id")
  local s = strng.format("%d", 1)
  local n = tonumbr("1")
  return {status = 200}
end
EOF
($rc, $out, $err) = run3([ 'check', $globals ]);
is($rc, 1, 'check: unknown globals exit 1');
like($out, qr/^\Q$globals\E:3: global "io" is not available/m,
     'check: io.open reported at FILE:3:');
like($out, qr/^\Q$globals\E:4: "os\.execute" is not available/m,
     'check: os.execute reported at FILE:4:');
like($out, qr/^\Q$globals\E:5: global "strng" is not available/m,
     'check: a typo (strng) reported at FILE:5:');
like($out, qr/^\Q$globals\E:6: global "tonumbr" is not available/m,
     'check: a typo (tonumbr) reported at FILE:6:');
is(scalar(() = $out =~ /^\Q$globals\E:\d+: /mg), 4,
   'check: one line per problem');

my $assigned = $t->write_file('assigned.lua',
    "counter = 0\nreturn function(req)\n  counter = counter + 1\n"
    . "  return {status = 200, body = tostring(counter)}\nend\n");
($rc, $out, $err) = run3([ 'check', $assigned ]);
is($rc, 0, 'check: a global the script assigns is not a problem')
    or diag($out);

for my $name (qw(load loadfile dofile require collectgarbage debug package
                 io rawequal_nope))
{
    my $f = $t->write_file("g_$name.lua",
        "return function(req)\n  local v = $name\n  return {status = 200}\n"
        . "end\n");
    ($rc, $out) = run3([ 'check', $f ]);
    like($out, qr/^\Q$f\E:2: global "$name" is not available/m,
         "check: $name is not available (FILE:2:)");
}
my $dump = $t->write_file('dump.lua',
    "return function(req)\n  local d = string.dump\n  return req\nend\n");
($rc, $out) = run3([ 'check', $dump ]);
like($out, qr/^\Q$dump\E:2: "string\.dump" is not available/m,
     'check: string.dump is not available');

# more than 256 constants: globals are read through GETUPVAL + GETTABLE
my $manyk = $t->write_file('manyk.lua',
    'local t = {' . join(',', map { "\"c$_\"" } 1 .. 300) . "}\n"
    . "global_set = 1\n"
    . "return function(req)\n"
    . "  local f = io.open('/etc/passwd')\n"
    . "  os.execute('id')\n"
    . "  return {status = 200, body = tostring(global_set)}\n"
    . "end\n");
($rc, $out) = run3([ 'check', $manyk ]);
is($rc, 1, 'check: a script with 300 constants is still analysed');
like($out, qr/^\Q$manyk\E:4: global "io"/m, 'check: ... io found at FILE:4:');
like($out, qr/^\Q$manyk\E:5: "os\.execute"/m,
     'check: ... os.execute found at FILE:5:');
unlike($out, qr/global_set/, 'check: ... its own global is known');

# bytecode is refused with FILE:1:
my $bc = $t->write_file('bytecode.lua',
    "\x1bLua\x54\x00\x19\x93\r\n\x1a\n\x04\x08\x08" . ("\0" x 40));
($rc, $out) = run3([ 'check', $bc ]);
is($rc, 1, 'check: bytecode exits 1');
like($out, qr/^\Q$bc\E:1: .*binary/m, 'check: bytecode refused at FILE:1:');
($rc, $out, $err) = run3([ 'run', $bc, '--request', $orders ]);
is($rc, 1, 'run: bytecode exits 1');
like($err, qr/^\Q$bc\E:1: .*binary/m, 'run: bytecode refused at FILE:1:');

# the size cap
my $big = $t->write_file('big.lua',
    "return function(req) return req end\n" . ('-' x (1024 * 1024 + 10)));
($rc, $out) = run3([ 'check', $big ]);
is($rc, 1, 'check: a script over 1 MiB exits 1');
like($out, qr/^\Q$big\E:1: .*larger than 1048576 bytes/m,
     'check: size cap at FILE:1:');

# a big script (just under the cap) is checked quickly
my $lines = join("\n", map { "x$_ = y" . ($_ % 5000) } 1 .. 60000);
my $large = $t->write_file('large.lua',
    "$lines\n" . join("\n", map { "y$_ = 1" } 0 .. 4998)
    . "\nreturn function(req) return req end\n");
ok(-s $large < 1024 * 1024, 'large.lua is under the cap');
($rc, $out, $err, $secs) = run3([ 'check', $large ], timeout => 30);
is($rc, 1, 'check: a 60,000-line script is analysed');
like($out, qr/^\Q$large\E:4999: global "y4999"/m,
     'check: ... the one unassigned global found');
ok($secs < 5, sprintf('check: ... in %.1f s (no quadratic scan)', $secs));

# top-level errors and loops
my $toperr = $t->write_file('toperr.lua',
    "local x = 1\nerror('bad top level')\nreturn function() end\n");
($rc, $out) = run3([ 'check', $toperr ]);
is($rc, 1, 'check: a top-level error exits 1');
like($out, qr/^\Q$toperr\E:2: bad top level/m, 'check: ... FILE:LINE:');

my $toploop = $t->write_file('toploop.lua',
    "while true do end\nreturn function() end\n");
($rc, $out, $err, $secs) = run3([ 'check', $toploop ]);
is($rc, 1, 'check: a top-level loop exits 1');
like($out, qr/^\Q$toploop\E:1: top level: (?:instruction|time) limit/m,
     'check: ... says which limit');

my $nohooks = $t->write_file('nohooks.lua', "return 42\n");
($rc, $out) = run3([ 'check', $nohooks ]);
is($rc, 1, 'check: a script returning no hooks exits 1');
like($out, qr/^\Q$nohooks\E:1: the script must return/m, 'check: ... FILE:1:');

# stdin, --chunkname
{
    my $p = $t->write_file('stdin.sh',
        "exec \"\$1\" check - --chunkname conn.lua < \"\$2\"\n");
    my ($r, $o) = $t->run_cmd([ '/bin/sh', $p, $helper, $globals ],
                              timeout => 20);
    is($r, 1, 'check -: reads stdin');
    like($o, qr/^conn\.lua:3: global "io"/m, 'check --chunkname names FILE');
}

# ---- check: usage ------------------------------------------------------

for my $case (
    [ 'no script', [ 'check' ] ],
    [ 'unknown option', [ 'check', $good, '--bogus' ] ],
    [ 'two scripts', [ 'check', $good, $good ] ],
    [ 'unknown capability', [ 'check', $good, '--capabilities', 'fs' ] ],
    [ 'bad limits', [ 'check', $good, '--limits', 'memory=lots' ] ],
    [ 'missing script file', [ 'check', $t->prefix . '/nope.lua' ] ],
    [ 'no command', [] ],
    [ 'unknown command', [ 'lint', $good ] ],
) {
    my ($what, $args) = @$case;
    ($rc, $out, $err) = run3($args);
    is($rc, 2, "usage error ($what): exit 2");
    isnt($err, '', "usage error ($what): a message on stderr");
}

# ---- run ---------------------------------------------------------------

my $hdr = $t->write_file('hdr.lua', <<'EOF');
return function(req)
  req.headers["x-connector"] = req.connector
  req.headers["x-country"] = req.client.country
  req.headers["x-limit"] = req.query.limit
  req.uri = "/v2" .. req.uri
  return req
end
EOF
($rc, $out, $err) = run3([ 'run', $hdr, '--request', $orders ]);
is($rc, 0, 'run: get-orders.json exits 0') or diag($err);
$doc = eval { decode_json($out) };
ok($doc, 'run: stdout is one JSON object') or diag($out);
is(scalar(() = $out =~ /\n/g), 1, 'run: ... on one line');
is($doc->{uri}, '/v2/orders', 'run: the changed uri');
is($doc->{args}, 'status=open&limit=10', 'run: args from the request file');
is($doc->{headers}{'x-connector'}, 'hdr', 'run: req.connector (file name)');
is($doc->{headers}{'x-country'}, 'FR', 'run: req.client.country');
is($doc->{headers}{'x-limit'}, '10', 'run: req.query');
is($doc->{headers}{'x-api-key'}, 'demo-key-1', 'run: headers pass through');
like($err,
     qr/^request hook: instructions=\d+ memory_peak=[1-9]\d* time_us=\d+$/m,
     'run: instructions, memory peak and time on stderr');
unlike($out, qr/instructions=/, 'run: usage is not on stdout');

my $echo = $t->write_file('echo.lua', <<'EOF');
return function(req)
  return {status = 201, headers = {["content-type"] = "text/plain"},
          body = req.method .. " " .. req.id .. " " .. req.client.ip
                 .. " " .. #req.body .. " " .. req.headers["content-type"]}
end
EOF
($rc, $out, $err) = run3([ 'run', $echo, '--request', $webhook ]);
is($rc, 0, 'run: webhook.json exits 0') or diag($err);
$doc = eval { decode_json($out) } // {};
is($doc->{status}, 201, 'run: a response from the request hook');
is($doc->{body}, 'POST 0d6f1a2b3c4d5e6f 203.0.113.7 35 application/json',
   'run: method, id, client, body and headers from the request file');
is($doc->{headers}{'content-type'}, 'text/plain', 'run: response headers');

# the response hook
my $both = $t->write_file('both.lua', <<'EOF');
return {
  request = function(req)
    req.headers["x-sig"] = "abc"
    return req
  end,
  response = function(res, req)
    res.headers["x-seen"] = req.headers["x-sig"]
    res.headers["x-upstream"] = nil
    res.body = res.body:upper()
    res.status = 203
    return res
  end,
}
EOF
($rc, $out, $err) = run3([ 'run', $both, '--request', $orders,
                           '--response', $upstream ]);
is($rc, 0, 'run --response: exits 0') or diag($err);
$doc = eval { decode_json($out) } // {};
is($doc->{status}, 203, 'run --response: the response hook ran');
is($doc->{headers}{'x-seen'}, 'abc',
   'run --response: it saw the request as changed by the request hook');
ok(!exists $doc->{headers}{'x-upstream'}, 'run --response: header removed');
is($doc->{body}, '{"ORDERS":[{"ID":1001,"TOTAL":"12.50"}]}',
   'run --response: body from upstream-ok.json, changed');
like($err, qr/^request hook: instructions=.*\nresponse hook: instructions=/m,
     'run --response: usage of both hooks');

($rc, $out, $err) = run3([ 'run', $hdr, '--request', $orders,
                           '--response', $upstream ]);
is($rc, 0, 'run --response without a response hook: exits 0');
$doc = eval { decode_json($out) } // {};
is($doc->{status}, 200, 'run --response: the upstream response unchanged');
like($err, qr/response hook: none/, 'run: says there is no response hook');

# ---- run: limits and errors --------------------------------------------

sub run_limit {
    my ($name, $src, @more) = @_;
    my $f = $t->write_file("$name.lua", $src);
    return ($f, run3([ 'run', $f, '--request', $orders, @more ]));
}

my $f;
($f, $rc, $out, $err, $secs) = run_limit('loop',
    "return function(req)\n  while true do end\nend\n");
is($rc, 1, 'run: an infinite loop exits 1');
like($err, qr/^request hook: instruction limit exceeded$/m,
     'run: ... the message says instructions');
like($err, qr/500 transform_error/, 'run: ... and what the gateway answers');
is($out, '', 'run: ... nothing on stdout');
ok($secs < 3, sprintf('run: ... stopped by the hook in %.2f s', $secs));

($f, $rc, $out, $err, $secs) = run_limit('pcallloop',
    "return function(req)\n  while true do\n"
    . "    pcall(function() while true do end end)\n  end\nend\n");
is($rc, 1, 'run: a loop catching its own limit error exits 1');
like($err, qr/instruction limit exceeded/, 'run: ... the limit is sticky');

($f, $rc, $out, $err, $secs) = run_limit('coloop',
    "return function(req)\n  while true do\n"
    . "    coroutine.wrap(function() for i = 1, 10 do end end)()\n"
    . "  end\nend\n", '--limits', 'instructions=1000000000000,timeout=300ms');
is($rc, 1, 'run: many short coroutines: exit 1');
like($err, qr/request hook: (?:time|instruction) limit exceeded/,
     'run: ... stopped by the deadline');
ok($secs < 3, sprintf('run: ... in %.2f s', $secs));

($f, $rc, $out, $err, $secs) = run_limit('timeout',
    "return function(req)\n  while true do end\nend\n",
    '--limits', 'instructions=1000000000000,timeout=200ms');
is($rc, 1, 'run: a timeout exits 1');
like($err, qr/^request hook: time limit exceeded$/m,
     'run: ... the message says time');
like($err, qr/504 transform_timeout/, 'run: ... the gateway answers 504');
ok($secs < 3, sprintf('run: ... after %.2f s', $secs));

($f, $rc, $out, $err, $secs) = run_limit('backstop',
    "return function(req)\n"
    . "  return {status = 200, body = tostring(\n"
    . "    (\"a\"):rep(300):find((\"a-\"):rep(6) .. \"b\"))}\nend\n",
    '--limits', 'timeout=200ms');
is($rc, 1, 'run: a long C call (pattern backtracking) exits 1');
like($err, qr/request hook: time limit exceeded \(stopped by the wall-clock/,
     'run: ... stopped by the wall-clock backstop');
ok($secs < 5, sprintf('run: ... after %.2f s', $secs));

($f, $rc, $out, $err) = run_limit('memory',
    "return function(req)\n  local t = {}\n"
    . "  for i = 1, 1e8 do t[i] = ('x'):rep(100) .. i end\nend\n",
    '--limits', 'memory=4m');
is($rc, 1, 'run: a memory hog exits 1');
like($err, qr/^request hook: memory limit exceeded$/m,
     'run: ... the message says memory');

($f, $rc, $out, $err) = run_limit('pcallmem',
    "return function(req)\n"
    . "  pcall(function() local t = {} for i = 1, 1e8 do t[i] = i end end)\n"
    . "  return {status = 200, body = 'survived'}\nend\n",
    '--limits', 'memory=4m');
is($rc, 1, 'run: a caught memory error still fails the call');
like($err, qr/memory limit exceeded/, 'run: ... says memory');
unlike($out, qr/survived/, 'run: ... the result is not printed');

($f, $rc, $out, $err) = run_limit('boom',
    "return function(req)\n  local x = 1\n  error('boom')\nend\n");
is($rc, 1, 'run: a script error exits 1');
like($err, qr/^request hook: script error: \Q$f\E:3: boom$/m,
     'run: ... FILE:LINE: message');

($f, $rc, $out, $err) = run_limit('badret',
    "return function(req)\n  return {status = '200'}\nend\n");
is($rc, 1, 'run: an invalid return value exits 1');
like($err, qr/request hook: invalid return value: status must be/,
     'run: ... says what is wrong');

($f, $rc, $out, $err) = run_limit('errobj',
    "return function(req)\n"
    . "  error(setmetatable({}, {__tostring = function() while true do end"
    . " end}))\nend\n");
is($rc, 1, 'run: a table error object exits 1');
like($err, qr/error object is a table value/,
     'run: ... __tostring is never called');

($f, $rc, $out, $err) = run_limit('syntaxrun',
    "return function(req)\n  return {status = 200,,}\nend\n");
is($rc, 1, 'run: a syntax error exits 1');
like($err, qr/^\Q$f\E:2: /m, 'run: ... FILE:LINE:');

($f, $rc, $out, $err) = run_limit('toplevel',
    "local n = 0\nwhile true do n = n + 1 end\nreturn function() end\n");
is($rc, 1, 'run: a looping top level exits 1');
like($err, qr/top level: (?:instruction|time) limit exceeded/,
     'run: ... says which limit');

# ---- run: usage errors -------------------------------------------------

my $badjson = $t->write_file('bad.json', '{"method": ');
my $badfield = $t->write_file('badfield.json', '{"metod": "GET"}');
my $badres = $t->write_file('badres.json', '{"status": "200"}');
for my $case (
    [ 'no --request', [ 'run', $hdr ] ],
    [ 'no script', [ 'run', '--request', $orders ] ],
    [ '--request without a value', [ 'run', $hdr, '--request' ] ],
    [ 'unknown option', [ 'run', $hdr, '--request', $orders, '--fast' ] ],
    [ 'missing request file', [ 'run', $hdr, '--request',
                                $t->prefix . '/none.json' ] ],
    [ 'invalid request JSON', [ 'run', $hdr, '--request', $badjson ] ],
    [ 'unknown request field', [ 'run', $hdr, '--request', $badfield ] ],
    [ 'invalid response', [ 'run', $both, '--request', $orders,
                            '--response', $badres ] ],
    [ 'unknown capability', [ 'run', $hdr, '--request', $orders,
                              '--capabilities', 'net' ] ],
    [ 'bad limits', [ 'run', $hdr, '--request', $orders,
                      '--limits', 'cpu=1' ] ],
    # below what nginx.conf's limits directive accepts
    [ 'instructions below 1000', [ 'run', $hdr, '--request', $orders,
                                   '--limits', 'instructions=5' ] ],
    [ 'memory below 256k', [ 'run', $hdr, '--request', $orders,
                             '--limits', 'memory=1' ] ],
    [ 'timeout over 60s', [ 'run', $hdr, '--request', $orders,
                            '--limits', 'timeout=61s' ] ],
    [ 'missing script', [ 'run', $t->prefix . '/none.lua',
                          '--request', $orders ] ],
) {
    my ($what, $args) = @$case;
    ($rc, $out, $err) = run3($args);
    is($rc, 2, "run usage error ($what): exit 2");
    isnt($err, '', "run usage error ($what): a message on stderr");
    is($out, '', "run usage error ($what): nothing on stdout");
}

# ---- the sandbox -------------------------------------------------------

($rc, $out) = $t->run_cmd([ $helper, '--self-test' ], timeout => 60);
is($rc, 0, '--self-test passes') or diag($out);

my $escape = $t->write_file('escape.lua', <<'EOF');
return function(req)
  local names = {}
  local function probe(label, v) names[#names + 1] = label .. "=" .. type(v) end
  probe("io", _G["i" .. "o"])
  probe("execute", os["exe" .. "cute"])
  probe("getenv", os["get" .. "env"])
  probe("load", _G["lo" .. "ad"])
  probe("require", _G["req" .. "uire"])
  probe("package", _G["pack" .. "age"])
  probe("debug", _G["deb" .. "ug"])
  probe("dump", string["du" .. "mp"])
  probe("strdump", ("")["du" .. "mp"])
  probe("collect", _G["collect" .. "garbage"])
  return {status = 200, body = table.concat(names, " ")}
end
EOF
($rc, $out, $err) = run3([ 'run', $escape, '--request', $orders ]);
is($rc, 0, 'run: probing for escapes exits 0') or diag($err);
$doc = eval { decode_json($out) } // {};
is($doc->{body}, 'io=nil execute=nil getenv=nil load=nil require=nil '
   . 'package=nil debug=nil dump=nil strdump=nil collect=nil',
   'run: io, os.execute, os.getenv, load, require, package, debug, '
   . 'string.dump, collectgarbage are unreachable');

# the running helper is under seccomp, without new privileges, not root
my %status;
($rc, $out, $err) = run3([ 'run', $toploop, '--request', $orders,
                          '--limits', 'instructions=1000000000000,timeout=2s' ],
    while_running => sub {
        my ($pid) = @_;
        my $until = time + 3;
        while (time < $until) {
            if (open my $fh, '<', "/proc/$pid/status") {
                my %s = map { /^(\w+):\s*(.*)$/ ? ($1, $2) : () } <$fh>;
                close $fh;
                if (($s{Seccomp} // 0) == 2) {
                    %status = %s;
                    last;
                }
            }
            sleep 0.01;
        }
    });
is($status{Seccomp}, 2, 'run: the helper runs under a seccomp filter');
is($status{NoNewPrivs}, 1, 'run: ... with no_new_privs');
my ($uid) = split /\s+/, $status{Uid} // '0';
isnt($uid, 0, 'run: ... and not as root');
is($rc, 1, 'run: ... and its looping top level was stopped');

# RLIMIT_CPU: a C call that no hook stops, the wall-clock backstop far away
# (181 s for timeout=60s): the runner's 10 s of CPU time end it
$f = $t->write_file('cpu.lua',
    "return function(req)\n"
    . "  return {status = 200, body = tostring(\n"
    . "    (\"a\"):rep(300):find((\"a-\"):rep(8) .. \"b\"))}\nend\n");
($rc, $out, $err, $secs) = run3([ 'run', $f, '--request', $orders,
                                  '--limits', 'timeout=60s' ], timeout => 120);
is($rc, 1, 'run: a long C call under timeout=60s exits 1');
my $cpu_msg = 'request hook: time limit exceeded (stopped by the '
              . "runner's CPU-time limit)";
like($err, qr/\Q$cpu_msg\E/,
     sprintf('run: ... stopped by RLIMIT_CPU (10 s of CPU) after %.1f s',
             $secs)) or diag($err);

done_testing;
