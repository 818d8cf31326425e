/*
 * sbx_cli.h: the connector authors' commands (check, run) of
 * sbx-lua-helper and what they share.
 */

#ifndef SBX_CLI_H
#define SBX_CLI_H

#include <stddef.h>

#include "sbx_engine.h"


int sbx_run(int argc, char **argv);

/* sbx_read_file(): -1, or this when the file is larger than `max` */
#define SBX_FILE_TOO_LARGE  (-2)

int sbx_read_file(const char *path, char **data, size_t *len, size_t max,
    char *err, size_t errlen);
int sbx_parse_limits(const char *list, sbx_script_t *s, char *err,
    size_t errlen);
void sbx_clean_environment(void);


#endif /* SBX_CLI_H */
