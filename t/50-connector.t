#!/usr/bin/perl
# Connector mode: sbx_connector with proxy_pass.  The request hook reshapes
# the request the upstream gets (or answers in its place), the response hook
# reshapes the upstream's answer.  The upstream is a second server block of
# the same nginx: an echo (a content-mode connector in its own pool that
# returns what it received as JSON), static files, chunked answers.

use strict;
use warnings;

use lib 't/lib';
use IO::Uncompress::Gunzip ();
use JSON::PP;
use SbxTest;
use Test::More;

my $t = SbxTest->new;

# ---- scripts ---------------------------------------------------------------

# the upstream: what it received, as JSON
$t->write_file('upecho.lua', <<'EOF');
return function(req)
  return { status = 200, headers = { ["content-type"] = "application/json",
                                     ["x-upstream"] = "echo" },
           body = json.encode({ method = req.method, uri = req.uri,
                                args = req.args, headers = req.headers,
                                body = req.body or json.null }) }
end
EOF

$t->write_file('upslow.lua', <<'EOF');
return function(req)
  local t = os.clock() + 1.0
  while os.clock() < t do end
  return { status = 200, body = "slow" }
end
EOF

$t->write_file('rewrite.lua', <<'EOF');
return {
  request = function(req)
    req.uri = req.uri:gsub("^/rw/", "/echo/")
    req.args = (req.args ~= "" and req.args .. "&" or "") .. "added=1"
    req.headers["x-added"] = "yes"
    req.headers["x-remove"] = nil
    req.headers["X-Mixed-Case"] = "Mixed"
    if req.query.body == "empty" then
      req.body = ""
    elseif req.query.body == "none" then
      req.body = nil
    elseif req.body then
      req.body = "<" .. req.body:upper() .. ">"
    end
    return req
  end,
}
EOF

$t->write_file('cookie.lua', <<'EOF');
return {
  response = function(res, req)
    res.headers["x-cookie-type"] = type(res.headers["set-cookie"])
    return res
  end,
}
EOF

$t->write_file('short.lua', <<'EOF');
return {
  request = function(req)
    if req.query.pass then return req end
    return { status = 403, headers = { ["content-type"] = "text/plain",
                                       ["x-short"] = "1" },
             body = "denied by connector\n" }
  end,
}
EOF

$t->write_file('resp.lua', <<'EOF');
return {
  response = function(res, req)
    return { status = res.status == 200 and 201 or res.status,
             headers = { ["content-type"] = "text/plain",
                         ["x-resp"] = "yes",
                         ["x-orig-type"] = res.headers["content-type"],
                         ["x-req-uri"] = req.uri,
                         ["connection"] = "close-me",
                         ["transfer-encoding"] = "bogus" },
             body = "wrapped:" .. #(res.body or "") .. ":" ..
                    (res.body or "nil") }
  end,
}
EOF

$t->write_file('both.lua', <<'EOF');
return {
  request = function(req)
    leaked = "from-request-hook"
    req.uri = "/echo/both"
    req.headers["x-stage"] = "request"
    return req
  end,
  response = function(res, req)
    local doc = json.decode(res.body)
    return { status = 200, headers = { ["content-type"] = "text/plain" },
             body = table.concat({ leaked or "nil", req.uri,
                                   req.headers["x-stage"] or "nil",
                                   doc.uri, doc.headers["x-stage"] }, "|") }
  end,
}
EOF

