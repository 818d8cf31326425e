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
