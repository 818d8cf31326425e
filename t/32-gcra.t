#!/usr/bin/perl
# C unit tests of the GCRA arithmetic: builds t/unit/gcra_test.c with
# ngx_sbx_module/ngx_http_sbx_gcra.c and passes its TAP through.

use strict;
use warnings;

use lib 't/lib';
use SbxTest;
use File::Temp qw(tempdir);

my $root = SbxTest::root();
my $dir = tempdir('sbx-gcra-XXXXXXXX', TMPDIR => 1, CLEANUP => 1);
my $cc = $ENV{CC} // 'cc';

my $rc = system($cc, '-std=gnu11', '-Wall', '-Wextra', '-Werror', '-O2',
                "-I$root/ngx_sbx_module", '-o', "$dir/gcra_test",
                "$root/t/unit/gcra_test.c",
                "$root/ngx_sbx_module/ngx_http_sbx_gcra.c");
if ($rc != 0) {
    print "1..1\nnot ok 1 - gcra_test.c builds\n";
    exit 1;
}

$rc = system("$dir/gcra_test");
exit($rc == -1 ? 1 : $rc >> 8);