$t->write_file('size.lua', <<'EOF');
return {
  response = function(res, req)
    return { status = res.status, headers = { ["x-size"] = #(res.body or "") },
             body = res.body }
  end,
}
EOF

$t->write_file('down.lua', <<'EOF');
return {
  response = function(res, req)
    return { status = 503, headers = { ["content-type"] = "text/plain" },
             body = "upstream said " .. res.status }
  end,
}
EOF

$t->write_file('reqerr.lua', <<'EOF');
return {
  request = function(req)
    if req.query.loop then while true do end end
    if req.query.bad then return 42 end
    error("request-hook-marker")
  end,
}
EOF

$t->write_file('resperr.lua', <<'EOF');
return {
  response = function(res, req)
    if req.query.loop then while true do end end
    if req.query.bad then return { status = 700 } end
    error("response-hook-marker")
  end,
}
EOF

$t->write_file('aeboth.lua', <<'EOF');
return {
  request = function(req)
    req.headers["x-seen-ae"] = req.headers["accept-encoding"] or "none"
    req.uri = "/echo/ae"
    return req
  end,
  response = function(res, req)
    return { status = 200,
             headers = { ["content-type"] = "application/json",
                         ["x-req-ae"] = req.headers["accept-encoding"]
                                        or "none" },
             body = res.body }
  end,
}
EOF

$t->write_file('count.lua', <<'EOF');
return {
  response = function(res, req) return res end,
}
EOF

# ---- upstream content ------------------------------------------------------

my $small = join('', map { chr(32 + $_ % 90) } 0 .. 60_000);
my $big = 'x' x 200_000;
my $huge = join('', map { sprintf("%07d\n", $_) } 1 .. 150_000);  # 1.2 MB
my $binary = join('', map { chr($_ % 256) } 0 .. 4095);

$t->write_file('html/files/small', $small);
$t->write_file('html/files/big', $big);
$t->write_file('html/files/huge', $huge);
$t->write_file('html/files/binary', $binary);
$t->write_file('html/files/empty', '');
$t->write_file('html/chunked/small', $small);
$t->write_file('html/chunked/big', $big);
$t->write_file('html/chunked/huge', $huge);

$t->conf(<<'EOF');
sbx_pool up size=2;
sbx_pool conn size=2;
sbx_pool cnt size=1 max_requests=2;

sbx_connector upecho {
    script %%PREFIX%%/upecho.lua; capabilities json; pool up;
}
sbx_connector upslow {
    script %%PREFIX%%/upslow.lua; limits timeout=3s; pool up;
}
sbx_connector rewrite { script %%PREFIX%%/rewrite.lua; pool conn; }
sbx_connector short { script %%PREFIX%%/short.lua; pool conn; }
sbx_connector resp { script %%PREFIX%%/resp.lua; pool conn; }
sbx_connector cookie { script %%PREFIX%%/cookie.lua; pool conn; }
sbx_connector both { script %%PREFIX%%/both.lua; capabilities json; pool conn; }
sbx_connector size { script %%PREFIX%%/size.lua; pool conn; }
sbx_connector down { script %%PREFIX%%/down.lua; pool conn; }
sbx_connector reqerr {
    script %%PREFIX%%/reqerr.lua; limits timeout=200ms instructions=1000000000;
    pool conn;
}
sbx_connector resperr {
    script %%PREFIX%%/resperr.lua; limits timeout=200ms instructions=1000000000;
    pool conn;
}
sbx_connector count { script %%PREFIX%%/count.lua; pool cnt; }
sbx_connector ident { script %%PREFIX%%/count.lua; pool conn; }
sbx_connector aeboth {
    script %%PREFIX%%/aeboth.lua; capabilities json; pool conn;
}

upstream backend {
    server 127.0.0.1:%%PORT2%%;
    keepalive 4;
}

server {
    listen 127.0.0.1:%%PORT2%%;
    access_log %%PREFIX%%/upstream.log;
    root %%PREFIX%%/html;
    location /echo/ { sbx_connector upecho; }
    location /slow { sbx_connector upslow; }
    location /chunked/ { ssi on; ssi_types *; }
    location /slowfiles/ { alias %%PREFIX%%/html/files/; limit_rate 200k; }
    location /slowchunked/ {
        alias %%PREFIX%%/html/chunked/;
        ssi on;
        ssi_types *;
        limit_rate 200k;
    }
    location /files/ { }
    location /gz/ {
        alias %%PREFIX%%/html/files/;
        gzip on;
        gzip_types *;
        gzip_min_length 0;
    }
    location /fail { return 503 "upstream failure\n"; }
    location /notmod { return 304; }
    location /alwaysgz {
        add_header Content-Encoding gzip;
        return 200 "already encoded";
    }
    location /cc {
        add_header Cache-Control "max-age=60";
        return 200 "cached";
    }
    location /cookies {
        add_header Set-Cookie "a=1; Path=/";
        add_header Set-Cookie "b=2; Path=/";
        return 200 "cookies\n";
    }
}

server {
    listen 127.0.0.1:%%PORT%%;
    proxy_http_version 1.1;
    proxy_set_header Connection "";

    location /rw/      { sbx_connector rewrite; proxy_pass http://backend; }
    location /short/   { sbx_connector short; proxy_pass http://backend; }
    location /resp/    { sbx_connector resp; proxy_pass http://backend/; }
    location /cookie/  { sbx_connector cookie; proxy_pass http://backend/; }
    location /rlresp/  {
        sbx_connector resp;
        sbx_rate_limit key=$remote_addr rate=100r/m name=rlresp;
        proxy_pass http://backend/;
    }
    location /both/    { sbx_connector both; proxy_pass http://backend; }
    location /aeboth/  { sbx_connector aeboth; proxy_pass http://backend; }
    location /respgz/  {
        sbx_connector size;
        gzip on;
        gzip_types *;
        gzip_min_length 0;
        proxy_pass http://backend/;
    }
    location /size/    {
        sbx_connector size;
        sbx_response_buffer 100k;
        proxy_pass http://backend/;
    }
    location /sizenb/  {
        sbx_connector size;
        sbx_response_buffer 100k;
        proxy_buffering off;
        proxy_pass http://backend/;
    }
    location /plain/   { proxy_pass http://backend/; }

    # "return res": nginx's filters must see the headers the script keeps
    location /ident/   {
        sbx_connector ident;
        sbx_response_buffer 1k;
        proxy_pass http://backend/;
    }
    location /identgz/ {
        sbx_connector ident;
        gzip on;
        gzip_types *;
        gzip_min_length 0;
        proxy_pass http://backend/;
    }
    location /identexp/ {
        sbx_connector ident;
        expires 1h;
        proxy_pass http://backend/;
    }
    location /pass/    { sbx_connector rewrite; proxy_pass http://backend/; }
    location /nohook/  { sbx_connector count; proxy_pass http://backend/; }
    location /down/ {
        sbx_connector down;
        proxy_pass http://127.0.0.1:%%PORT3%%;
    }
    location /downraw/ {
        sbx_connector rewrite;
        proxy_pass http://127.0.0.1:%%PORT3%%;
    }
    location /slowup/  {
        sbx_connector down;
        proxy_read_timeout 300ms;
        proxy_pass http://backend/slow;
    }
    location /reqerr/  { sbx_connector reqerr; proxy_pass http://backend; }
    location /resperr/ { sbx_connector resperr; proxy_pass http://backend/; }
}
EOF

$t->start;

my $json = JSON::PP->new;
sub doc { my ($r) = @_; return eval { $json->decode($r->{content}) } // {} }

sub upstream_hits {
    my ($re) = @_;
    my $log = $t->read_file('upstream.log') // '';
    return scalar grep { /$re/ } split /\n/, $log;
}

# ---- request hook: rewrite -------------------------------------------------

my $r = $t->post('/rw/path?a=1', 'hello body',
                 { headers => { 'X-Remove' => 'gone', 'X-Keep' => 'kept',
                                'Content-Type' => 'text/plain' } });
is($r->{status}, 200, 'rewrite: 200 from the upstream');
is($r->{headers}{'x-upstream'}, 'echo', 'rewrite: the upstream answered');
my $e = doc($r);
is($e->{uri}, '/echo/path', 'rewrite: upstream sees the new uri');
is($e->{args}, 'a=1&added=1', 'rewrite: upstream sees the new args');
is($e->{body}, '<HELLO BODY>', 'rewrite: upstream sees the new body');
is($e->{headers}{'content-length'}, length('<HELLO BODY>'),
   'rewrite: Content-Length matches the new body');
is($e->{headers}{'x-added'}, 'yes', 'rewrite: added header');
is($e->{headers}{'x-mixed-case'}, 'Mixed', 'rewrite: added mixed-case header');
ok(!exists $e->{headers}{'x-remove'}, 'rewrite: removed header is gone');
is($e->{headers}{'x-keep'}, 'kept', 'rewrite: other headers kept');
is($e->{headers}{'content-type'}, 'text/plain', 'rewrite: content-type kept');
is($e->{method}, 'POST', 'rewrite: method kept');

$r = $t->get('/rw/nobody');
$e = doc($r);
is($e->{uri}, '/echo/nobody', 'rewrite GET: uri');
is($e->{args}, 'added=1', 'rewrite GET: args from nothing');
ok(!defined $e->{body}, 'rewrite GET: no body upstream');
ok(!exists $e->{headers}{'content-length'}, 'rewrite GET: no Content-Length');

$r = $t->get('/rw/a%20b');
is($r->{status}, 200, 'rewrite: an encoded space in the path is fine');
is(doc($r)->{uri}, '/echo/a b', 'and reaches the upstream escaped again');
$r = $t->get('/rw/a%0Ab');
$t->error_ok($r, 500, 'transform_error',
             'rewrite: a path decoding to a control character is refused');

$r = $t->post('/rw/e?body=empty', 'something');
$e = doc($r);
is($e->{headers}{'content-length'}, '0', 'empty body: Content-Length 0');
ok(!defined $e->{body} || $e->{body} eq '', 'empty body: nothing upstream');

$r = $t->post('/rw/n?body=none', 'something');
$e = doc($r);
ok(!exists $e->{headers}{'content-length'}, 'body nil: no Content-Length');
ok(!defined $e->{body}, 'body nil: no body upstream');

# chunked client body
my $raw = $t->raw_request(
    "POST /rw/chunked HTTP/1.1\r\nHost: localhost\r\n"
  . "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
  . "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n");
my ($rbody) = ($raw // '') =~ /\r\n\r\n(.*)\z/s;
$e = eval { $json->decode($rbody // '') } // {};
is($e->{body}, '<HELLO WORLD>', 'chunked input: upstream sees the new body');
is($e->{headers}{'content-length'}, 13, 'chunked input: Content-Length set');
ok(!exists $e->{headers}{'transfer-encoding'},
   'chunked input: no Transfer-Encoding upstream');

# a large body through the request hook
$r = $t->post('/rw/large', 'b' x 300_000);
$e = doc($r);
is(length($e->{body} // ''), 300_002, 'large body rewritten and forwarded');

# ---- short-circuit ---------------------------------------------------------

my $before = upstream_hits(qr{/short/});
$r = $t->get('/short/x');
is($r->{status}, 403, 'short-circuit: status from the script');
is($r->{content}, "denied by connector\n", 'short-circuit: body');
is($r->{headers}{'x-short'}, '1', 'short-circuit: header');
$r = $t->get('/short/x?pass=1');
is($r->{status}, 404, 'short-circuit: request passed on reaches the upstream');
sleep 0.2;
is(upstream_hits(qr{/short/x }), 0, 'short-circuit: upstream never contacted')
    ;
is(upstream_hits(qr{/short/x\?pass=1 }), 1, 'passed request: upstream hit');

# ---- response hook ---------------------------------------------------------

$r = $t->get('/resp/files/small');
is($r->{status}, 201, 'response hook: status changed');
is($r->{headers}{'x-resp'}, 'yes', 'response hook: header added');
is($r->{headers}{'x-req-uri'}, '/resp/files/small',
   'response hook: req.uri as the client sent it');
like($r->{headers}{'x-orig-type'} // '', qr/^application\/octet-stream|^text/,
     'response hook: res.headers has content-type');
is($r->{content}, 'wrapped:' . length($small) . ':' . $small,
   'response hook: body rewritten, upstream body complete');
is($r->{headers}{'content-length'}, length($r->{content}),
   'response hook: Content-Length recomputed');
isnt($r->{headers}{'connection'} // '', 'close-me',
     'response hook: hop-by-hop header from the script dropped');
ok(!defined $r->{headers}{'transfer-encoding'}
   || $r->{headers}{'transfer-encoding'} ne 'bogus',
   'response hook: transfer-encoding from the script dropped');

$r = $t->get('/resp/chunked/small');
is($r->{content}, 'wrapped:' . length($small) . ':' . $small,
   'response hook: chunked upstream answer buffered whole');

# 200 kB: more than the proxy buffers hold, so part of it went through a
# temporary file; the hook still gets it whole, in memory
$r = $t->get('/resp/files/big');
is($r->{content}, 'wrapped:200000:' . $big,
   'response hook: answer larger than the proxy buffers');

# with a response hook the upstream is asked for an uncompressed answer:
# the client's Accept-Encoding stays out of the request it gets
my %gz = (headers => { 'Accept-Encoding' => 'gzip' });
$r = $t->get('/plain/gz/small', \%gz);
is($r->{headers}{'content-encoding'}, 'gzip',
   'without the module the upstream compresses for this client');
$r = $t->get('/resp/gz/small', \%gz);
is($r->{content}, 'wrapped:' . length($small) . ':' . $small,
   'response hook: the upstream answers uncompressed, the script reads text');
ok(!$r->{headers}{'content-encoding'}, 'and the answer is not marked gzip');

$r = $t->get('/aeboth/x', \%gz);
my $ae = doc($r);
is($ae->{headers}{'x-seen-ae'}, 'gzip',
   'both hooks: the request hook sees the client\'s Accept-Encoding');
ok(!exists $ae->{headers}{'accept-encoding'},
   'both hooks: the upstream gets no Accept-Encoding');
is($r->{headers}{'x-req-ae'}, 'none',
   'both hooks: req in the response hook is what the upstream got');

# the client's Accept-Encoding still counts for the answer it gets
$r = $t->get('/respgz/files/small', \%gz);
is($r->{headers}{'content-encoding'}, 'gzip',
   'gzip on: the script\'s answer is compressed for the client');
{
    my $plain;
    IO::Uncompress::Gunzip::gunzip(\$r->{content}, \$plain);
    is($plain // '', $small, 'gzip on: it decompresses to the script\'s answer');
    is($r->{headers}{'x-size'}, length($small),
       'gzip on: the script got the upstream body uncompressed');
}

$r = $t->get('/resp/files/binary');
is($r->{content}, 'wrapped:4096:' . $binary, 'response hook: binary body');

$r = $t->get('/resp/files/empty');
is($r->{content}, 'wrapped:0:', 'response hook: empty upstream body is ""');

$r = $t->get('/resp/fail');
is($r->{status}, 503, 'response hook: upstream 5xx reaches the script');
is($r->{content}, "wrapped:17:upstream failure\n", 'upstream 5xx body');

$r = $t->get('/resp/files/nonexistent');
is($r->{status}, 404, 'response hook: upstream 404 status');

$r = $t->request('HEAD', '/resp/files/small');
is($r->{status}, 201, 'HEAD: status from the response hook');
is($r->{content} // '', '', 'HEAD: no body');

# HEAD, 304: no body to buffer, measure or cap
$r = $t->request('HEAD', '/ident/files/small');
is($r->{status}, 200, 'HEAD of a 60 kB answer under a 1k buffer: 200, '
   . 'not 502 (no body comes)');
ok(!defined $r->{headers}{'content-length'}
   || $r->{headers}{'content-length'} eq length($small),
   'HEAD: no Content-Length: 0 (the GET length is unknown after the hook)')
    or diag("content-length: $r->{headers}{'content-length'}");
$r = $t->get('/ident/notmod');
is($r->{status}, 304, 'upstream 304 through the response hook');
ok(!defined $r->{headers}{'content-length'}, '304: no Content-Length');

# headers the script keeps are nginx's again: ETag for not_modified,
# Content-Encoding for gzip, Cache-Control for expires
$r = $t->get('/identgz/files/binary');
my $etag = $r->{headers}{etag};
ok(defined $etag, 'the upstream ETag comes through the hook');
$r = $t->get('/identgz/files/binary',
             { headers => { 'If-None-Match' => $etag // 'none' } });
is($r->{status}, 304, 'If-None-Match with that ETag: 304 from nginx');
$r = $t->get('/identgz/alwaysgz', { headers => { 'Accept-Encoding' => 'gzip' } });
my $ce = $r->{headers}{'content-encoding'};
is(ref $ce ? scalar @$ce : 1, 1, 'gzip on: one Content-Encoding, not two');
is($r->{content}, 'already encoded', 'gzip on: not compressed again');
$r = $t->get('/identexp/cc');
my $cc = $r->{headers}{'cache-control'};
is(ref $cc ? join('|', @$cc) : $cc, 'max-age=3600',
   'expires: replaces the Cache-Control the script kept, not a second one');

# the script has only a response hook: no helper round trip for requests
my @cnt = $t->helper_pids;
my $log_len = length $t->error_log;
$r = $t->get('/nohook/files/small');
is($r->{status}, 200, 'response-only script: passes');
is($r->{content}, $small, 'response-only script: body untouched');
sleep 0.3;
unlike(substr($t->error_log, $log_len), qr/pool "cnt" recycled/,
       'response-only script: one call per request (no request-hook call)');
$r = $t->get('/nohook/files/small');
ok($t->wait_for(sub { substr($t->error_log, $log_len)
                      =~ /pool "cnt" recycled after 2/ }, 5),
   'second request: the helper served exactly two calls');

# ---- no response hook: streamed untouched ----------------------------------

$r = $t->get('/pass/files/huge');
is($r->{status}, 200, 'no response hook: 200');
ok($r->{content} eq $huge, 'no response hook: 1.2 MB body untouched')
    or diag('length ' . length($r->{content}));
$r = $t->get('/pass/chunked/big');
ok($r->{content} eq $big, 'no response hook: chunked body untouched');

# ---- sbx_response_buffer ---------------------------------------------------

$r = $t->get('/size/files/small');
is($r->{status}, 200, 'under the cap: 200');
is($r->{headers}{'x-size'}, length($small), 'under the cap: whole body seen');
is($r->{content}, $small, 'under the cap: body');

$log_len = length $t->error_log;
$r = $t->get('/size/files/big');
$t->error_ok($r, 502, 'transform_error', 'over the cap (Content-Length): 502');
$r = $t->get('/size/chunked/big');
$t->error_ok($r, 502, 'transform_error', 'over the cap (chunked): 502');
like(substr($t->error_log, $log_len), qr/exceeds sbx_response_buffer/,
     'over the cap: logged');
$r = $t->get('/size/files/small');
is($r->{status}, 200, 'after overflow: next request fine');

# default cap is 1m
$r = $t->get('/resp/files/huge');
$t->error_ok($r, 502, 'transform_error', 'over the default 1m cap: 502');

# an answer over the cap is not read to its end: the upstream (sending the
# 1.2 MB file at 200 kB/s, 6 s) is closed as soon as the cap is passed
{
    use Time::HiRes ();
    my $t0 = Time::HiRes::time();
    $r = $t->get('/size/slowfiles/huge');
    my $took = Time::HiRes::time() - $t0;
    $t->error_ok($r, 502, 'transform_error',
                 'slow upstream over the cap (Content-Length): 502');
    cmp_ok($took, '<', 2, sprintf('at once, from its header (%.2fs, the '
                                  . 'whole answer takes 6 s)', $took));
    $t0 = Time::HiRes::time();
    $r = $t->get('/size/slowchunked/huge');
    $took = Time::HiRes::time() - $t0;
    $t->error_ok($r, 502, 'transform_error',
                 'slow upstream over the cap (chunked): 502');
    cmp_ok($took, '<', 3, sprintf('once 100k have come (%.2fs, the whole '
                                  . 'answer takes 6 s)', $took));
    # the upstream logs what it sent when it notices the closed connection
    my @sent;
    ok($t->wait_for(sub {
        my $log = $t->read_file('upstream.log') // '';
        @sent = $log =~ m{"GET /slow(?:files|chunked)/huge[^"]*" 200 (\d+)}g;
        @sent == 2;
    }, 5), 'the upstream logged both requests')
        or diag($t->read_file('upstream.log'));
    ok(!grep({ $_ >= length $huge } @sent),
       "the upstream could not send the whole answer (sent: @sent)");
    is($t->get('/size/files/small')->{status}, 200,
       'after the early close: the next request is fine');

    $t0 = Time::HiRes::time();
    $r = $t->get('/sizenb/slowchunked/huge');
    $took = Time::HiRes::time() - $t0;
    $t->error_ok($r, 502, 'transform_error',
                 'proxy_buffering off, over the cap: 502');
    cmp_ok($took, '<', 3, sprintf('proxy_buffering off: early too (%.2fs)',
                                  $took));
    is($t->get('/sizenb/files/small')->{status}, 200,
       'proxy_buffering off: the next request is fine');
}

# ---- upstream down and slow ------------------------------------------------

$r = $t->get('/downraw/x');
is($r->{status}, 502, 'upstream down, no response hook: nginx 502');
like($r->{content}, qr/502 Bad Gateway/, 'upstream down: nginx error page');

$r = $t->get('/down/x');
is($r->{status}, 503, 'upstream down, response hook decides');
is($r->{content}, 'upstream said 502', 'response hook sees 502');

$r = $t->get('/slowup/');
is($r->{status}, 503, 'upstream timeout, response hook decides');
is($r->{content}, 'upstream said 504', 'response hook sees 504');

# ---- both hooks: isolation -------------------------------------------------

$r = $t->get('/both/x');
is($r->{status}, 200, 'both hooks: 200');
is($r->{content}, 'nil|/echo/both|request|/echo/both|request',
   'both hooks: request-hook global not visible, req is what upstream got');

# ---- failures --------------------------------------------------------------

$log_len = length $t->error_log;
$r = $t->get('/reqerr/x');
$t->error_ok($r, 500, 'transform_error', 'request hook error: 500');
$r = $t->get('/reqerr/x?bad=1');
$t->error_ok($r, 500, 'transform_error', 'request hook bad return: 500');
$r = $t->get('/reqerr/x?loop=1');
$t->error_ok($r, 504, 'transform_timeout', 'request hook timeout: 504');
is(upstream_hits(qr{/reqerr/}), 0,
   'failed request hook: upstream not contacted');

$r = $t->get('/resperr/files/small');
$t->error_ok($r, 500, 'transform_error', 'response hook error: 500');
$r = $t->get('/resperr/files/small?bad=1');
$t->error_ok($r, 500, 'transform_error', 'response hook bad return: 500');
$r = $t->get('/resperr/files/small?loop=1');
$t->error_ok($r, 504, 'transform_timeout', 'response hook timeout: 504');

my $log = substr($t->error_log, $log_len);
like($log, qr/request hook.*request-hook-marker/, 'request hook error logged');
like($log, qr/response hook.*response-hook-marker/,
     'response hook error logged');

# ---- keepalive to the upstream, many requests ------------------------------

my $ok = 0;
for my $i (1 .. 20) {
    $r = $t->get("/rw/k$i");
    $ok++ if doc($r)->{uri} && doc($r)->{uri} eq "/echo/k$i";
}
is($ok, 20, 'keepalive upstream: 20 rewritten requests');

# repeated Set-Cookie fields reach the script as an array and go out apart
$r = $t->get('/cookie/cookies');
is($r->{status}, 200, 'set-cookie: 200');
is($r->{headers}{'x-cookie-type'}, 'table',
   'res.headers["set-cookie"] is an array');
is_deeply($r->{headers}{'set-cookie'}, ['a=1; Path=/', 'b=2; Path=/'],
          'both Set-Cookie fields are sent, unmerged');

# the rate limiter's fields survive the response hook's answer, once
$r = $t->get('/rlresp/files/small');
is($r->{status}, 201, 'rate-limited route with a response hook: its answer');
like($r->{headers}{'ratelimit-policy'} // '', qr/^"rlresp";q=100;w=60$/,
     'RateLimit-Policy on the response hook\'s answer');
like($r->{headers}{'ratelimit'} // '', qr/^"rlresp";r=\d+;t=\d+$/,
     'RateLimit on the response hook\'s answer, exactly once');

# a plain proxy location is untouched by the module
$r = $t->get('/plain/files/small');
is($r->{content}, $small, 'plain proxy_pass unaffected');

$t->check_error_log;

done_testing;
