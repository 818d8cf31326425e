#!/usr/bin/perl
# Rate limits without Redis: the shared-memory GCRA of every worker of one
# node.  Exact allowed counts for bursts, several limits per route, empty
# keys, dry run, the RateLimit-Policy / RateLimit / Retry-After fields, the
# 429 body, $sbx_ratelimit_remaining, and configuration errors.

use strict;
use warnings;

use lib 't/lib';
use SbxTest;
use Test::More;

my $t = SbxTest->new;

$t->write_file('html/static/index.html', "static\n");
$t->write_file('html/multi/index.html', "multi\n");
$t->write_file('html/default/index.html', "default\n");
$t->write_file('html/empty/index.html', "empty\n");
$t->write_file('html/dry/index.html', "dry\n");
$t->write_file('hello.lua',
    'return function(req) return {status = 200, body = "hello"} end');

$t->conf(<<'EOF');
sbx_connector hello { script %%PREFIX%%/hello.lua; }
sbx_connector gone { script %%PREFIX%%/hello.lua; state retired; }
server {
    listen 127.0.0.1:%%PORT%%;
    root %%PREFIX%%/html;

    # 5 r/m: T = 12 s; 3 back to back
    location /static/ {
        sbx_rate_limit key=$http_x_key rate=5r/m burst=3 name=basic;
        add_header X-Remaining $sbx_ratelimit_remaining always;
    }

    # the tenant limit (2 back to back) trips before the key limit (5)
    location /multi/ {
        sbx_rate_limit key=$http_x_key rate=10 r/m burst=5 name=per_key;
        sbx_rate_limit key=$http_x_tenant rate=6 r/m burst=2
                       name=per_tenant;
    }

    # no burst: N back to back
    location /default/ {
        sbx_rate_limit key=$http_x_key rate=4r/h;
    }

    location /empty/ {
        sbx_rate_limit key=$http_x_absent rate=1r/h burst=1 name=never;
    }

    location /dry/ {
        sbx_rate_limit key=$http_x_key rate=1r/h burst=1 name=watch dry_run;
    }

    location /hello {
        sbx_connector hello;
        sbx_rate_limit key=$http_x_key rate=1r/h burst=2 name=conn;
    }

    # answered 410 before the limit is checked
    location /gone {
        sbx_connector gone;
        sbx_rate_limit key=$http_x_key rate=1r/h burst=2 name=gone;
    }
}
EOF

$t->start(workers => 2);

sub hget {
    my ($path, %h) = @_;
    return $t->get($path, { headers => \%h });
}

sub hdr {
    my ($r, $name) = @_;
    my $v = $r->{headers}{lc $name};
    return ref $v ? join(', ', @$v) : $v;
}

# ---- one limit, burst, headers ------------------------------------------

{
    my @r = map { hget('/static/', 'X-Key' => 'k1') } 1 .. 5;
    is_deeply([map { $_->{status} } @r], [200, 200, 200, 429, 429],
              'burst=3: three pass back to back, then 429');

    is(hdr($r[0], 'RateLimit-Policy'), '"basic";q=3;w=36',
       'RateLimit-Policy names the policy, quota and window');
    is(hdr($r[0], 'RateLimit'), '"basic";r=2;t=12', 'first answer: r=2');
    is(hdr($r[1], 'RateLimit'), '"basic";r=1;t=24', 'second answer: r=1');
    is(hdr($r[2], 'RateLimit'), '"basic";r=0;t=36', 'third answer: r=0');
    is(hdr($r[2], 'X-Remaining'), '0', '$sbx_ratelimit_remaining');
    is(hdr($r[0], 'X-Remaining'), '2', '$sbx_ratelimit_remaining first');
    is($r[0]{content}, "static\n", 'static file served');

    $t->error_ok($r[3], 429, 'rate_limited', '429 body and content type');
    my $ra = hdr($r[3], 'Retry-After') // '';
    ok($ra =~ /^\d+$/ && $ra >= 11 && $ra <= 12,
       "Retry-After is whole seconds until the next token ($ra)");
    like(hdr($r[3], 'RateLimit') // '', qr/^"basic";r=0;t=3[56]$/,
         '429 carries RateLimit');
    is(hdr($r[3], 'RateLimit-Policy'), '"basic";q=3;w=36',
       '429 carries RateLimit-Policy');
    ok(!defined hdr($r[0], 'Retry-After'), 'no Retry-After on 200');

    my $other = hget('/static/', 'X-Key' => 'k2');
    is($other->{status}, 200, 'another key has its own budget');
}

