/*
 * sbx_check.h: static checks of a compiled script (globals it reads).
 */

#ifndef SBX_CHECK_H
#define SBX_CHECK_H

#include <stddef.h>
#include <stdint.h>


/* set: 1 for an assignment; field: `os.execute` gives "os" and "execute" */
typedef void (*sbx_access_pt)(void *data, int set, const char *name,
    size_t len, const char *field, size_t flen, int line);

int sbx_check_dump(const uint8_t *dump, size_t len, sbx_access_pt cb,
    void *data);


#endif /* SBX_CHECK_H */
