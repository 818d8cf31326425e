#!/usr/bin/perl
# Content mode: the request hook's {status=, headers=, body=} is the answer;
# the req table the script sees; validation of what it returns; script errors.

use strict;
use warnings;

use lib 't/lib';
use JSON::PP;
use SbxTest;
use Test::More;

my $t = SbxTest->new;
my $json = JSON::PP->new->canonical;

$t->write_file('transform.lua', <<'EOF');
-- turns {"full_name": "..."} into {"first_name": ..., "last_name": ...}
return {
  request = function(req)
    local input = json.decode(req.body)
    local first, last = input.full_name:match("^(%S+)%s+(.+)$")
    return {
      status = 201,
      headers = { ["Content-Type"] = "application/json",
                  ["X-Transformed-By"] = req.connector },
      body = json.encode({ first_name = first, last_name = last }),
    }
  end,
}
EOF

$t->write_file('echo.lua', <<'EOF');
return function(req)
  local out = {
    method = req.method, uri = req.uri, args = req.args, query = req.query,
    headers = req.headers, body = req.body, id = req.id,
    connector = req.connector, client_ip = req.client and req.client.ip,
    body_type = type(req.body),
  }
  return { status = 200, headers = { ["content-type"] = "application/json" },
           body = json.encode(out) }
end
EOF

$t->write_file('teapot.lua', <<'EOF');
return function(req)
  return {
    status = 418,
    headers = { ["X-Brew"] = "earl grey", ["Cache-Control"] = "no-store",
                ["X-Multi"] = { "one", 2 }, ["Content-Length"] = "999",
                ["Connection"] = "close", ["X-Num"] = 7,
                ["Date"] = "Mon, 01 Jan 2001 00:00:00 GMT",
                ["Server"] = "teapot/1.0" },
    body = "short and stout\n",
  }
end
EOF

$t->write_file('bad-returns.lua', <<'EOF');
local cases = {
  string_status = function() return { status = "200", body = "x" } end,
  fractional    = function() return { status = 200.5, body = "x" } end,
  status_99     = function() return { status = 99, body = "x" } end,
  status_100    = function() return { status = 100, body = "x" } end,
  status_101    = function()
    return { status = 101, headers = { upgrade = "h2c" }, body = "x" }
  end,
  status_600    = function() return { status = 600, body = "x" } end,
  status_nan    = function() return { status = 0/0, body = "x" } end,
  header_space  = function()
    return { status = 200, headers = { ["bad name"] = "v" }, body = "x" }
  end,
  header_colon  = function()
    return { status = 200, headers = { ["x-a:b"] = "v" }, body = "x" }
  end,
  header_empty  = function()
    return { status = 200, headers = { [""] = "v" }, body = "x" }
  end,
  value_crlf    = function()
    return { status = 200, headers = { ["x-ok"] = "a\r\nSet-Cookie: evil=1" },
             body = "x" }
  end,
  value_lf      = function()
    return { status = 200, headers = { ["x-ok"] = "a\nb" }, body = "x" }
  end,
  value_cr      = function()
    return { status = 200, headers = { ["x-ok"] = "a\rb" }, body = "x" }
  end,
  value_nul     = function()
    return { status = 200, headers = { ["x-ok"] = "a\0b" }, body = "x" }
  end,
  value_map     = function()
    return { status = 200, headers = { ["x-ok"] = { a = { b = 1 } } },
             body = "x" }
  end,
  value_sparse  = function()
    return { status = 200, headers = { ["x-ok"] = { [1] = "a", [3] = "c" } },
             body = "x" }
  end,
  value_nan     = function()
    return { status = 200, headers = { ["x-ok"] = 0/0 }, body = "x" }
  end,
  value_inf     = function()
    return { status = 200, headers = { ["x-ok"] = { "a", 1/0 } }, body = "x" }
  end,
  value_numbers = function()
    return { status = 200, body = "numbers",
             headers = { ["x-big"] = 2^53, ["x-float"] = 1.5, ["x-int"] = 42,
                         ["x-list"] = { "a", 2.0 } } }
  end,
  not_table     = function() return "hello" end,
  number        = function() return 42 end,
  nothing       = function() return nil end,
  body_table    = function() return { status = 200, body = {} } end,
  with_metatable = function()
    return setmetatable({}, { __index = { status = 200, body = "x" } })
  end,
  ok            = function() return { status = 200, body = "fine" } end,
}
return function(req)
  return cases[req.query.case]()
