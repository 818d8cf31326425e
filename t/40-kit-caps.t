#!/usr/bin/perl
# Connector authoring kit: the capability modules (base64, hex, sha256,
# hmac, log, json) through the real helper CLI, `sbx-lua-helper run` with
# --capabilities: known test vectors (RFC 4648, FIPS 180-2, RFC 4231), bad
# arguments, capabilities not given, the memory cap, bounded log lines.

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
my $req = SbxTest::root() . '/conf.d/requests/get-orders.json';

ok(-x $helper, "helper binary exists ($helper)") or BAIL_OUT('no helper');

my $n = 0;

# runs the helper; returns (exit code, stdout, stderr); killed after $timeout
sub run3 {
    my ($args, $timeout) = @_;
    $timeout //= 20;
    $n++;
    my $out = $t->prefix . "/out.$n";
    my $err = $t->prefix . "/err.$n";
    my $pid = fork;
    die "fork: $!" unless defined $pid;
    if ($pid == 0) {
        open STDIN, '<', '/dev/null';
        open STDOUT, '>', $out;
        open STDERR, '>', $err;
        { exec { $helper } $helper, @$args }
        POSIX::_exit(127);
    }
    my $deadline = time + $timeout;
    my $rc;
    while (1) {
        my $r = waitpid($pid, WNOHANG);
        if ($r == $pid) {
            $rc = $? & 127 ? 128 + ($? & 127) : $? >> 8;
            last;
        }
        if (time > $deadline) {
            kill 'KILL', $pid;
            waitpid($pid, 0);
            $rc = 124;
            last;
        }
        sleep 0.02;
    }
    return ($rc, $t->read_file($out) // '', $t->read_file($err) // '');
}

# writes a request-hook script whose body is `$expr` (a Lua expression
# giving a string) and runs it; returns (rc, decoded stdout or undef, stderr)
sub run_body {
    my ($name, $expr, $caps, @more) = @_;
    my $path = $t->write_file("$name.lua",
        "return function(req)\n"
        . "  local body = $expr\n"
        . "  return {status = 200, body = body}\n"
        . "end\n");
    my ($rc, $out, $err) = run3([ 'run', $path, '--request', $req,
                                  (defined $caps ? ('--capabilities', $caps)
                                                 : ()), @more ]);
    my $doc = eval { decode_json($out) };
    return ($rc, $doc, $err, $out);
}

# a body that is a list of "key=value" lines -> hash
sub lines_of {
    my ($doc) = @_;
    return {} unless $doc && defined $doc->{body};
    my %h;
    for my $l (split /\n/, $doc->{body}) {
        my ($k, $v) = split /=/, $l, 2;
        $h{$k} = $v;
    }
    return \%h;
}

my ($rc, $doc, $err, $out, $h);

# ---- base64 ------------------------------------------------------------

($rc, $doc, $err) = run_body('b64', <<'EOF', 'base64');
(function()
    local t = {}
    for _, s in ipairs({"", "f", "fo", "foo", "foob", "fooba", "foobar"}) do
      local e = base64.encode(s)
      t[#t + 1] = "enc_" .. s .. "=" .. e
      t[#t + 1] = "dec_" .. s .. "=" .. tostring(base64.decode(e) == s)
      t[#t + 1] = "url_" .. s .. "=" .. base64.encode_url(s)
      t[#t + 1] = "durl_" .. s .. "="
                  .. tostring(base64.decode_url(base64.encode_url(s)) == s)
    end
    t[#t + 1] = "std_special=" .. base64.encode("\251\255\191")
    t[#t + 1] = "url_special=" .. base64.encode_url("\251\255\191")
    t[#t + 1] = "durl_special="
                .. tostring(base64.decode_url("-_-_") == "\251\255\191")
    t[#t + 1] = "durl_padded=" .. tostring(base64.decode_url("Zg==") == "f")
    local all = {}
    for i = 0, 255 do all[#all + 1] = string.char(i) end
    all = table.concat(all)
    t[#t + 1] = "roundtrip=" .. tostring(base64.decode(base64.encode(all))
                                         == all)
    return table.concat(t, "\n")
  end)()
EOF
is($rc, 0, 'base64: run exits 0') or diag($err);
$h = lines_of($doc);
my %rfc4648 = ('' => '', f => 'Zg==', fo => 'Zm8=', foo => 'Zm9v',
               foob => 'Zm9vYg==', fooba => 'Zm9vYmE=', foobar => 'Zm9vYmFy');
for my $s (sort { length $a <=> length $b } keys %rfc4648) {
    is($h->{"enc_$s"}, $rfc4648{$s}, "base64.encode(\"$s\") (RFC 4648)");
    is($h->{"dec_$s"}, 'true', "base64.decode(\"$rfc4648{$s}\") gives \"$s\"");
    (my $url = $rfc4648{$s}) =~ s/=+$//;
    is($h->{"url_$s"}, $url, "base64.encode_url(\"$s\"): no padding");
    is($h->{"durl_$s"}, 'true', "base64.decode_url round trip of \"$s\"");
}
is($h->{std_special}, '+/+/', 'base64.encode uses + and /');
is($h->{url_special}, '-_-_', 'base64.encode_url uses - and _ (RFC 4648 5)');
is($h->{durl_special}, 'true', 'base64.decode_url reads - and _');
is($h->{durl_padded}, 'true', 'base64.decode_url accepts padding');
is($h->{roundtrip}, 'true', 'base64: all 256 byte values round-trip');

# invalid input raises an error naming the function
($rc, $doc, $err) = run_body('b64bad', <<'EOF', 'base64');
(function()
    local t = {}
    local cases = {
      {"bang", base64.decode, "Zm9v!"}, {"nopad", base64.decode, "Zg"},
      {"shortpad", base64.decode, "Zg="}, {"noncanon", base64.decode, "Zh=="},
      {"onechar", base64.decode, "Z"}, {"midpad", base64.decode, "Zg==Zg=="},
      {"urlchars", base64.decode, "-_-_"}, {"stdchars", base64.decode_url, "+/+/"},
    }
    for _, c in ipairs(cases) do
      local ok, e = pcall(c[2], c[3])
      t[#t + 1] = c[1] .. "=" .. tostring(ok) .. " " .. tostring(e)
    end
    return table.concat(t, "\n")
  end)()
EOF
is($rc, 0, 'base64 invalid input: run exits 0 (errors caught by pcall)')
    or diag($err);
$h = lines_of($doc);
for my $k (qw(bang nopad shortpad noncanon onechar midpad urlchars)) {
    like($h->{$k} // '', qr/^false .*base64\.decode: invalid/,
         "base64.decode refuses invalid input ($k) with an error naming it");
}
like($h->{stdchars} // '', qr/^false .*base64\.decode_url: invalid/,
     'base64.decode_url refuses + and /');

# an uncaught decode error is a script error: exit 1, message names it
($rc, $doc, $err) = run_body('b64raise', 'base64.decode("@@@@")', 'base64');
is($rc, 1, 'uncaught base64.decode error: exit 1');
like($err, qr/script error: .*b64raise\.lua:2: base64\.decode: invalid/,
     'uncaught base64.decode error: FILE:LINE: base64.decode: ...');
like($err, qr/500 transform_error/, 'says what the gateway answers');

# ---- hex ---------------------------------------------------------------

($rc, $doc, $err) = run_body('hex', <<'EOF', 'hex');
"enc=" .. hex.encode("\0\1\127\128\255")
    .. "\nempty=[" .. hex.encode("") .. "]"
    .. "\ndec=" .. tostring(hex.decode("00017f80ff") == "\0\1\127\128\255")
    .. "\nupper=" .. tostring(hex.decode("ABCDEF") == "\171\205\239")
    .. "\nodd=" .. select(2, pcall(hex.decode, "abc"))
    .. "\nbad=" .. select(2, pcall(hex.decode, "zz"))
EOF
is($rc, 0, 'hex: run exits 0') or diag($err);
$h = lines_of($doc);
is($h->{enc}, '00017f80ff', 'hex.encode: lower-case digits');
is($h->{empty}, '[]', 'hex.encode("") is ""');
is($h->{dec}, 'true', 'hex.decode');
is($h->{upper}, 'true', 'hex.decode accepts upper case');
like($h->{odd} // '', qr/hex\.decode: invalid/, 'hex.decode: odd length raises');
like($h->{bad} // '', qr/hex\.decode: invalid/,
     'hex.decode: non-hex digits raise');

# ---- sha256 ------------------------------------------------------------

($rc, $doc, $err) = run_body('sha', <<'EOF', 'sha256,hex');
"empty=" .. sha256.hex("")
    .. "\nabc=" .. sha256.hex("abc")
    .. "\nlong=" .. sha256.hex(
        "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq")
    .. "\nrawlen=" .. #sha256.digest("abc")
    .. "\nraw=" .. tostring(hex.encode(sha256.digest("abc"))
                            == sha256.hex("abc"))
EOF
is($rc, 0, 'sha256: run exits 0') or diag($err);
$h = lines_of($doc);
is($h->{empty},
   'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855',
   'sha256.hex("")');
is($h->{abc},
   'ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad',
   'sha256.hex("abc")');
is($h->{long},
   '248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1',
   'sha256.hex of the 448-bit FIPS 180-2 message');
is($h->{rawlen}, 32, 'sha256.digest: 32 raw bytes');
is($h->{raw}, 'true', 'sha256.digest is the raw form of sha256.hex');

# ---- hmac (RFC 4231) ---------------------------------------------------

($rc, $doc, $err) = run_body('hmac', <<'EOF', 'hmac,hex');
"tc1=" .. hmac.sha256_hex(("\11"):rep(20), "Hi There")
    .. "\ntc2=" .. hmac.sha256_hex("Jefe", "what do ya want for nothing?")
    .. "\ntc6=" .. hmac.sha256_hex(("\170"):rep(131),
        "Test Using Larger Than Block-Size Key - Hash Key First")
    .. "\nrawlen=" .. #hmac.sha256("Jefe", "what do ya want for nothing?")
    .. "\nraw=" .. hex.encode(hmac.sha256("Jefe",
                                          "what do ya want for nothing?"))
    .. "\nemptykey=" .. hmac.sha256_hex("", "")
EOF
is($rc, 0, 'hmac: run exits 0') or diag($err);
$h = lines_of($doc);
is($h->{tc1},
   'b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7',
   'HMAC-SHA256 RFC 4231 test case 1');
is($h->{tc2},
   '5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843',
   'HMAC-SHA256 RFC 4231 test case 2');
is($h->{tc6},
   '60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54',
   'HMAC-SHA256 RFC 4231 test case 6 (131-byte key)');
is($h->{rawlen}, 32, 'hmac.sha256: 32 raw bytes');
is($h->{raw}, $h->{tc2}, 'hmac.sha256 raw == hmac.sha256_hex decoded');
is($h->{emptykey},
   'b613679a0814d9ec772f95d778c35fc5ff1697c493715653c6c712144292c5ad',
   'hmac.sha256_hex("", "")');

# ---- wrong argument types ----------------------------------------------

($rc, $doc, $err) = run_body('types', <<'EOF', 'base64,hex,sha256,hmac,json');
(function()
    local t = {}
    local cases = {
      {"base64.encode", base64.encode, nil},
      {"base64.decode", base64.decode, 42},
      {"base64.encode_url", base64.encode_url, {}},
      {"base64.decode_url", base64.decode_url, true},
      {"hex.encode", hex.encode, {}},
      {"hex.decode", hex.decode, 12},
      {"sha256.digest", sha256.digest, nil},
      {"sha256.hex", sha256.hex, 1.5},
      {"hmac.sha256", hmac.sha256, 1, "m"},
      {"hmac.sha256_hex", hmac.sha256_hex, "k"},
    }
    for _, c in ipairs(cases) do
      local ok, e = pcall(c[2], c[3], c[4])
      t[#t + 1] = c[1] .. "=" .. tostring(ok) .. " " .. tostring(e)
    end
    return table.concat(t, "\n")
  end)()
EOF
is($rc, 0, 'wrong types: run exits 0 (errors caught)') or diag($err);
$h = lines_of($doc);
for my $f (qw(base64.encode base64.decode base64.encode_url base64.decode_url
              hex.encode hex.decode sha256.digest sha256.hex hmac.sha256
              hmac.sha256_hex))
{
    like($h->{$f} // '', qr/^false .*\Q$f\E: argument #\d must be a string/,
         "$f: a wrong argument type raises an error naming $f");
}
like($h->{'hmac.sha256_hex'} // '', qr/argument #2 .*got (?:nil|no value)/,
     'hmac.sha256_hex: a missing message is reported as argument #2');

# ---- capabilities not listed are not reachable --------------------------

my $nocap = $t->write_file('nocap.lua',
    "return function(req)\n"
    . "  return {status = 200,\n"
    . "          body = hex.encode('x')}\n"
    . "end\n");
($rc, $out, $err) = run3([ 'check', $nocap ]);
is($rc, 1, 'check: hex without the hex capability fails');
like($out, qr/^\Q$nocap\E:3: .*"hex" capability/m,
     'check: FILE:LINE: names the missing capability');
($rc, $out, $err) = run3([ 'check', $nocap, '--capabilities', 'base64' ]);
is($rc, 1, 'check: another capability does not bring hex');
($rc, $out, $err) = run3([ 'check', $nocap, '--capabilities', 'hex' ]);
is($rc, 0, 'check: --capabilities hex accepts it') or diag($out, $err);
($rc, $out, $err) = run3([ 'run', $nocap, '--request', $req ]);
is($rc, 1, 'run: a script using a capability it lacks exits 1');
like($err, qr/^\Q$nocap\E:3: .*"hex" capability/m,
     'run: the same FILE:LINE: message');
is($out, '', 'run: nothing on stdout');

# reached by a computed name, the module is simply not there
($rc, $doc, $err) = run_body('dyncap',
    'type(_G["he" .. "x"]) .. " " .. type(_ENV["js" .. "on"]) .. " "'
    . ' .. type(_G["cj" .. "son"]) .. " " .. type(_G["base" .. "64"])',
    'base64');
is($rc, 0, 'computed capability names: run exits 0') or diag($err);
is($doc && $doc->{body}, 'nil nil nil table',
   'only the listed capability exists at run time (no hex, json, cjson)');

# ---- the memory cap ----------------------------------------------------

my @huge = (
    [ 'hex.encode', 'hex', 'hex.encode(("x"):rep(3 * 1024 * 1024))' ],
    [ 'base64.encode', 'base64',
      'base64.encode(("x"):rep(5 * 1024 * 1024))' ],
    [ 'json.encode', 'json', 'json.encode(("\1"):rep(2 * 1024 * 1024))' ],
    [ 'hex.decode', 'hex', 'hex.decode(("ab"):rep(3 * 1024 * 1024))' ],
    [ 'pcall(hex.encode)', 'hex',
      'tostring(pcall(hex.encode, ("x"):rep(3 * 1024 * 1024)))' ],
);
for my $c (@huge) {
    my ($what, $cap, $expr) = @$c;
    my $t0 = time;
    ($rc, $doc, $err) = run_body('huge', $expr, $cap,
                                 '--limits', 'memory=8m');
    is($rc, 1, "$what of a huge input under memory=8m: exit 1");
    like($err, qr/request hook: memory limit exceeded/,
         "$what of a huge input: the message says memory");
    unlike($err, qr/internal error|Bad system call/i,
           "$what of a huge input: a clean stop");
    ok(time - $t0 < 10, "$what of a huge input: stops quickly");
}

# the same inputs fit in a bigger cap (the cap is what stopped them)
($rc, $doc, $err) = run_body('fits',
    '#hex.encode(("x"):rep(3 * 1024 * 1024)) .. ""', 'hex',
    '--limits', 'memory=64m');
is($rc, 0, 'hex.encode of 3 MiB fits under memory=64m') or diag($err);
is($doc && $doc->{body}, 6 * 1024 * 1024, 'and gives 6 MiB of hex');
like($err, qr/memory_peak=(\d+)/, 'run reports the memory peak');
my ($peak) = $err =~ /memory_peak=(\d+)/;
ok(($peak // 0) > 6 * 1024 * 1024, 'the memory peak counts the result');

# sha256 and hmac of big inputs need no big buffers
($rc, $doc, $err) = run_body('bigsha',
    'sha256.hex(("a"):rep(1000000)) .. " " .. '
    . '#hmac.sha256(("k"):rep(100000), ("m"):rep(1000000))',
    'sha256,hmac', '--limits', 'memory=8m');
is($rc, 0, 'sha256/hmac of 1 MB inputs under memory=8m') or diag($err);
is($doc && $doc->{body},
   'cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0 32',
   'sha256 of a million "a" (FIPS 180-2 vector)');

# ---- log ---------------------------------------------------------------

my $logs = $t->write_file('log.lua', <<'EOF');
return function(req)
  log.info("hello", 42, true, nil)
  log.warn("line one\r\nforged: [error] line two")
  log.err("nul\0byte")
  print("from print")
  for i = 1, 30 do log.info("spam " .. i) end
  return {status = 200, body = "logged"}
end
EOF
($rc, $out, $err) = run3([ 'run', $logs, '--request', $req,
                           '--capabilities', 'log' ]);
is($rc, 0, 'log: run exits 0') or diag($err);
$doc = eval { decode_json($out) };
is($doc && $doc->{body}, 'logged', 'log: the hook result is on stdout');
unlike($out, qr/hello|spam/, 'log: no log line on stdout');
like($err, qr/^\[info\] hello\t42\ttrue\tnil$/m,
     'log.info: arguments joined by tabs, [info]');
like($err, qr/^\[warn\] line one\\r\\nforged: \[error\] line two$/m,
     'log.warn: CR and LF escaped, one line');
unlike($err, qr/^forged/m, 'log: no forged line');
like($err, qr/^\[error\] nul\\x00byte$/m, 'log.err: control bytes escaped');
like($err, qr/^\[info\] from print$/m, 'print goes to the same log');
my @log_lines = grep { /^\[(?:info|warn|error)\] / } split /\n/, $err;
my @spam = grep { /spam/ } @log_lines;
is(scalar @log_lines, 21, 'log: 20 lines per request, then one notice');
is(scalar @spam, 16, 'log: the lines past the limit are dropped');
like($err, qr/^\[warn\] further log lines of this request were dropped$/m,
     'log: the drop is reported');

my $logbig = $t->write_file('logbig.lua', <<'EOF');
return function(req)
  log.info(("a"):rep(3000))
  log.info(("b"):rep(3000))
  log.info("c")
  log.info(("d"):rep(100000))
  return {status = 200}
end
EOF
($rc, $out, $err) = run3([ 'run', $logbig, '--request', $req,
                           '--capabilities', 'log' ]);
is($rc, 0, 'log bytes: run exits 0') or diag($err);
my $bytes = 0;
for (grep { /^\[info\] / } split /\n/, $err) {
    $bytes += length($_) - length('[info] ');
}
ok($bytes <= 4096, "log: at most 4096 bytes per request ($bytes)");
like($err, qr/^\[info\] a{3000}$/m, 'log: the first line whole');
like($err, qr/^\[info\] b{1096}$/m, 'log: the line crossing the cap is cut');
unlike($err, qr/^\[info\] [cd]/m, 'log: nothing after the cap');
like($err, qr/further log lines of this request were dropped/,
     'log: the cut is reported');

my $nolog = $t->write_file('nolog2.lua',
    "return function(req) log.info('x') return {status = 200} end\n");
($rc, $out) = run3([ 'check', $nolog ]);
is($rc, 1, 'log without the capability: check fails');
like($out, qr/^\Q$nolog\E:1: .*"log" capability/m,
     'log without the capability: FILE:LINE:');

# ---- json --------------------------------------------------------------

($rc, $doc, $err) = run_body('json', <<'EOF', 'json');
(function()
    local t = {}
    t[#t + 1] = "enc=" .. json.encode({a = 1})
    t[#t + 1] = "arr=" .. json.encode({1, 2, "x"})
    t[#t + 1] = "null=" .. json.encode({x = json.null})
    t[#t + 1] = "str=" .. json.encode("a\"b\n")
    local d = json.decode('{"a":[1,2,null],"b":{"c":"d"},"e":true}')
    t[#t + 1] = "dec=" .. tostring(d.a[1] == 1 and d.a[2] == 2)
                .. tostring(d.a[3] == json.null) .. d.b.c .. tostring(d.e)
    t[#t + 1] = "nulltype=" .. type(json.null)
    local ok, e = pcall(json.decode, "{bad")
    t[#t + 1] = "bad=" .. tostring(ok)
    ok, e = pcall(json.decode, ("["):rep(1000) .. ("]"):rep(1000))
    t[#t + 1] = "deep=" .. tostring(ok) .. " " .. tostring(e)
    ok, e = pcall(json.encode, {f = function() end})
    t[#t + 1] = "func=" .. tostring(ok)
    ok, e = pcall(json.encode, 0/0)
    t[#t + 1] = "nan=" .. tostring(ok)
    ok, e = pcall(json.decode, "{bad")
    t[#t + 1] = "baderr=" .. tostring(e)
    ok, e = pcall(json.encode, {f = print})
    t[#t + 1] = "funcerr=" .. tostring(e)
    ok, e = pcall(json.decode, 5)
    t[#t + 1] = "number=" .. tostring(ok) .. " " .. tostring(e)
    ok, e = pcall(json.encode)
    t[#t + 1] = "noarg=" .. tostring(ok) .. " " .. tostring(e)
    local keys = {}
    for k in pairs(json) do keys[#keys + 1] = k end
    table.sort(keys)
    t[#t + 1] = "keys=" .. table.concat(keys, ",")
    return table.concat(t, "\n")
  end)()
EOF
is($rc, 0, 'json: run exits 0') or diag($err);
$h = lines_of($doc);
is($h->{enc}, '{"a":1}', 'json.encode of an object');
is($h->{arr}, '[1,2,"x"]', 'json.encode of an array');
is($h->{null}, '{"x":null}', 'json.null encodes as null');
is($h->{str}, '"a\"b\n"', 'json.encode escapes strings');
is($h->{dec}, 'truetruedtrue', 'json.decode: arrays, null, objects');
is($h->{nulltype}, 'userdata', 'json.null is a light userdata');
is($h->{bad}, 'false', 'json.decode of invalid text raises');
like($h->{deep} // '', qr/^false .*(?:depth|nest)/i,
     'json.decode: nesting is capped');
is($h->{func}, 'false', 'json.encode of a function raises');
is($h->{nan}, 'false', 'json.encode of NaN raises');
like($h->{baderr} // '', qr/^json\.decode: /,
     'a json.decode error names the function');
like($h->{funcerr} // '', qr/^json\.encode: .*function/,
     'a json.encode error names the function');
is($h->{number}, 'false json.decode: expected a string',
   'json.decode of a number raises (no silent conversion)');
is($h->{noarg}, 'false json.encode: expected 1 argument',
   'json.encode without an argument raises');
is($h->{keys}, 'decode,encode,null', 'json has only encode, decode, null');

done_testing;