# ---- several limits ------------------------------------------------------

{
    my @r = map { hget('/multi/', 'X-Key' => "m$_", 'X-Tenant' => 't1') }
            1 .. 3;
    is_deeply([map { $_->{status} } @r], [200, 200, 429],
              'every limit must pass: the tenant limit denies the third');
    is(hdr($r[0], 'RateLimit-Policy'),
       '"per_key";q=5;w=30, "per_tenant";q=2;w=20', 'both policies listed');
    is(hdr($r[0], 'RateLimit'), '"per_key";r=4;t=6, "per_tenant";r=1;t=10',
       'one RateLimit item per limit');
    # the 429 counted nothing: m3's key limit is reported untouched
    like(hdr($r[2], 'RateLimit') // '', qr/^"per_key";r=5;t=0, "per_tenant";r=0;/,
         'on a 429 a limit that passed reports its budget without this '
         . 'request');

    # a denied request consumed no key budget: m1 still has 4 of 5 left
    my $k = hget('/multi/', 'X-Key' => 'm1', 'X-Tenant' => 't2');
    is($k->{status}, 200, 'other tenant passes');
    like(hdr($k, 'RateLimit') // '', qr/^"per_key";r=3;/,
         'key budget counted once per allowed request only');

    # no tenant header: that limit is skipped, the key limit holds
    my @s = map { hget('/multi/', 'X-Key' => 'solo') } 1 .. 6;
    is_deeply([map { $_->{status} } @s], [200, 200, 200, 200, 200, 429],
              'empty tenant key skips that limit; key limit burst=5');
    is(hdr($s[0], 'RateLimit'), '"per_key";r=4;t=6',
       'skipped limit is not reported in RateLimit');
}

# ---- default burst, empty key, dry run -----------------------------------

{
    my @r = map { hget('/default/', 'X-Key' => 'd') } 1 .. 5;
    is_deeply([map { $_->{status} } @r], [200, 200, 200, 200, 429],
              'no burst=: N requests pass back to back');
    is(hdr($r[0], 'RateLimit-Policy'), '"4-per-h";q=4;w=3600',
       'default name and window');

    my @e = map { hget('/empty/') } 1 .. 3;
    is_deeply([map { $_->{status} } @e], [200, 200, 200],
              'empty key: limit skipped');
    is(hdr($e[0], 'RateLimit-Policy'), '"never";q=1;w=3600',
       'policy still announced');
    ok(!defined hdr($e[0], 'RateLimit'), 'no RateLimit when nothing counted');

    my @d = map { hget('/dry/', 'X-Key' => 'dry') } 1 .. 3;
    is_deeply([map { $_->{status} } @d], [200, 200, 200],
              'dry_run never denies');
    like(hdr($d[2], 'RateLimit') // '', qr/^"watch";r=0;/,
         'dry_run still reports');
    like($t->error_log, qr/dry run, would deny by limit "watch"/,
         'dry_run logs what it would have denied');
}

# ---- connector route -----------------------------------------------------

