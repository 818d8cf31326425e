#!/usr/bin/perl
# Directives: every good form starts; every bad form fails `nginx -t` with a
# message that names the directive and nginx.conf:LINE (and, for script
# problems, SCRIPT:LINE).

use strict;
use warnings;

use lib 't/lib';
use Digest::SHA qw(sha256_hex);
use SbxTest;
use Test::More;
use Time::HiRes qw(time);

my $GOOD_LUA = <<'EOF';
calls = 0                      -- assigning a global is allowed
local function greet(name)
  return "hello " .. name
end
return {
  request = function(req)
    calls = calls + 1          -- reading a global assigned in the script
    return { status = 200, body = greet(req.connector) .. " " .. calls }
  end,
}
EOF

# --- good forms -------------------------------------------------------------

{
    my $t = SbxTest->new;
    $t->write_file('full.lua', $GOOD_LUA);
    $t->write_file('minimal.lua',
        "return function(req) return {status=200, body='minimal'} end\n");
    my $sha_full = sha256_hex($GOOD_LUA);
    my $sha_min = sha256_hex(
        "return function(req) return {status=200, body='minimal'} end\n");

    $t->conf(<<"EOF");
sbx_helper_path %%HELPER%%;
sbx_require_pinned on;
sbx_pool tenant_a size=2 queue=16 max_requests=1000 memory=512m;
sbx_pool default size=1;
sbx_connector full {
    script %%PREFIX%%/full.lua;
    sha256 $sha_full;
    version 1.4.2;
    owner "Acme Data GmbH";
    description "Adapts CRM contacts to the billing API";
    capabilities json base64 hex sha256 hmac log;
    limits memory=32m instructions=10000000 timeout=500ms;
    pool tenant_a;
}
sbx_connector minimal {
    script %%PREFIX%%/minimal.lua;
    sha256 \U$sha_min\E;
}
server {
    listen 127.0.0.1:%%PORT%%;
    location /full    { sbx_connector full; }
    location /minimal { sbx_connector minimal; }
}
EOF
    my ($rc, $out) = $t->nginx_t;
    is($rc, 0, 'full good configuration passes nginx -t') or diag($out);
    like($out, qr/test is successful/, 'nginx -t says successful');

    ok(eval { $t->start; 1 }, 'full good configuration starts') or diag($@);
    my $r = $t->get('/full');
    is($r->{status}, 200, 'connector with every directive answers');
    is($r->{content}, 'hello full 1', 'and runs its script');
    $r = $t->get('/minimal');
    is($r->{status}, 200, 'connector on the default pool answers');
    is($r->{content}, 'minimal', 'and runs its script');
    $t->stop;
    $t->check_error_log;
}

{
    # defaults: no helper path, no pool, no limits, pinning off
    my $t = SbxTest->new;
    $t->write_file('d.lua', "return function(req) return {status=204} end\n");
    $t->conf(<<'EOF');
sbx_require_pinned off;
sbx_connector d { script %%PREFIX%%/d.lua; limits timeout=2s; }
server { listen 127.0.0.1:%%PORT%%; location / { sbx_connector d; } }
EOF
    ok(eval { $t->start; 1 }, 'minimal configuration starts') or diag($@);
    is($t->get('/')->{status}, 204, 'status 204 from a script with no body');
    $t->stop;
    $t->check_error_log;
}

# --- bad forms ----------------------------------------------------------------

my $BAD_LUA_SYNTAX = <<'EOF';
return function(req)
  local a = 1
  local b = = 2
  return {status = 200}
end
EOF

