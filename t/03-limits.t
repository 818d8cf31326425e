#!/usr/bin/perl
# Per-request limits: instructions (sticky), memory (sticky), wall-clock
# timeout (the worker kills the helper; the pool recovers), capped C calls.

use strict;
use warnings;

use lib 't/lib';
use SbxTest;
use Test::More;
use Time::HiRes qw(time);

my $t = SbxTest->new;

my %scripts = (
    loop        => 'while true do end',
    pcall_loop  => 'while true do pcall(function() while true do end end) end',
    xpcall_loop => 'while true do xpcall(function() while true do end end, '
                 . 'function() while true do end end) end',
    error_loop  => 'while true do pcall(error, "x") end',
    coro_loop   => 'while true do coroutine.wrap(function() '
                 . 'for i = 1, 50 do end end)() end',
    memory      => 'local t = {} for i = 1, 1e8 do '
                 . 't[i] = ("x"):rep(1000) .. i end',
    pcall_memory => 'pcall(function() local t = {} for i = 1, 1e8 do '
                 . 't[i] = ("x"):rep(1000) .. i end end) '
                 . 'return {status = 200, body = "survived"}',
    concat_memory => 'local s = "x" while true do s = s .. s end',
    table_memory => 'local t = {} local i = 0 while true do i = i + 1 '
                 . 't[i] = {i, i, i} end',
    backtrack   => 'local s = ("a"):rep(300) '
                 . 'local r = s:find(("a-"):rep(4) .. "b") '
                 . 'return {status = 200, body = tostring(r)}',
    rep_huge    => 'local s = ("x"):rep(2^40) return {status = 200, body = #s}',
    rep_big     => 'local s = ("x"):rep(64 * 1024 * 1024) '
                 . 'return {status = 200, body = tostring(#s)}',
    rep_empty   => 'local s = (""):rep(2^62) '
                 . 'return {status = 200, body = "done"}',
    move_huge   => 'table.move({}, 1, 1e15, 1, {}) '
                 . 'return {status = 200, body = "done"}',
    fast        => 'return {status = 200, body = "fast"}',
);

my $conf = '';
my %limits = (
    # instruction budget small and timeout large: the budget must trip
    loop         => 'instructions=1000000 timeout=5s',
    pcall_loop   => 'instructions=1000000 timeout=5s',
    xpcall_loop  => 'instructions=1000000 timeout=5s',
    error_loop   => 'instructions=1000000 timeout=5s',
    coro_loop    => 'instructions=1000000 timeout=1s',
    memory       => 'memory=32m timeout=5s',
    pcall_memory => 'memory=32m timeout=5s',
    concat_memory => 'memory=32m timeout=5s',
    table_memory => 'memory=32m instructions=100000000 timeout=5s',
    backtrack    => 'timeout=200ms',
    rep_huge     => 'memory=32m timeout=2s',
    rep_big      => 'memory=32m timeout=2s',
    rep_empty    => 'timeout=1s',
    move_huge    => 'timeout=1s',
    fast         => 'timeout=1s',
);

for my $name (sort keys %scripts) {
    $t->write_file("$name.lua",
        "return function(req)\n  $scripts{$name}\nend\n");
    $conf .= "sbx_connector $name {\n"
           . "    script %%PREFIX%%/$name.lua;\n"
           . "    limits $limits{$name};\n"
           . "    pool one;\n"
           . "}\n";
}

# one helper: every request below goes through the same helper slot, so a
# limit hit that left the helper wedged would show on the next request
my $locs = join("\n", map { "    location = /$_ { sbx_connector $_; }" }
                      sort keys %scripts);