{
    my @r = map { hget('/hello', 'X-Key' => 'c') } 1 .. 3;
    is_deeply([map { $_->{status} } @r], [200, 200, 429],
              'connector route limited before the helper runs');
    is($r[0]{content}, 'hello', 'connector answered');
    $t->error_ok($r[2], 429, 'rate_limited', 'connector route 429 body');
    like(hdr($r[2], 'Retry-After') // '', qr/^\d+$/, 'Retry-After');
}

# a retired connector answers before the limit: the route's policy is
# there, RateLimit (a count) is not, and nothing was counted
{
    my @r = map { hget('/gone', 'X-Key' => 'g') } 1 .. 3;
    is_deeply([map { $_->{status} } @r], [410, 410, 410],
              'retired connector: 410, never 429');
    $t->error_ok($r[2], 410, 'connector_retired', 'retired: 410 body');
    is(hdr($r[2], 'RateLimit-Policy'), '"gone";q=2;w=7200',
       'retired: the 410 carries the route\'s RateLimit-Policy');
    ok(!defined hdr($r[2], 'RateLimit'), 'retired: no RateLimit (no count)');
}

$t->check_error_log;
$t->stop;

# ---- configuration errors ------------------------------------------------

my @bad = (
    [ 'sbx_rate_limit key=$remote_addr rate=5r/d;', 'sbx_rate_limit',
      qr/invalid rate "5r\/d", expected rate=N r\/s, r\/m or r\/h/ ],
    [ 'sbx_rate_limit key=$remote_addr rate=0r/s;', 'sbx_rate_limit',
      qr/invalid rate "0r\/s"/ ],
    [ 'sbx_rate_limit key=$remote_addr;', 'sbx_rate_limit',
      qr/key=VALUE and rate=N r\/s\|r\/m\|r\/h are required/ ],
    [ 'sbx_rate_limit key=$remote_addr rate=1r/s burst=0;', 'sbx_rate_limit',
      qr/invalid "burst=0", expected burst=N with 1 <= N <= 1000000/ ],
    # B * T must not overflow: 2^63 - 1 at 1 r/h once did
    [ 'sbx_rate_limit key=$remote_addr rate=1r/h '
      . 'burst=9223372036854775807;', 'sbx_rate_limit',
      qr/invalid "burst=9223372036854775807"/ ],
    [ 'sbx_rate_limit key=$remote_addr rate=1r/s rate=2r/s;', 'sbx_rate_limit',
      qr/duplicate "rate=" in "sbx_rate_limit"/ ],
    [ 'sbx_rate_limit key=$remote_addr rate=+5r/s;', 'sbx_rate_limit',
      qr/invalid rate "\+5r\/s"/ ],
    [ 'sbx_rate_limit key=$remote_addr rate=1r/s colour=red;', 'sbx_rate_limit',
      qr/unknown parameter "colour=red"/ ],
    [ 'sbx_rate_limit key=$remote_addr rate=1r/s name=a; '
      . 'sbx_rate_limit key=$http_y rate=2r/s name=a;', 'sbx_rate_limit',
      qr/duplicate limit name "a"/ ],
    [ 'sbx_rate_limit key=$remote_addr rate=1r/s name=a/b;', 'sbx_rate_limit',
      qr/invalid name "a\/b"/ ],
    [ 'sbx_rate_limit_fallback maybe;', 'sbx_rate_limit_fallback',
      qr/invalid value "maybe", expected local, open or closed/ ],
);

for my $case (@bad) {
    my ($line, $directive, $re) = @$case;
    my $b = SbxTest->new;
    $b->conf(<<"EOF");
server {
    listen 127.0.0.1:%%PORT%%;
    location / {
        $line
    }
}
EOF
    my $n = $b->conf_line($line);
    my ($rc, $out) = $b->nginx_t;
    isnt($rc, 0, "nginx -t fails: $line");
    like($out, qr/"\Q$directive\E"[^\n]*/, "message names $directive");
    like($out, $re, "message says what was expected: $line");
    like($out, qr/\Q${\ $b->conf_path}\E:$n\b/, 'message names file:line');
    $b->cleanup;
}

{
    my $b = SbxTest->new;
    $b->conf(<<'EOF');
sbx_redis 127.0.0.1;
server { listen 127.0.0.1:%%PORT%%; }
EOF
    my $n = $b->conf_line('sbx_redis');
    my ($rc, $out) = $b->nginx_t;
    isnt($rc, 0, 'sbx_redis without a port fails');
    my $want = '"sbx_redis": invalid address "127.0.0.1", expected '
             . 'host:port or unix:/path in ' . $b->conf_path . ":$n";
    like($out, qr/\Q$want\E\b/,
         'sbx_redis address error names directive, expectation, line');
    $b->cleanup;
}

{
    my $b = SbxTest->new;
    $b->conf(<<'EOF');
sbx_redis 127.0.0.1:6379 timeout=soon;
server { listen 127.0.0.1:%%PORT%%; }
EOF
    my ($rc, $out) = $b->nginx_t;
    isnt($rc, 0, 'sbx_redis bad timeout fails');
    like($out, qr/"sbx_redis": invalid "timeout=soon", expected a time/,
         'sbx_redis timeout error');
    $b->cleanup;
}

{
    my $b = SbxTest->new;
    $b->conf(<<'EOF');
sbx_redis 127.0.0.1:6379 timeout=50ms timeout=60ms;
server { listen 127.0.0.1:%%PORT%%; }
EOF
    my $n = $b->conf_line('sbx_redis');
    my ($rc, $out) = $b->nginx_t;
    isnt($rc, 0, 'sbx_redis with a parameter given twice fails');
    like($out, qr/duplicate "timeout=" in "sbx_redis" .* in (?x)
                  \Q${\ $b->conf_path}\E:$n\b/,
         'the message names the parameter, the directive and the line');
    $b->cleanup;
}

done_testing;
