#!/usr/bin/perl
# The log capability and print() through the gateway: lines land in nginx's
# error log at the script's level, tagged with the connector and the
# request id, with CR/LF escaped (no forged log lines), and bounded per
# request.

use strict;
use warnings;

use lib 't/lib';
use SbxTest;
use Test::More;

my $t = SbxTest->new;
$t->write_file('talk.lua', <<'EOF');
return function(req)
  if req.query.flood then
    for i = 1, 50 do log.info("flood line " .. i) end
    return { status = 200, body = req.id }
  end
  log.info("hello from info")
  log.warn("careful: warn")
  log.err("broken: err")
  log.info("two\r\n2026/01/01 00:00:00 [emerg] 1#1: forged line")
  print("printed", 42, nil)
  return { status = 200, body = req.id }
end
EOF
$t->conf(<<'EOF');
sbx_connector talk { script %%PREFIX%%/talk.lua; capabilities log; }
server {
    listen 127.0.0.1:%%PORT%%;
    location /talk { sbx_connector talk; }
}
EOF
$t->start;

my $r = $t->get('/talk');
is($r->{status}, 200, 'a logging script answers');
my $id = $r->{content};
like($id, qr/^[0-9a-f]{32}$/, 'and returns its request id');

my $log;
ok($t->wait_for(sub { $log = $t->error_log; $log =~ /\Q$id\E.*printed/ }, 5),
   'the lines reach the error log');

my @mine = grep { /\Q$id\E/ } split /\n/, $log;
like(join("\n", @mine), qr/\[info\].*connector "talk".*hello from info/,
     'log.info at info, tagged with the connector');
like(join("\n", @mine), qr/\[warn\].*careful: warn/, 'log.warn at warn');
like(join("\n", @mine), qr/\[error\].*broken: err/, 'log.err at error');
like(join("\n", @mine), qr/printed\t42\tnil|printed\\t42\\tnil/,
     'print() goes to the same log');
unlike($log, qr/^2026\/01\/01 00:00:00 \[emerg\]/m,
       'a CR/LF in a line cannot forge a log line');
like(join("\n", @mine), qr/two\\r\\n2026\/01\/01/,
     'CR and LF are escaped');

$r = $t->get('/talk?flood=1');
my $fid = $r->{content};
ok($t->wait_for(sub { $log = $t->error_log; $log =~ /\Q$fid\E/ }, 5),
   'flood: lines logged');
my $n = () = $log =~ /\Q$fid\E: script: flood line/g;
cmp_ok($n, '<=', 20, "flood: at most 20 lines of one request ($n)");
cmp_ok($n, '>=', 1, 'flood: the first lines are kept');
like($log, qr/\Q$fid\E: script: .*dropped/, 'flood: the drop is noted');
unlike($log, qr/malformed RESULT/, "the helper's answer stays well-formed");

$t->stop;
# the escaped line carries "[emerg]" as text, not as its level
$t->check_error_log(allow => [qr/script: two\\r\\n2026/]);
done_testing();