my @cases = (
    {
        name  => 'unknown pool',
        conn  => 'pool nope;',
        like  => [ qr/\bpool\b/, qr/"?nope"?/ ],
        at    => [ qr/pool nope;/, qr/sbx_connector c1 \{/ ],
    },
    {
        name  => 'unknown connector in a location',
        loc   => 'sbx_connector nope;',
        like  => [ qr/sbx_connector/, qr/nope/ ],
        at    => [ qr/sbx_connector nope;/ ],
    },
    (map {
        my $p = $_;
        +{
            name => "bad sbx_pool '$p'",
            http => "sbx_pool p1 $p;",
            like => [ qr/sbx_pool/ ],
            at   => [ qr/sbx_pool p1/ ],
        }
    } ('size=0', 'size=abc', 'size=-1', 'queue=5', 'size=2 queue=x',
       'size=2 max_requests=many', 'size=2 memory=12q', 'size=2 bogus=1',
       'size=2 pipeline=0', 'size=2 pipeline=17', 'size=2 pipeline=x')),
    (map {
        my $l = $_;
        +{
            name => "bad limits '$l'",
            conn => "limits $l;",
            like => [ qr/\blimits\b/ ],
            at   => [ qr/limits \Q$l\E;/ ],
        }
    } ('memory=lots', 'memory=0', 'timeout=forever', 'timeout=0',
       'instructions=abc', 'instructions=0', 'cpu=5')),
    (map {
        my $v = $_;
        +{
            name => "bad state '$v'",
            conn => "state $v;",
            like => [ qr/\bstate\b/ ],
            at   => [ qr/state \Q$v\E;/ ],
        }
    } ('old', 'deprecated soon', 'deprecated 2026-13-01', 'ga 2026-01-01',
       'deprecated 2026-01-01 x')),
    {
        name   => 'syntax error in script',
        script => $BAD_LUA_SYNTAX,
        like   => [ qr/script|sbx_connector/, 'SCRIPT:3:' ],
        block  => 1,
    },
    {
        name   => 'missing script file',
        conn_script => '%%PREFIX%%/does-not-exist.lua',
        like   => [ qr/does-not-exist\.lua/, qr/script/ ],
        block  => 1,
    },
    {
        name   => 'bytecode script refused',
        script => "\x1bLua\x54\x00\x19\x93\r\n\x1a\n\x04\x08\x08xV\x00\x00",
        like   => [ qr/script|sbx_connector/, 'SCRIPT' ],
        block  => 1,
    },
    {
        name   => 'pin mismatch',
        conn   => 'sha256 ' . sha256_hex('something else') . ';',
        like   => [ qr/sha256/, 'SCRIPT' ],
        block  => 1,
    },
    {
        name   => 'malformed sha256',
        conn   => 'sha256 xyz123;',
        like   => [ qr/sha256/ ],
        at     => [ qr/sha256 xyz123;/ ],
    },
    {
        name   => 'sbx_require_pinned on without sha256',
        http   => 'sbx_require_pinned on;',
        like   => [ qr/sha256|pinned/, qr/\bc1\b/ ],
        block  => 1,
        at     => [ qr/sbx_require_pinned on;/ ],
    },
    {
        name   => 'sbx_require_pinned bad value',
        http   => 'sbx_require_pinned maybe;',
        like   => [ qr/sbx_require_pinned/ ],
        at     => [ qr/sbx_require_pinned maybe;/ ],
    },
    {
        name   => 'unknown capability',
        conn   => 'capabilities json nosuchcap;',
        like   => [ qr/capabilit/, qr/nosuchcap/ ],
        at     => [ qr/capabilities json nosuchcap;/ ],
    },
    {
        name   => 'script reads undefined global io',
        script => "return function(req)\n"
                . "  local f = io.open('/etc/passwd')\n"
                . "  return {status = 200, body = f:read('a')}\nend\n",
        like   => [ 'SCRIPT:2:', qr/\bio\b/ ],
        block  => 1,
    },
    {
        name   => 'script reads os.execute',
        script => "return function(req)\n  local x = 1\n"
                . "  os.execute('id')\n  return {status = 200}\nend\n",
        like   => [ 'SCRIPT:3:', qr/os\.execute|execute/ ],
        block  => 1,
    },
    {
        name   => 'script reads a misspelt global',
        script => "return function(req)\n"
                . "  return {status = 200, body = tostrnig(1)}\nend\n",
        like   => [ 'SCRIPT:2:', qr/tostrnig/ ],
        block  => 1,
    },
    {
        name   => 'script uses a capability it was not given',
        script => "return function(req)\n  local s = 'x'\n"
                . "  return {status = 200, body = json.encode({s})}\nend\n",
        like   => [ 'SCRIPT:3:', qr/json/ ],
        block  => 1,
    },
    {
        name   => 'script loops forever at top level',
        script => "local n = 0\nwhile true do n = n + 1 end\n"
                . "return function(req) return {status = 200} end\n",
        like   => [ 'SCRIPT' ],
        block  => 1,
        quick  => 20,
    },
    {
        # one long C call: no instruction hook stops it, the backstop does
        name   => 'script backtracks at top level',
        script => "local x = ('a'):rep(40):find(('a-'):rep(12) .. 'b')\n"
                . "return function(req) return {status = 200} end\n",
        like   => [ 'SCRIPT:1:', qr/time limit exceeded/ ],
        block  => 1,
        quick  => 8,
    },
    {
        name   => 'script raises at top level',
        script => "local x = 1\nerror('top-level-boom')\n"
                . "return function(req) return {status = 200} end\n",
        like   => [ 'SCRIPT:2:', qr/top-level-boom/ ],
        block  => 1,
    },
    {
        name   => 'script returns neither table nor function',
        script => "return 42\n",
        like   => [ 'SCRIPT' ],
        block  => 1,
    },
    {
        name   => 'duplicate connector name',
        extra  => "sbx_connector c1 { script %%PREFIX%%/c1.lua; }  # dup\n",
        like   => [ qr/sbx_connector/, qr/\bc1\b/ ],
        at     => [ qr/# dup/ ],
    },
    {
        name   => 'connector without script',
        conn_script => '',
        like   => [ qr/script/ ],
        block  => 1,
    },
    {
        name   => 'sbx_pool without a name',
        http   => 'sbx_pool size=1;',
        like   => [ qr/"sbx_pool" needs a name/ ],
        at     => [ qr/sbx_pool size=1;/ ],
    },
    {
        name   => 'sbx_pool with an empty name',
        http   => 'sbx_pool "" size=1;',
        like   => [ qr/invalid "sbx_pool" name ""/ ],
        at     => [ qr/sbx_pool "" size=1;/ ],
    },
    {
        # pool names become metric labels and log text: no quotes or \\
        name   => 'sbx_pool with quotes in its name',
        http   => 'sbx_pool "we\\"ird\\\\pool" size=1;',
        like   => [ qr/invalid "sbx_pool" name/ ],
        at     => [ qr/sbx_pool "we/ ],
    },
    {
        name   => 'sbx_pool parameter given twice',
        http   => 'sbx_pool p size=1 size=2;',
        like   => [ qr/duplicate "size=" in "sbx_pool"/ ],
        at     => [ qr/sbx_pool p size=1 size=2;/ ],
    },
    {
        name   => 'sbx_pool queue out of range says the range',
        http   => 'sbx_pool p size=1 queue=1000001;',
        like   => [ qr/queue "queue=1000001" \(expected 0 to 1000000\)/ ],
        at     => [ qr/queue=1000001;/ ],
    },
    {
        name   => 'sbx_pool unknown parameter lists the known ones',
        http   => 'sbx_pool p size=1 bogus=1;',
        like   => [ qr/"bogus=1" \(expected size=, queue=, pipeline=, (?x)
                      max_requests=\ or\ memory=\)/ ],
        at     => [ qr/bogus=1;/ ],
    },
    {
        name   => 'sbx_pool memory in g (nginx 1.22 sizes have no g)',
        http   => 'sbx_pool p size=1 memory=1g;',
        like   => [ qr/at least 64m, in k or m/ ],
        at     => [ qr/memory=1g;/ ],
    },
    {
        name   => 'limits unknown key lists the known ones',
        conn   => 'limits cpu=5;',
        like   => [ qr/"cpu=5" \(expected memory=, instructions= or timeout=\)/ ],
        at     => [ qr/limits cpu=5;/ ],
    },
    {
        name   => 'limits parameter given twice',
        conn   => 'limits memory=1m memory=2m;',
        like   => [ qr/duplicate "memory=" in "limits"/ ],
        at     => [ qr/limits memory=1m memory=2m;/ ],
    },
    {
        name   => 'limits memory over half of the pool names the limits line',
        http   => 'sbx_pool small size=1 memory=64m;',
        conn   => "pool small;\n    limits memory=33m;",
        like   => [ qr/at most half of the memory of pool "small"/ ],
        at     => [ qr/limits memory=33m;/ ],
    },
    {
        name   => 'unknown pool names the pool line',
        conn   => "version 1;\n    pool nope;",
        like   => [ qr/unknown pool "nope"/ ],
        at     => [ qr/pool nope;/ ],
    },
    {
        name   => 'sha256 mismatch names the sha256 line',
        conn   => "version 1;\n    sha256 " . ('0' x 64) . ';',
        like   => [ qr/does not match its pin/ ],
        at     => [ qr/sha256 0{64};/ ],
    },
    {
        name   => 'a one-value directive of the block given two',
        conn   => 'owner Acme Inc;',
        like   => [ qr/invalid number of arguments in "owner" in (?x)
                      sbx_connector\ block\ \(expected\ "owner\ VALUE;"\)/ ],
        at     => [ qr/owner Acme Inc;/ ],
    },
    {
        name   => 'an unknown directive of the block with two values',
        conn   => 'colour blue green;',
        like   => [ qr/unknown directive "colour" in sbx_connector block/ ],
        at     => [ qr/colour blue green;/ ],
    },
    {
        name   => 'capabilities without a name',
        conn   => 'capabilities;',
        like   => [ qr/"capabilities" directive needs at least one name/ ],
        at     => [ qr/capabilities;/ ],
    },
    {
        name   => 'sunset on a day that does not exist',
        conn   => 'sunset 2027-02-30;',
        like   => [ qr/invalid sunset "2027-02-30"/ ],
        at     => [ qr/sunset 2027-02-30;/ ],
    },
    {
        name   => 'sunset HTTP-date with the wrong weekday',
        conn   => 'sunset "Mon, 30 Jun 2027 00:00:00 GMT";',
        like   => [ qr/invalid sunset "Mon, 30 Jun 2027/ ],
        at     => [ qr/sunset "Mon, 30 Jun/ ],
    },
    {
        name   => 'state deprecated on a day that does not exist',
        conn   => 'state deprecated 2026-02-29;',
        like   => [ qr/invalid date "2026-02-29"/ ],
        at     => [ qr/state deprecated 2026-02-29;/ ],
    },
    {
        name   => 'empty connector name',
        extra  => "sbx_connector \"\" { script %%PREFIX%%/c1.lua; }  # empty\n",
        like   => [ qr/invalid connector name ""/ ],
        at     => [ qr/# empty/ ],
    },
    {
        name   => 'an enum value error names the directive and the values',
        loc    => 'sbx_connector c1; sbx_residency_log_level debug;',
        like   => [ qr/invalid value "debug" in "sbx_residency_log_level" (?x)
                      \(expected\ info,\ notice,\ warn\ or\ error\)/ ],
        at     => [ qr/sbx_residency_log_level debug;/ ],
    },
    {
        name   => 'sbx_helper_path that does not exist',
        http   => 'sbx_helper_path /nonexistent/sbx-lua-helper;',
        like   => [ qr{sbx helper "/nonexistent/sbx-lua-helper" is not (?x)
                       executable.*sbx_connector\ "c1"} ],
        block  => 1,
    },
    {
        # fail closed: a helper that says nothing has checked nothing
        name   => 'a helper that exits 0 without checking the script',
        helper => "#!/bin/sh\nexit 0\n",
        script => "return function(req) return {status = 200 end\n",
        like   => [ qr/exited without reporting the check/ ],
        block  => 1,
    },
    {
        # it never reads the 70 kB script: nginx -t must not die of SIGPIPE
        name   => 'a helper that exits at once, before reading the script',
        helper => "#!/bin/sh\nexit 127\n",
        script => (' ' x 70000) . "\nreturn function(req) return {} end\n",
        like   => [ qr/the helper exited with code 127/ ],
        block  => 1,
    },
    {
        name   => 'unknown directive inside a connector block',
        conn   => 'colour blue;',
        like   => [ qr/colour/ ],
        at     => [ qr/colour blue;/ ],
    },
);

my $OK_LUA = "return function(req) return {status = 200} end\n";

for my $c (@cases) {
    my $t = SbxTest->new;
    my $script = $t->write_file('c1.lua', $c->{script} // $OK_LUA);
    my $script_line = exists $c->{conn_script}
        ? ($c->{conn_script} eq '' ? '' : "script $c->{conn_script};")
        : 'script %%PREFIX%%/c1.lua;';
    my $conn = $c->{conn} // '';
    my $http = $c->{http} // '';
    if ($c->{helper}) {
        my $h = $t->write_file('fake-helper', $c->{helper});
        chmod 0755, $h;
        $http .= "\nsbx_helper_path $h;";
    }
    my $loc = $c->{loc} // 'sbx_connector c1;';
    my $extra = $c->{extra} // '';

    $t->conf(<<"EOF");
$http
sbx_connector c1 {
    $script_line
    $conn
}  # end of c1
$extra
server {
    listen 127.0.0.1:%%PORT%%;
    location / { $loc }
}
EOF

    my $t0 = time;
    my ($rc, $out) = $t->nginx_t(timeout => 60);
    my $took = time - $t0;

    subtest $c->{name} => sub {
        isnt($rc, 0, 'nginx -t fails');
        isnt($rc, 124, 'nginx -t does not hang');
        for my $re (@{ $c->{like} }) {
            if (ref $re) {
                like($out, $re, "output matches $re");
            } else {
                (my $want = $re) =~ s/SCRIPT/$script/;
                ok(index($out, $want) >= 0, "output contains '$want'");
            }
        }

        my %lines;
        for my $re (@{ $c->{at} // [] }) {
            my $n = $t->conf_line($re);
            $lines{$n} = 1 if defined $n;
        }
        if ($c->{block}) {
            my $from = $t->conf_line(qr/^sbx_connector c1 \{/);
            my $to = $t->conf_line(qr/# end of c1/);
            $lines{$_} = 1 for $from .. $to;
        }
        my @at = $out =~ /nginx\.conf:(\d+)/g;
        ok(@at && grep({ $lines{$_} } @at),
           'output names nginx.conf:LINE of the directive ('
           . join(',', sort { $a <=> $b } keys %lines) . ')')
            or diag("lines in output: @at");
        if ($c->{quick}) {
            cmp_ok($took, '<', $c->{quick}, "fails within $c->{quick}s");
        }
        unlike($out, qr/\[alert\]|segmentation|core dumped/i,
               'no crash or alert');
    } or diag("nginx -t output:\n$out");
}

done_testing;
