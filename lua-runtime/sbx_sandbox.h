/*
 * sbx_sandbox.h: process lockdown of sbx-lua-helper.
 */

#ifndef SBX_SANDBOX_H
#define SBX_SANDBOX_H

#include <stddef.h>
#include <stdint.h>


#define SBX_PROFILE_SERVE   1   /* read/write on the channel (fd 3) only */
#define SBX_PROFILE_CLI     2   /* write to stdout and stderr only */

/* CPU seconds of check and run (RLIMIT_CPU: SIGXCPU, a second later KILL) */
#define SBX_CLI_CPU_LIMIT   10


int sbx_sandbox_apply(int profile, uint64_t as_limit, char *err,
    size_t errlen);
int sbx_self_test(void);


#endif /* SBX_SANDBOX_H */
