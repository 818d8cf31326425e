#!/usr/bin/perl
# sbx-lua-helper --self-test: the seccomp filter kills every forbidden call
# and lets the serving loop's calls through; `check` reports FILE:LINE.

use strict;
use warnings;

use lib 't/lib';
use SbxTest;
use Test::More;

my $t = SbxTest->new;
my $helper = SbxTest::helper_bin();

ok(-x $helper, "helper binary exists ($helper)");

my ($rc, $out) = $t->run_cmd([ $helper, '--self-test' ], timeout => 60);
is($rc, 0, '--self-test exits 0') or diag($out);

my @lines = grep { length } split /\n/, $out;
my ($plan) = map { /^1\.\.(\d+)$/ ? $1 : () } @lines;
my @ok = grep { /^ok \d+/ } @lines;
my @not_ok = grep { /^not ok/ } @lines;
my @other = grep { !/^(?:ok \d+|1\.\.\d+$|#)/ } @lines;

ok(defined $plan && $plan > 0, 'self-test prints a plan') or diag($out);
is(scalar @not_ok, 0, 'no "not ok" line') or diag(join "\n", @not_ok);
is(scalar @other, 0, 'every line is ok, the plan or a comment')
    or diag(join "\n", @other);
is(scalar @ok, $plan // -1, 'as many ok lines as planned');
ok(grep({ /open/ } @ok), 'self-test covers open');
ok(grep({ /execve|exec/ } @ok), 'self-test covers execve');
ok(grep({ /socket|connect/ } @ok), 'self-test covers sockets');

# check: FILE:LINE: message, exit 1 on problems, 0 when clean
my $good = $t->write_file('good.lua',
    "return function(req) return {status = 200, body = 'x'} end\n");
my $bad = $t->write_file('bad.lua',
    "return function(req)\n  local x = io.open('/etc/passwd')\n"
    . "  return {status = 200}\nend\n");
my $syntax = $t->write_file('syntax.lua', "local a = = 1\n");

($rc, $out) = $t->run_cmd([ $helper, 'check', $good ], timeout => 20);
is($rc, 0, 'check: a clean script exits 0') or diag($out);

($rc, $out) = $t->run_cmd([ $helper, 'check', $bad ], timeout => 20);
is($rc, 1, 'check: a script reading io exits 1');
like($out, qr/^\Q$bad\E:2: .*\bio\b/m, 'check: FILE:LINE: message for io');

($rc, $out) = $t->run_cmd([ $helper, 'check', $syntax ], timeout => 20);
is($rc, 1, 'check: a syntax error exits 1');
like($out, qr/^\Q$syntax\E:1: /m, 'check: FILE:LINE: for a syntax error');

my $json = $t->write_file('json.lua',
    "return function(req) return {status = 200, body = json.encode({})} end\n");
($rc, $out) = $t->run_cmd([ $helper, 'check', $json, '--capabilities', 'json' ],
                          timeout => 20);
is($rc, 0, 'check: json allowed with --capabilities json') or diag($out);
($rc, $out) = $t->run_cmd([ $helper, 'check', $json ], timeout => 20);
is($rc, 1, 'check: json refused without the capability');

($rc, $out) = $t->run_cmd([ $helper ], timeout => 20);
is($rc, 2, 'no arguments: usage, exit 2');

done_testing;
