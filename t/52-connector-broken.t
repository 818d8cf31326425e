#!/usr/bin/perl
# Connector mode against an upstream that breaks off its answer: it sends
# the header and part of the body, then closes the connection or stalls.
# With a response hook the client gets 502 transform_error at once (or when
# proxy_read_timeout fires), never a hang and never a truncated body; the
# error log says why.  Without a response hook the answer streams as nginx
# streams it.  The upstream is a raw TCP server of this test.

use strict;
use warnings;

use lib 't/lib';
use SbxTest;
use Test::More;
use Time::HiRes qw(sleep time);

my $t = SbxTest->new;

# the upstream: /short sends 10 of 1000 bytes and closes; /chunked sends
# one chunk and closes; /stall sends 10 bytes and waits 5 s; /whole answers
# properly
my ($uport, $upid) = SbxTest::raw_server(sub {
    my ($c, $line) = @_;
    my ($path) = $line =~ m{^\w+ (\S+)};
    $path //= '';
    if ($path =~ m{/short}) {
        print {$c} "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                 . "Content-Length: 1000\r\n\r\nshort body";
    } elsif ($path =~ m{/chunked}) {
        print {$c} "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                 . "Transfer-Encoding: chunked\r\n\r\n"
                 . "a\r\nfirst part\r\n";
    } elsif ($path =~ m{/stall}) {
        print {$c} "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                 . "Content-Length: 1000\r\n\r\nshort body";
        sleep 5;
    } else {
        print {$c} "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                 . "Content-Length: 5\r\nConnection: close\r\n\r\nwhole";
    }
});

$t->write_file('wrap.lua', <<'EOF');
return {
  response = function(res, req)
    return { status = res.status, headers = { ["content-type"] = "text/plain" },
             body = "wrapped:" .. res.body }
  end,
}
EOF
$t->write_file('pass.lua', <<'EOF');
return { request = function(req) return req end }
EOF

$t->conf(<<"EOF");
sbx_connector wrap { script %%PREFIX%%/wrap.lua; }
sbx_connector pass { script %%PREFIX%%/pass.lua; }
server {
    listen 127.0.0.1:%%PORT%%;
    proxy_read_timeout 1s;
    location /wrap/ {
        sbx_connector wrap;
        proxy_pass http://127.0.0.1:$uport/;
    }
    location /wrapnb/ {
        sbx_connector wrap;
        proxy_buffering off;
        proxy_pass http://127.0.0.1:$uport/;
    }
    location /pass/ {
        sbx_connector pass;
        proxy_pass http://127.0.0.1:$uport/;
    }
}
EOF
$t->start;

sub timed_get {
    my ($path) = @_;
    my $t0 = time;
    my $r = $t->get($path, { timeout => 20 });
    return ($r, time - $t0);
}

my ($r, $took) = timed_get('/wrap/whole');
is($r->{status}, 200, 'a whole answer: the hook runs');
is($r->{content}, 'wrapped:whole', 'with the whole body');

for my $loc (qw(wrap wrapnb)) {
    my $log_len = length $t->error_log;

    ($r, $took) = timed_get("/$loc/short");
    $t->error_ok($r, 502, 'transform_error',
                 "$loc: upstream closes after 10 of 1000 bytes → 502");
    cmp_ok($took, '<', 1, sprintf("$loc: at once (%.2fs)", $took));

    ($r, $took) = timed_get("/$loc/chunked");
    $t->error_ok($r, 502, 'transform_error',
                 "$loc: upstream closes in the middle of its chunks → 502");
    cmp_ok($took, '<', 1, sprintf("$loc: at once (%.2fs)", $took));

    ($r, $took) = timed_get("/$loc/stall");
    $t->error_ok($r, 502, 'transform_error',
                 "$loc: upstream stalls mid-answer → 502");
    cmp_ok($took, '<', 3,
           sprintf("$loc: when proxy_read_timeout (1s) fires (%.2fs)", $took));

    like(substr($t->error_log, $log_len),
         qr/sbx: connector "wrap": the upstream's answer broke off after 10 bytes/,
         "$loc: the error log says why");
    unlike($r->{content}, qr/short body/, "$loc: no part of the answer leaks");

    ($r, $took) = timed_get("/$loc/whole");
    is($r->{content}, 'wrapped:whole', "$loc: the next request is fine");
}

# without a response hook nginx streams what came, then closes
($r, $took) = timed_get('/pass/short');
cmp_ok($took, '<', 1, 'no response hook: the broken answer ends at once');
like($r->{content} // '', qr/short body|Unexpected end/,
     'no response hook: the client got what the upstream sent, as from nginx');

SbxTest::raw_server_stop($upid);

$t->stop;
$t->check_error_log;

done_testing;
