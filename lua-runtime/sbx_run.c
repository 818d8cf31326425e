/*
 * sbx_run.c: sbx-lua-helper run (local runner for connector authors).
 */

#include <stdio.h>

#include "sbx_cli.h"


int
sbx_run(int argc, char **argv)
{
    (void) argc;
    (void) argv;

    fprintf(stderr, "sbx-lua-helper: run is not available in this build\n");
    return 2;
}
