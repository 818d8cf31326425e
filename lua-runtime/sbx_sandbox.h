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


#ifdef SBX_SANITIZE
/* sanitizer builds only: where ASan and UBSan write their reports */
#define SBX_SANITIZE_FD     9

void sbx_sanitize_init(void);
#endif


int sbx_sandbox_apply(int profile, uint64_t as_limit, char *err,
    size_t errlen);
int sbx_self_test(void);


#endif /* SBX_SANDBOX_H */
