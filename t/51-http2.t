#!/usr/bin/perl
# HTTP/2 clients (h2c with prior knowledge: curl, h2load) and unbuffered
# upstream requests: content and connector mode behave as over HTTP/1.1 —
# request bodies (small, large, on many streams of one connection),
# response hooks, error answers, rate-limit headers — and a request hook
# on a location with "proxy_request_buffering off" still gets the whole body.

use strict;
use warnings;

use lib 't/lib';
use JSON::PP;
use SbxTest;
use Test::More;

system('curl --version 2>/dev/null | grep -q HTTP2') == 0
    or BAIL_OUT('curl with HTTP/2 is needed (sh tools/install-deps.sh test)');
system('h2load --version >/dev/null 2>&1') == 0
    or BAIL_OUT('h2load is needed (nghttp2-client: '
                . 'sh tools/install-deps.sh test)');

my $t = SbxTest->new;
my $dir = $t->prefix;

$t->write_file('echo.lua', <<'EOF');
return function(req)
  if req.query.fail then error("h2-marker") end
  return { status = 201,
           headers = { ["content-type"] = "text/plain",
                       ["x-method"] = req.method,
                       ["x-len"] = tostring(#(req.body or "")) },
           body = "got:" .. #(req.body or "") .. ":" .. req.uri ..
                  ":" .. (req.body or ""):sub(1, 8) }
end
EOF

$t->write_file('both.lua', <<'EOF');
return {
  request = function(req)
    req.headers["x-added"] = "yes"
    req.body = "REQ:" .. (req.body or "")
    req.uri = "/echo" .. req.uri
    return req
  end,
  response = function(res, req)
    return { status = 200,
             headers = { ["content-type"] = "text/plain",
                         ["x-up-status"] = tostring(res.status) },
             body = "wrapped:" .. res.body }
  end,
}
EOF

$t->write_file('resp.lua', <<'EOF');
return {
  response = function(res, req)
    return { status = res.status, headers = { ["x-wrapped"] = "1" },
             body = "wrapped:" .. res.body }
  end,
}
EOF

$t->conf(<<'EOF');
sbx_pool up size=1;
sbx_connector echo { script %%PREFIX%%/echo.lua; pool up; }
sbx_connector both { script %%PREFIX%%/both.lua; }
sbx_connector resp { script %%PREFIX%%/resp.lua; }

server {
    listen 127.0.0.1:%%PORT2%%;
    client_max_body_size 2m;
    location /echo/ { sbx_connector echo; }
}

server {
    listen 127.0.0.1:%%PORT%% http2;
    client_max_body_size 2m;

    location /c/ {
        sbx_connector echo;
        sbx_rate_limit key=$remote_addr rate=1000r/s name=h2;
    }
    location /both/ {
        sbx_connector both;
        proxy_pass http://127.0.0.1:%%PORT2%%;
    }
    location /unbuf/ {
        sbx_connector both;
        proxy_request_buffering off;
        proxy_pass http://127.0.0.1:%%PORT2%%;
    }
    location /respunbuf/ {
        sbx_connector resp;
        proxy_request_buffering off;
        proxy_http_version 1.1;
        proxy_pass http://127.0.0.1:%%PORT2%%/echo/;
    }
}
EOF

$t->start;

my $base = 'http://127.0.0.1:' . $t->port;

# curl over h2c; returns (status, {headers}, body)
sub h2 {
    my ($path, @opts) = @_;
    my $hfile = "$dir/h2.headers";
    unlink $hfile;
    open my $fh, '-|', 'curl', '-s', '--http2-prior-knowledge', '-m', '10',
        '-D', $hfile, @opts, "$base$path" or die "curl: $!";
    local $/;
    my $body = <$fh> // '';
    close $fh;
    my $raw = $t->read_file('h2.headers') // '';
    my ($proto, $status) = $raw =~ m{^(HTTP/\S+) (\d+)};
    my %h;
    $h{lc $1} = $2 while $raw =~ /^([\w-]+):\s*(.*?)\r?$/mg;
    return ($proto // '', $status // 0, \%h, $body);
}

my $big = join('', map { chr(65 + $_ % 26) } 0 .. 299_999);
$t->write_file('big.body', $big);

# ---- content mode ------------------------------------------------------------

my ($proto, $st, $h, $body) = h2('/c/x', '-d', 'hello');
is($proto, 'HTTP/2', 'the client speaks HTTP/2');
is($st, 201, 'content mode over HTTP/2: the script\'s status');
is($body, 'got:5:/c/x:hello', 'content mode: the body reached the script');
is($h->{'x-method'}, 'POST', 'content mode: the script\'s header');
like($h->{ratelimit} // '', qr/^"h2";r=\d+;t=\d+$/,
     'rate-limited route: RateLimit over HTTP/2');
like($h->{'ratelimit-policy'} // '', qr/^"h2";q=\d+;w=\d+$/,
     'rate-limited route: RateLimit-Policy over HTTP/2');

($proto, $st, $h, $body) = h2('/c/big', '--data-binary', "\@$dir/big.body");
is($st, 201, 'a 300 kB body over HTTP/2 (DATA frames, flow control)');
is($h->{'x-len'}, length($big), 'the script got all of it');

($proto, $st, $h, $body) = h2('/c/x?fail=1');
is($st, 500, 'script error over HTTP/2: 500');
my $err = eval { decode_json($body) } // {};
is($err->{error}, 'transform_error', 'with the contract\'s error body');
like($h->{'content-type'} // '', qr{^application/json},
     'as application/json');

# many streams on one connection: h2load (curl's --parallel over h2c with
# prior knowledge breaks on any server), 400 POSTs, 20 streams at a time
{
    $t->write_file('stream.body', 'x' x 5000);
    my $out = `h2load -n 400 -c 1 -m 20 -d $dir/stream.body $base/c/s 2>&1`;
    my ($ok) = $out =~ /requests: \d+ total, \d+ started, \d+ done, (\d+) succ/;
    my ($s2xx) = $out =~ /status codes: (\d+) 2xx/;
    is($ok // 0, 400, '400 POSTs on one connection, 20 streams at a time')
        or diag($out);
    is($s2xx // 0, 400, 'every one answered by the script (2xx)');
}

# ---- connector mode ---------------------------------------------------------

($proto, $st, $h, $body) = h2('/both/a', '-d', 'payload');
is($st, 200, 'connector mode over HTTP/2: the response hook\'s status');
is($h->{'x-up-status'}, 201, 'the upstream answered the changed request');
is($body, 'wrapped:got:11:/echo/both/a:REQ:payl',
   'request hook body and uri reached the upstream, response hook wrapped it');

($proto, $st, $h, $body) = h2('/both/big', '--data-binary', "\@$dir/big.body");
is($st, 200, 'connector mode: 300 kB request body over HTTP/2');
like($body, qr/^wrapped:got:${\ (length($big) + 4) }:/,
     'the upstream got the request hook\'s whole body');

# ---- proxy_request_buffering off -------------------------------------------

my @bigpost = ('--data-binary', "\@$dir/big.body");
($proto, $st, $h, $body) = h2('/unbuf/big', @bigpost);
is($st, 200, 'proxy_request_buffering off + request hook: answers');
like($body,
     qr/^wrapped:got:${\ (length($big) + 4) }:\/echo\/unbuf\/big:REQ:ABCD/,
     'the hook read the whole body before the upstream got its version');

($proto, $st, $h, $body) = h2('/respunbuf/r', @bigpost);
is($st, 201, 'proxy_request_buffering off, response hook only: answers');
is($h->{'x-wrapped'}, 1, 'the response hook ran');
like($body, qr/^wrapped:got:${\ length($big) }:\/echo\/r:ABCD/,
     'the body streamed to the upstream unchanged');

$t->stop;
$t->check_error_log;

done_testing;
