#!/usr/bin/perl
# A WebSocket-style handshake (Upgrade, 101 Switching Protocols, then a
# byte tunnel) through connector routes: a request hook may check and
# change the request (it cannot set Upgrade itself, the client's stays),
# and a response hook lets a 101 through untouched, since there is no
# answer to transform.  The upstream is a raw TCP server of this test that
# echoes lines once upgraded.

use strict;
use warnings;

use lib 't/lib';
use IO::Socket::INET;
use IO::Select;
use SbxTest;
use Test::More;

my $t = SbxTest->new;

my ($uport, $upid) = SbxTest::raw_server(sub {
    my ($c, $line, $h) = @_;
    if (($h->{upgrade} // '') ne 'websocket') {
        print {$c} "HTTP/1.1 400 Bad Request\r\nContent-Length: 11\r\n"
                 . "Connection: close\r\n\r\nno upgrade\n";
        return;
    }
    print {$c} "HTTP/1.1 101 Switching Protocols\r\n"
             . "Upgrade: websocket\r\nConnection: Upgrade\r\n"
             . "X-Auth-Seen: " . ($h->{'x-auth'} // 'none') . "\r\n\r\n";
    while (my $l = <$c>) {
        print {$c} "echo:$l";
    }
});

$t->write_file('auth.lua', <<'EOF');
return {
  request = function(req)
    if req.headers["x-token"] ~= "good" then
      return { status = 403, body = "no token\n" }
    end
    req.headers["x-auth"] = "checked"
    req.headers["upgrade"] = "something-else"   -- dropped: the client's stays
    return req
  end,
}
EOF
$t->write_file('both.lua', <<'EOF');
return {
  request = function(req) req.headers["x-auth"] = "both"; return req end,
  response = function(res, req)
    return { status = res.status, body = "wrapped:" .. res.body }
  end,
}
EOF

$t->conf(<<"EOF");
sbx_connector auth { script %%PREFIX%%/auth.lua; }
sbx_connector both { script %%PREFIX%%/both.lua; }
server {
    listen 127.0.0.1:%%PORT%%;
    proxy_http_version 1.1;
    proxy_set_header Upgrade \$http_upgrade;
    proxy_set_header Connection "upgrade";
    proxy_read_timeout 5s;
    location /ws/   { sbx_connector auth; proxy_pass http://127.0.0.1:$uport/; }
    location /both/ { sbx_connector both; proxy_pass http://127.0.0.1:$uport/; }
}
EOF
$t->start;

# handshake, then one line through the tunnel; returns (status line,
# headers text, echoed line)
sub ws {
    my ($path, %hdr) = @_;
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
                                  PeerPort => $t->port) or die "connect: $!";
    $s->autoflush(1);
    my $extra = join '', map { "$_: $hdr{$_}\r\n" } sort keys %hdr;
    print {$s} "GET $path HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
             . "Connection: Upgrade\r\n$extra\r\n";
    my $sel = IO::Select->new($s);
    my ($status, $head) = ('', '');
    return ('', '', '') unless $sel->can_read(5);
    $status = <$s> // '';
    while (defined(my $l = <$s>)) {
        last if $l =~ /^\r?\n$/;
        $head .= $l;
    }
    my $echo = '';
    if ($status =~ / 101 /) {
        print {$s} "hello tunnel\n";
        $echo = <$s> // '' if $sel->can_read(5);
    }
    close $s;
    return ($status, $head, $echo);
}

my ($st, $head, $echo) = ws('/ws/chat', 'X-Token' => 'good');
like($st, qr{^HTTP/1\.1 101 }, 'request hook: the handshake goes through (101)');
like($head, qr/^X-Auth-Seen: checked\r?$/mi,
     'the upstream got the header the hook added');
is($echo, "echo:hello tunnel\n", 'the tunnel carries data both ways');

($st) = ws('/ws/chat', 'X-Token' => 'bad');
like($st, qr{^HTTP/1\.1 403 }, 'request hook: a refused handshake gets 403');

($st, $head, $echo) = ws('/both/chat');
like($st, qr{^HTTP/1\.1 101 }, 'response hook: a 101 passes untouched');
like($head, qr/^X-Auth-Seen: both\r?$/mi, 'after the request hook ran');
is($echo, "echo:hello tunnel\n", 'and the tunnel works');

# a plain request on the same route still goes through the response hook
my $r = $t->get('/both/plain');
is($r->{status}, 400, 'no upgrade: the upstream\'s status');
is($r->{content}, "wrapped:no upgrade\n", 'through the response hook');

SbxTest::raw_server_stop($upid);

$t->stop;
$t->check_error_log;

done_testing;