end
EOF

# line 4 raises a string error, line 7 an arithmetic error on nil
$t->write_file('err.lua', <<'EOF');
return function(req)
  local secret = "SECRET-IN-SCRIPT-TEXT"
  if req.query.kind == "raise" then
    error("kaboom-marker")
  end
  local missing
  return { status = 200, body = missing + 1 }
end
EOF

$t->conf(<<'EOF');
sbx_connector transform {
    script %%PREFIX%%/transform.lua;
    capabilities json;
}
sbx_connector echo {
    script %%PREFIX%%/echo.lua;
    capabilities json;
}
sbx_connector teapot {
    script %%PREFIX%%/teapot.lua;
}
sbx_connector bad {
    script %%PREFIX%%/bad-returns.lua;
}
sbx_connector err {
    script %%PREFIX%%/err.lua;
}
server {
    listen 127.0.0.1:%%PORT%%;
    location /transform { sbx_connector transform; }
    location /echo      { sbx_connector echo; }
    location /teapot    { sbx_connector teapot; }
    location /bad       { sbx_connector bad; }
    location /err       { sbx_connector err; }
    location /plain     { return 200 "plain\n"; }
}
EOF

$t->start;

# --- happy path: JSON transform -------------------------------------------

my $r = $t->post('/transform', '{"full_name":"Ada Lovelace"}',
                 { headers => { 'Content-Type' => 'application/json' } });
is($r->{status}, 201, 'transform: status set by the script');
like($r->{headers}{'content-type'} // '', qr{^application/json},
     'transform: content-type set by the script');
is($r->{headers}{'x-transformed-by'}, 'transform',
   'transform: header set by the script (req.connector)');
my $doc = eval { decode_json($r->{content}) };
is_deeply($doc, { first_name => 'Ada', last_name => 'Lovelace' },
          'transform: body is the transformed JSON')
    or diag("body: $r->{content}");

$r = $t->get('/teapot');
is($r->{status}, 418, 'teapot: status');
is($r->{headers}{'x-brew'}, 'earl grey', 'teapot: custom header');
is($r->{headers}{'cache-control'}, 'no-store', 'teapot: second header');
is($r->{content}, "short and stout\n", 'teapot: body exactly');
is($r->{headers}{'content-length'}, 16, 'teapot: content-length from body');
is_deeply($r->{headers}{'x-multi'}, ['one', '2'],
   'teapot: an array value is one field line per element');
is($r->{headers}{'x-num'}, '7', 'teapot: a number value becomes a string');
my $raw = $t->raw_request("GET /teapot HTTP/1.1\r\nHost: x\r\n\r\n",
                          timeout => 1);
like($raw, qr/^connection:\s*keep-alive\r?$/mi,
       'teapot: hop-by-hop headers of the script are dropped');
