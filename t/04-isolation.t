#!/usr/bin/perl
# Isolation: nothing a request does survives into the next one, and nothing
# outside the sandbox's environment is reachable at run time.

use strict;
use warnings;

use lib 't/lib';
use SbxTest;
use Test::More;

my $t = SbxTest->new;

my %scripts;

# globals, stashed coroutines and _G metatables
$scripts{globals} = <<'EOF';
return function(req)
  local prev = tostring(leaked_secret) .. "," .. type(stashed_co) .. ","
            .. type(getmetatable(_ENV))
  leaked_secret = req.headers["x-secret"]
  stashed_co = coroutine.create(function() coroutine.yield(leaked_secret) end)
  -- the environment's metatable is protected: this must fail, and even if
  -- it succeeded it must not outlive the request
  pcall(setmetatable, _ENV, { __index = function(_, k) return "from-mt" end })
  return { status = 200, body = prev }
end
EOF

# chunk upvalues
$scripts{upvalue} = <<'EOF';
local n = 0
local seen = {}
return function(req)
  n = n + 1
  seen[#seen + 1] = req.headers["x-secret"]
  return { status = 200, body = n .. ":" .. #seen }
end
EOF

# library tables monkey-patched by one request
$scripts{patch} = <<'EOF';
return function(req)
  local out = string.upper("abc") .. "," .. ("abc"):upper() .. ","
           .. table.concat({ "a", "b" }, "-") .. "," .. tostring(math.floor(1.5))
           .. "," .. type(math.pi)
  if req.query.patch then
    string.upper = function() return "PWNED" end
    table.concat = function() return "PWNED" end
    math.floor = function() return "PWNED" end
    math.pi = "PWNED"
    tostring = function() return "PWNED" end
  end
  return { status = 200, body = out }
end
EOF

# the shared string metatable
$scripts{strmeta} = <<'EOF';
return function(req)
  local mt = getmetatable("")
  local ok1 = pcall(function() getmetatable("").__index = { upper = function() return "PWNED" end } end)
  local ok2 = pcall(setmetatable, "", {})
  local ok3 = pcall(function() local m = getmetatable("") m.__index.upper = nil end)
  return { status = 200,
           body = type(mt) .. "," .. tostring(ok1) .. "," .. tostring(ok2) .. ","
               .. tostring(ok3) .. "," .. ("abc"):upper() }
end
EOF

# PRNG state
$scripts{random} = <<'EOF';
return function(req)
  if req.query.seed then
    math.randomseed(42)
    local a = math.random(1, 1 << 40)
    local b = math.random(1, 1 << 40)
    local c = math.random(1, 1 << 40)
    math.randomseed(42)
    math.random(1, 1 << 40)
    return { status = 200, body = a .. "," .. b .. "," .. c }
  end
  return { status = 200, body = tostring(math.random(1, 1 << 40)) }
end
EOF

# finalizers
$scripts{gc} = <<'EOF';
return function(req)
  local ok1 = pcall(setmetatable, {}, { __gc = function() end })
  local ok2 = pcall(setmetatable, {}, { __gc = function() while true do end end })
  local ok3 = pcall(setmetatable, {}, { __gc = true })
  -- arming through a metatable assigned __gc later is inert in Lua 5.4
  local mt = {}
  local obj = setmetatable({}, mt)
  mt.__gc = function() while true do end end
  return { status = 200,
           body = tostring(ok1) .. "," .. tostring(ok2) .. "," .. tostring(ok3) }
end
EOF

# what is reachable through computed names
$scripts{reach} = <<'EOF';
return function(req)
  local out = {}
  local function probe(label, v) out[#out + 1] = label .. "=" .. type(v) end
  local g = _ENV
  for _, name in ipairs({ "i" .. "o", "pack" .. "age", "deb" .. "ug",
                          "lo" .. "ad", "load" .. "file", "do" .. "file",
                          "req" .. "uire", "collect" .. "garbage", "wa" .. "rn",
                          "load" .. "string", "mod" .. "ule", "set" .. "fenv",
                          "get" .. "fenv", "new" .. "proxy", "cj" .. "son",
                          "js" .. "on", "jit", "ffi", "utf8", "string" }) do
    probe(name, g[name])
    probe("raw." .. name, rawget(g, name))
  end
  probe("str.dump", ("").dump)
  probe("string.dump", string["du" .. "mp"])
  probe("os.getenv", os["get" .. "env"])
  probe("os.execute", os["exec" .. "ute"])
  probe("os.exit", os["ex" .. "it"])
  probe("os.remove", os["re" .. "move"])
  probe("coroutine.close", coroutine["clo" .. "se"])
  probe("strmeta", getmetatable(""))
  local keys = {}
  for k in next, g do keys[#keys + 1] = tostring(k) end
  table.sort(keys)
  out[#out + 1] = "keys.globals=" .. table.concat(keys, " ")
  local libs = { "string", "table", "math", "os", "coroutine", "utf8" }
  for _, lib in ipairs(libs) do
    local t = rawget(g, lib)
    local ks = {}
    if type(t) == "table" then
      for k in next, t do ks[#ks + 1] = tostring(k) end
    end
    table.sort(ks)
    out[#out + 1] = "keys." .. lib .. "=" .. table.concat(ks, " ")
  end
  return { status = 200, body = table.concat(out, "\n") }
end
EOF

my $conf = '';
my $locs = '';
for my $name (sort keys %scripts) {
    $t->write_file("$name.lua", $scripts{$name});
    $conf .= "sbx_connector $name { script %%PREFIX%%/$name.lua; "
           . "pool one; limits timeout=2s; }\n";
    $locs .= "    location = /$name { sbx_connector $name; }\n";
}
$t->conf(<<"EOF");
sbx_pool one size=1 queue=16;
$conf
server {
    listen 127.0.0.1:%%PORT%%;
$locs}
EOF

$t->start;

my $r;
my %secret = (headers => { 'X-Secret' => 'Bearer user-A-token' });

# --- globals ------------------------------------------------------------------

$r = $t->get('/globals', \%secret);
like($r->{content}, qr/^nil,nil,(?:nil|boolean)$/,
     'first request sees a clean environment');
my $fresh = $r->{content};
for my $i (1 .. 3) {
    $r = $t->get('/globals');
    is($r->{content}, $fresh,
       "request $i after: no global, coroutine or _ENV metatable survived");
    unlike($r->{content}, qr/user-A-token|from-mt/, 'no leaked secret');
}

# --- upvalues -------------------------------------------------------------------

for my $i (1 .. 3) {
    $r = $t->get('/upvalue', \%secret);
    is($r->{content}, '1:1', "upvalue counter reset (request $i)");
}

# --- library patches ------------------------------------------------------------

$r = $t->get('/patch?patch=1');
is($r->{content}, 'ABC,ABC,a-b,1,number', 'patching request sees originals');
for my $i (1 .. 2) {
    $r = $t->get('/patch');
    is($r->{content}, 'ABC,ABC,a-b,1,number',
       "library patches did not survive (request $i)");
}

# --- string metatable -----------------------------------------------------------

$r = $t->get('/strmeta');
my ($mt_type, $ok1, $ok2, $ok3, $upper) = split /,/, $r->{content} // '';
isnt($mt_type // 'table', 'table', 'getmetatable("") does not give the metatable');
is($ok1, 'false', 'string metatable __index cannot be replaced');
is($ok2, 'false', 'setmetatable on a string fails');
is($ok3, 'false', 'string metatable __index cannot be reached');
is($upper, 'ABC', 'string methods intact in the same request');
$r = $t->get('/patch');
is($r->{content}, 'ABC,ABC,a-b,1,number', 'string methods intact afterwards');

# --- PRNG -------------------------------------------------------------------------

$r = $t->get('/random?seed=1');
my ($a, $b, $c) = split /,/, $r->{content} // '';
ok(defined $c, 'seeded request answered') or diag($r->{content});
my @next;
for (1 .. 4) {
    push @next, $t->get('/random')->{content} // '';
}
ok(!grep({ $_ eq ($a // '') || $_ eq ($b // '') || $_ eq ($c // '') } @next),
   'randomseed in one request does not make the next ones predictable')
    or diag("seeded: $a $b $c; next: @next");
my %uniq = map { $_ => 1 } @next;
is(scalar keys %uniq, 4, 'unseeded requests do not repeat one sequence')
    or diag("next: @next");

# --- finalizers ---------------------------------------------------------------------

$r = $t->get('/gc');
is($r->{content}, 'false,false,false', 'setmetatable refuses __gc');
for my $i (1 .. 2) {
    my $r2 = $t->get('/upvalue');
    is($r2->{status}, 200, "no finalizer runs in a later request ($i)");
}

# --- reachability -------------------------------------------------------------------

$r = $t->get('/reach');
is($r->{status}, 200, 'reach: 200');
my %probe;
my %keys;
for my $line (split /\n/, $r->{content} // '') {
    my ($k, $v) = split /=/, $line, 2;
    if ($k =~ /^keys\.(\w+)$/) {
        $keys{$1} = { map { $_ => 1 } split / /, $v // '' };
    } else {
        $probe{$k} = $v;
    }
}
for my $name (qw(io package debug load loadfile dofile require collectgarbage
                 warn loadstring module setfenv getfenv newproxy cjson json
                 jit ffi)) {
    is($probe{$name}, 'nil', "_ENV[\"$name\"] is nil");
    is($probe{"raw.$name"}, 'nil', "rawget(_ENV, \"$name\") is nil");
}
is($probe{utf8}, 'table', 'utf8 is there');
is($probe{string}, 'table', 'string is there');
is($probe{'str.dump'}, 'nil', '("").dump is nil');
is($probe{'string.dump'}, 'nil', 'string.dump is nil');
is($probe{'os.getenv'}, 'nil', 'os.getenv is nil');
is($probe{'os.execute'}, 'nil', 'os.execute is nil');
is($probe{'os.exit'}, 'nil', 'os.exit is nil');
is($probe{'os.remove'}, 'nil', 'os.remove is nil');
is($probe{'coroutine.close'}, 'nil', 'coroutine.close is nil');
isnt($probe{strmeta} // 'table', 'table', 'string metatable hidden');

my @bad_globals = grep { $keys{globals}{$_} }
    qw(io package debug load loadfile dofile require collectgarbage warn
       loadstring module setfenv getfenv newproxy cjson);
is("@bad_globals", '', 'no forbidden name among the globals');
is_deeply([ sort keys %{ $keys{os} // {} } ],
          [ sort grep { $keys{os}{$_} } qw(clock date difftime time) ],
          'os has only clock, date, difftime, time');
ok($keys{os}{time} && $keys{os}{date}, 'os.time and os.date present');
ok(!$keys{string}{dump}, 'string table has no dump');
ok(!$keys{coroutine}{close}, 'coroutine table has no close');

$t->stop;
$t->check_error_log;

done_testing;