# lua-cjson's buffers are malloc'd outside the Lua count: under a pool
# address-space limit of 128m a 15 MiB string of control bytes (a 90 MiB
# encoding) once killed the helper (502 sandbox_failure)
$t->write_file('json_bomb.lua', <<'LUA');
return function(req)
  local s = string.rep("\1", 15 * 1024 * 1024)
  return {status = 200, body = "n" .. #json.encode({s})}
end
LUA
# a table that holds the same table twice at each of 60 levels: 2^60 leaves
$t->write_file('json_dag.lua', <<'LUA');
return function(req)
  local t = {}
  local c = t
  for i = 1, 60 do local n = {}; c[1] = n; c[2] = n; c = n end
  return {status = 200, body = json.encode(t)}
end
LUA
for my $name (qw(json_bomb json_dag)) {
    $conf .= "sbx_connector $name {\n"
           . "    script %%PREFIX%%/$name.lua;\n"
           . "    capabilities json;\n"
           . "    limits memory=32m timeout=5s;\n"
           . "    pool small;\n"
           . "}\n";
}
$locs .= "\n    location = /json_bomb { sbx_connector json_bomb; }"
       . "\n    location = /json_dag { sbx_connector json_dag; }";

$t->conf(<<"EOF");
sbx_pool one size=1 queue=16;
sbx_pool small size=1 queue=16 memory=128m;
$conf
server {
    listen 127.0.0.1:%%PORT%%;
$locs
}
EOF

$t->start;

sub timed_get {
    my ($path) = @_;
    my $t0 = time;
    my $r = $t->get($path, { timeout => 15 });
    return ($r, time - $t0);
}

sub fast_ok {
    my ($after) = @_;
    my $r = $t->get('/fast');
    ok($r->{status} == 200 && $r->{content} eq 'fast',
       "next request after $after is served (200)")
        or diag("got $r->{status}: $r->{content}");
}

my ($r, $took);

is($t->get('/fast')->{content}, 'fast', 'baseline request');

# --- instruction limit ---------------------------------------------------

for my $name (qw(loop pcall_loop xpcall_loop error_loop)) {
    ($r, $took) = timed_get("/$name");
    $t->error_ok($r, 500, 'transform_error', "$name: instruction limit → 500");
    cmp_ok($took, '<', 3, "$name: answered in time (${\ sprintf '%.2f', $took}s), "
           . 'not by the 5s timeout');
    fast_ok($name);
}

# many short coroutines: the budget (or the deadline checked in the hook)
# must stop it no later than the 1s timeout
($r, $took) = timed_get('/coro_loop');
ok($r->{status} == 500 || $r->{status} == 504,
   "coro_loop: stopped with 500 or 504 (got $r->{status})");
cmp_ok($took, '<', 3, 'coro_loop: stopped within 3s');
fast_ok('coro_loop');

# --- memory limit ------------------------------------------------------------

for my $name (qw(memory pcall_memory concat_memory table_memory)) {
    ($r, $took) = timed_get("/$name");
    $t->error_ok($r, 500, 'transform_error', "$name: memory limit → 500");
    cmp_ok($took, '<', 5, "$name: answered before the timeout");
    unlike($r->{content} // '', qr/survived/, "$name: caught memory error "
           . 'does not turn into a 200');
    fast_ok($name);
}

# --- lua-cjson under a pool's address-space limit -----------------------------

for my $name (qw(json_bomb json_dag)) {
    ($r, $took) = timed_get("/$name");
    $t->error_ok($r, 500, 'transform_error',
                 "$name: memory limit → 500, not a dead helper");
    cmp_ok($took, '<', 5, "$name: answered before the timeout");
}
unlike($t->error_log, qr/killed by|exited with/,
       'no helper died of the json bombs');

# --- capped C calls ---------------------------------------------------------

($r, $took) = timed_get('/rep_huge');
$t->error_ok($r, 500, 'transform_error', 'string.rep 2^40 → 500');
cmp_ok($took, '<', 2, 'string.rep 2^40 refused at once');
fast_ok('rep_huge');

($r, $took) = timed_get('/rep_big');
$t->error_ok($r, 500, 'transform_error',
             'string.rep 64 MiB under a 32m limit → 500');
fast_ok('rep_big');

($r, $took) = timed_get('/rep_empty');
# the capped rep answers "" at once; a limit hit is also contained
ok(($r->{status} == 200 && $r->{content} eq 'done')
   || $r->{status} == 500 || $r->{status} == 504,
   "string.rep('', 2^62): done at once, 500 or 504 (got $r->{status})");
cmp_ok($took, '<', 3, "string.rep('', 2^62) does not run on");
fast_ok('rep_empty');

($r, $took) = timed_get('/move_huge');
ok($r->{status} == 500 || $r->{status} == 504,
   "table.move 1e15: 500 or 504 (got $r->{status})");
cmp_ok($took, '<', 3, 'table.move 1e15 does not run on');
fast_ok('move_huge');

# --- wall-clock timeout: a long single C call (pattern backtracking) ------

my @before = $t->helper_pids;
($r, $took) = timed_get('/backtrack');
$t->error_ok($r, 504, 'transform_timeout', 'backtracking find → 504');
cmp_ok($took, '<', 2, sprintf('504 within 2s (took %.2fs)', $took));
cmp_ok($took, '>=', 0.15, 'not before the 200ms timeout');
fast_ok('a timeout');
# one helper in pool one, one in pool small
ok($t->wait_for(sub { $t->helper_pids == @before }, 5),
   'pools back to full size after the timeout kill');
my @after = $t->helper_pids;
my %now = map { $_ => 1 } @after;
my @gone = grep { !$now{$_} } @before;
is(scalar @gone, 1, 'the timed-out helper was replaced (new pid)');
ok(!grep({ SbxTest->alive($_) } @gone), 'the timed-out helper is gone');

# twice in a row, then fine again
for (1 .. 2) {
    ($r, $took) = timed_get('/backtrack');
    is($r->{status}, 504, "backtrack again ($_) → 504");
}
fast_ok('two more timeouts');

# every limit hit was logged with its kind
my $log = $t->error_log;
like($log, qr/instruction/i, 'error log mentions the instruction limit');
like($log, qr/memory/i, 'error log mentions the memory limit');
like($log, qr/time(?:d)?[ _-]?out/i, 'error log mentions the timeout');

$t->stop;
$t->check_error_log;

done_testing;
