#!/usr/bin/perl
# Unit tests of the frame codec (t/unit/proto_test.c), built with the
# same warnings as the helper and run here; the program prints TAP.

use strict;
use warnings;

use File::Temp qw(tempdir);
use FindBin;

my $root = "$FindBin::Bin/..";
my $dir = tempdir('sbx-unit-XXXXXXXX', TMPDIR => 1, CLEANUP => 1);
my $cc = $ENV{CC} // 'cc';
my $flags = $ENV{SBX_UNIT_CFLAGS} // '-O1 -g';

my @cmd = ($cc, split(' ', $flags), qw(-std=gnu11 -Wall -Wextra -Werror),
           "-I$root/lua-runtime", '-o', "$dir/proto_test",
           "$root/t/unit/proto_test.c", "$root/lua-runtime/sbx_proto.c");

if (system(@cmd) != 0) {
    print "1..1\nnot ok 1 - build the codec unit tests (@cmd)\n";
    exit 1;
}

my $out = `$dir/proto_test`;
my $rc = $? >> 8;
print $out;
exit $rc;