my @dates = $raw =~ /^date:\s*(.*?)\r?$/mgi;
is(scalar @dates, 1, 'teapot: one Date field, nginx\'s');
unlike($dates[0] // '', qr/2001/, 'teapot: the script\'s Date is dropped');
my @servers = $raw =~ /^server:\s*(.*?)\r?$/mgi;
ok(!grep({ /teapot/ } @servers) && @servers <= 1,
   'teapot: the script\'s Server is dropped');

# --- the req table -----------------------------------------------------------

$r = $t->post('/echo/some/path?a=1&b=two&a=3&q=hello%20world', 'payload-bytes',
              { headers => { 'X-Custom-Header' => 'Foo-Value',
                             'Authorization' => 'Bearer tok' } });
is($r->{status}, 200, 'echo: 200');
my $e = eval { decode_json($r->{content}) } // {};
is($e->{method}, 'POST', 'req.method');
is($e->{uri}, '/echo/some/path', 'req.uri (no query string)');
is($e->{args}, 'a=1&b=two&a=3&q=hello%20world', 'req.args raw');
is_deeply($e->{query}{a}, [ '1', '3' ], 'req.query: repeated key is an array');
is($e->{query}{b}, 'two', 'req.query: single key is a string');
is($e->{query}{q}, 'hello world', 'req.query: values are decoded');
is($e->{headers}{'x-custom-header'}, 'Foo-Value', 'req.headers lower-case name');
is($e->{headers}{authorization}, 'Bearer tok', 'req.headers authorization');
ok(!grep({ /[A-Z]/ } keys %{ $e->{headers} // {} }),
   'req.headers has no upper-case names');
is($e->{headers}{host}, '127.0.0.1:' . $t->port, 'req.headers host');
is($e->{body}, 'payload-bytes', 'req.body');
like($e->{id} // '', qr/^\S{8,}$/, 'req.id is set');
is($e->{connector}, 'echo', 'req.connector');
is($e->{client_ip}, '127.0.0.1', 'req.client.ip');
my $id1 = $e->{id} // '';

$r = $t->get('/echo');
$e = eval { decode_json($r->{content}) } // {};
is($e->{method}, 'GET', 'GET: req.method');
is($e->{body_type}, 'nil', 'GET without body: req.body is nil');
isnt($e->{id} // '', $id1, 'req.id differs between requests');

# a large body reaches the script whole
my $big = 'B' x 200_000;
$r = $t->post('/echo', $big);
$e = eval { decode_json($r->{content}) } // {};
is(length($e->{body} // ''), 200_000, 'req.body of 200 kB arrives whole');

# --- invalid return values → 500 transform_error ---------------------------

for my $case (qw(string_status fractional status_99 status_100 status_101
                 status_600 status_nan
                 header_space header_colon header_empty value_crlf value_lf
                 value_cr value_nul value_map value_sparse value_nan
                 value_inf not_table number nothing body_table
                 with_metatable)) {
    $r = $t->get("/bad?case=$case");
    $t->error_ok($r, 500, 'transform_error', "invalid return '$case' → 500");
    ok(!exists $r->{headers}{'set-cookie'}, "$case: no injected header")
        if $case eq 'value_crlf';
}

$r = $t->get('/bad?case=value_numbers');
is($r->{status}, 200, 'numbers as header values: 200');
is($r->{headers}{'x-big'}, '9007199254740992',
   'a float with an integer value is sent as that integer');
is($r->{headers}{'x-float'}, '1.5', 'a float is sent as tostring() writes it');
is($r->{headers}{'x-int'}, '42', 'an integer is sent as is');
my $list = $r->{headers}{'x-list'};
is(join(',', ref $list ? @$list : $list), 'a,2',
   'an array gives one field line each');

$r = $t->get('/bad?case=ok');
is($r->{status}, 200, 'same connector still answers after invalid returns');
is($r->{content}, 'fine', 'and its body is right');

# --- script errors: 500, error log has file:line, body has nothing --------

my $errlua = $t->prefix . '/err.lua';
my $log_before = length $t->error_log;
$r = $t->get('/err?kind=raise');
my $rid = $t->error_ok($r, 500, 'transform_error', 'error() → 500 transform_error');
unlike($r->{content}, qr/kaboom|err\.lua|SECRET|traceback|\.lua/i,
       'error body carries no message, path or script text');

$r = $t->get('/err?kind=nil');
$t->error_ok($r, 500, 'transform_error', 'nil arithmetic → 500 transform_error');
unlike($r->{content}, qr/err\.lua|arith|nil|traceback/i,
       'error body carries no message or path');

ok($t->wait_for(sub { substr($t->error_log, $log_before) =~ /err\.lua:7:/ }, 5),
   'error log names err.lua:7 for the runtime error');
my $log = substr($t->error_log, $log_before);
like($log, qr/\Q$errlua\E:4:.*kaboom-marker|err\.lua:4:.*kaboom-marker/,
     'error log has the script file:line and message of error()');
like($log, qr/\[error\].*err\.lua:4:/, 'script errors are logged at error level');
if (defined $rid) {
    like($log, qr/\Q$rid\E/, 'error log line carries the request id');
}
unlike($log, qr/SECRET-IN-SCRIPT-TEXT/, 'error log does not dump script text');

# unrelated locations untouched
$r = $t->get('/plain');
is($r->{content}, "plain\n", 'non-connector location unaffected');

$t->stop;
$t->check_error_log;

done_testing;
