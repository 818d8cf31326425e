#!/usr/bin/perl
# Nothing a call leaves behind reaches the next call of another connector in
# the same helper: not its globals (the compiled top level's _ENV upvalue
# once kept the last call's environment alive), not the garbage whose
# collection the next call would pay for, and not the buffers lua-cjson
# leaks on a failed decode (the helper asks to be recycled).

use strict;
use warnings;

use lib 't/lib';
use SbxTest;
use Test::More;
use Time::HiRes qw(time sleep);

my $t = SbxTest->new;

# keeps everything it builds in a global, until the 8m limit stops it
$t->write_file('hoard.lua', <<'EOF');
return function(req)
  local t = {}
  KEEP = t
  for i = 1, 1e9 do t[i] = ("x"):rep(1000) .. i end
end
EOF

# 60000 keys chained through a weak-keyed table: cheap to build, but a full
# collection that still reaches it converges in quadratic time
$t->write_file('eph.lua', <<'EOF');
return function(req)
  local n, keys, e = 60000, {}, {}
  for i = 1, n do keys[i] = {} end
  for i = n, 2, -1 do
    local j = math.random(i)
    keys[i], keys[j] = keys[j], keys[i]
  end
  for i = 1, n - 1 do e[keys[i]] = keys[i + 1] end
  HEAD = keys[1]
  CHAIN = setmetatable(e, { __mode = "k" })
  return { status = 200, body = "ok" }
end
EOF

# lua-cjson's decode buffer (7.5 MB) is lost when building the tables
# trips the memory limit (a trip sticks: the call is a 500 all the same)
$t->write_file('jleak.lua', <<'EOF');
return function(req)
  pcall(json.decode, "[" .. ("[],"):rep(2500000) .. "[]]")
  return { status = 200, body = "survived" }
end
EOF

$t->write_file('victim.lua', <<'EOF');
return function(req)
  return { status = 200, body = tostring(#("x"):rep(12000000)) }
end
EOF

$t->conf(<<'EOF');
sbx_pool one size=1 queue=16 memory=256m;
sbx_connector hoard {
    script %%PREFIX%%/hoard.lua; pool one;
    limits memory=8m instructions=100000000 timeout=2s;
}
sbx_connector eph { script %%PREFIX%%/eph.lua; pool one; }
sbx_connector jleak {
    script %%PREFIX%%/jleak.lua; pool one; capabilities json;
    limits timeout=2s;
}
sbx_connector victim { script %%PREFIX%%/victim.lua; pool one; }
server {
    listen 127.0.0.1:%%PORT%%;
    location = /hoard { sbx_connector hoard; }
    location = /eph { sbx_connector eph; }
    location = /jleak { sbx_connector jleak; }
    location = /victim { sbx_connector victim; }
}
EOF

$t->start;

sub rss_kb {
    my ($pid) = @_;
    my $s = SbxTest::slurp("/proc/$pid/status") // '';
    return $s =~ /^VmRSS:\s+(\d+)/m ? $1 : 0;
}

my $r = $t->get('/victim');
is($r->{content}, '12000000', 'the victim runs in a fresh helper');
my ($helper) = $t->helper_pids;

# --- globals of a failed call are not kept -----------------------------------

my $bad = 0;
for (1 .. 30) {
    $r = $t->get('/hoard');
    $bad++ unless $r->{status} == 500;
}
is($bad, 0, 'every hoarding call stops at its 8m limit (500)');
my ($now) = $t->helper_pids;
is($now, $helper, 'the same helper served them all');
SKIP: {
    # ASan's quarantine holds freed memory on purpose: RSS says nothing
    # about what Lua keeps in a sanitizer build (make test covers it)
    skip 'a sanitizer build: its quarantine keeps freed memory', 1
        if (SbxTest::slurp("/proc/$helper/maps") // '') =~ /asan/;
    my $rss = rss_kb($helper);
    cmp_ok($rss, '<', 64 * 1024,
           "the helper holds no call's globals: RSS ${rss} kB after 30 "
           . 'calls that each kept 8 MB');
}
$r = $t->get('/victim');
is($r->{status}, 200, 'the next connector in that helper runs under its '
   . 'own limit') or diag($r->{content});

# --- nor the garbage whose collection the next call would pay for ----------

$r = $t->get('/eph');
is($r->{status}, 200, 'the weak-table chain is built and answered');
sleep 1;
my $t0 = time;
$r = $t->get('/victim', { timeout => 10 });
my $took = time - $t0;
is($r->{status}, 200, 'the next connector is not timed out by it')
    or diag($r->{content});
cmp_ok($took, '<', 2, sprintf('and answers in %.3f s, no stall', $took));
unlike($t->error_log, qr/connector "victim" ran past its timeout/,
       'no timeout is blamed on the next connector');

# --- lua-cjson's leaked buffers: the helper asks to be replaced ---------------

my @before = $t->helper_pids;
$bad = 0;
for (1 .. 12) {
    $r = $t->get('/jleak');
    $bad++ unless $r->{status} == 500;
}
is($bad, 0, 'each decode trips the memory limit (500, pcall or not)');
ok($t->wait_for(sub { $t->error_log =~ /asks to be recycled/ }, 5),
   'the helper asked to be recycled once its heap outside Lua grew');
ok($t->wait_for(sub {
       my @p = $t->helper_pids;
       @p == 1 && $p[0] != $before[0];
   }, 5), 'and was replaced');
unlike($t->error_log, qr/SIGSYS|sandbox violation|exited with code/,
       'no helper died of it');
$r = $t->get('/victim');
is($r->{status}, 200, 'the victim runs after it');

$t->stop;
$t->check_error_log;

done_testing;
