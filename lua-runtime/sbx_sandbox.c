/*
 * sbx_sandbox.c: the helper's process lockdown, in this order (each step
 * aborts the helper if it fails):
 *
 *   1. drop root: a helper started as root switches to "nobody";
 *   2. rlimits: no new files, no processes, no core, no file writes, an
 *      address-space backstop, a CPU-time backstop;
 *   3. PR_SET_DUMPABLE 0, PR_SET_NO_NEW_PRIVS 1;
 *   4. the seccomp allowlist (libseccomp), default action kill-process,
 *      other architectures killed.
 *
 * The allowlist is the table sbx_allow[] below; docs/security.md explains
 * every entry.
 *
 * Sanitizer builds (SBX_SANITIZE, "make test-asan" only) differ: the
 * ASan/UBSan runtime writes its reports to SBX_SANITIZE_FD, a file opened
 * at start-up, and needs getpid() to write them; there is no RLIMIT_AS
 * (shadow memory) and no RLIMIT_FSIZE (the report file).  See
 * docs/security.md, "Sanitizer builds".
 */

#define _GNU_SOURCE

#include <errno.h>
#include <grp.h>
#include <pwd.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#include <seccomp.h>

#include "sbx_sandbox.h"


#define SBX_CPU_LIMIT_SEC   3600


/* syscalls allowed with any arguments */
static const int  sbx_allow[] = {
    SCMP_SYS(brk),              /* malloc: main arena */
    SCMP_SYS(clock_gettime),    /* deadlines; os.clock (CPU clock) */
    SCMP_SYS(exit),
    SCMP_SYS(exit_group),
    SCMP_SYS(gettimeofday),     /* os.time when the vDSO is unavailable */
    SCMP_SYS(madvise),          /* free(): returning pages */
    SCMP_SYS(mremap),           /* realloc of large blocks */
    SCMP_SYS(munmap),           /* free() of large blocks */
    SCMP_SYS(rt_sigreturn),     /* return from a fatal-signal handler */
    SCMP_SYS(time),             /* os.time when the vDSO is unavailable */
#ifdef SBX_SANITIZE
    SCMP_SYS(getpid),           /* sanitizer reports: "==PID==" */
    SCMP_SYS(sigaltstack),      /* sanitizer: signal stack at exit */
    SCMP_SYS(futex),            /* sanitizer: pthread_once when unwinding */
#endif
};


static int
sbx_fail(char *err, size_t errlen, const char *what, int e)
{
    snprintf(err, errlen, "%s failed: %s", what, strerror(e));
    return -1;
}


static int
sbx_drop_root(char *err, size_t errlen)
{
    uid_t           uid = 65534;
    gid_t           gid = 65534;
    struct passwd  *pw;

    if (getuid() != 0 && geteuid() != 0) {
        return 0;
    }

    pw = getpwnam("nobody");
    if (pw) {
        uid = pw->pw_uid;
        gid = pw->pw_gid;
    }

    if (setgroups(0, NULL) != 0) {
        return sbx_fail(err, errlen, "setgroups(0)", errno);
    }

    if (setresgid(gid, gid, gid) != 0) {
        return sbx_fail(err, errlen, "setresgid(nobody)", errno);
    }

    if (setresuid(uid, uid, uid) != 0) {
        return sbx_fail(err, errlen, "setresuid(nobody)", errno);
    }

    if (setuid(0) == 0 || getuid() == 0 || geteuid() == 0) {
        snprintf(err, errlen, "still root after dropping privileges");
        return -1;
    }

    return 0;
}


static int
sbx_rlimit(int res, rlim_t v, const char *name, char *err, size_t errlen)
{
    struct rlimit  rl;

    rl.rlim_cur = v;
    rl.rlim_max = v;

    if (setrlimit(res, &rl) != 0) {
        return sbx_fail(err, errlen, name, errno);
    }

    return 0;
}


static int
sbx_rule(scmp_filter_ctx ctx, int sys, unsigned n, struct scmp_arg_cmp *a,
    char *err, size_t errlen)
{
    int  rc;

    rc = seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, sys, n, a);
    if (rc != 0) {
        return sbx_fail(err, errlen, "seccomp_rule_add()", -rc);
    }

    return 0;
}


static int
sbx_filter(int profile, char *err, size_t errlen)
{
    int                  rc;
    size_t               i;
    scmp_filter_ctx      ctx;
    struct scmp_arg_cmp  a[1];

    ctx = seccomp_init(SCMP_ACT_KILL_PROCESS);
    if (ctx == NULL) {
        snprintf(err, errlen, "seccomp_init() failed");
        return -1;
    }

    rc = seccomp_attr_set(ctx, SCMP_FLTATR_ACT_BADARCH, SCMP_ACT_KILL_PROCESS);
    if (rc != 0) {
        seccomp_release(ctx);
        return sbx_fail(err, errlen, "seccomp_attr_set(BADARCH)", -rc);
    }

    for (i = 0; i < sizeof(sbx_allow) / sizeof(sbx_allow[0]); i++) {
        if (sbx_rule(ctx, sbx_allow[i], 0, NULL, err, errlen) != 0) {
            goto failed;
        }
    }

    /* memory: never executable */
    a[0] = SCMP_A2(SCMP_CMP_MASKED_EQ, PROT_EXEC, 0);

    if (sbx_rule(ctx, SCMP_SYS(mmap), 1, a, err, errlen) != 0
        || sbx_rule(ctx, SCMP_SYS(mprotect), 1, a, err, errlen) != 0)
    {
        goto failed;
    }

    /* I/O: the channel only, or stdout and stderr for the CLI tools */
    if (profile == SBX_PROFILE_SERVE) {
        a[0] = SCMP_A0(SCMP_CMP_EQ, 3);

        if (sbx_rule(ctx, SCMP_SYS(read), 1, a, err, errlen) != 0
            || sbx_rule(ctx, SCMP_SYS(write), 1, a, err, errlen) != 0)
        {
            goto failed;
        }

    } else {
        a[0] = SCMP_A0(SCMP_CMP_EQ, 1);

        if (sbx_rule(ctx, SCMP_SYS(write), 1, a, err, errlen) != 0) {
            goto failed;
        }

        a[0] = SCMP_A0(SCMP_CMP_EQ, 2);

        if (sbx_rule(ctx, SCMP_SYS(write), 1, a, err, errlen) != 0) {
            goto failed;
        }
    }

#ifdef SBX_SANITIZE
    /* sanitizer reports, both profiles */
    a[0] = SCMP_A0(SCMP_CMP_EQ, SBX_SANITIZE_FD);

    if (sbx_rule(ctx, SCMP_SYS(write), 1, a, err, errlen) != 0) {
        goto failed;
    }
#endif

    rc = seccomp_load(ctx);
    if (rc != 0) {
        seccomp_release(ctx);
        return sbx_fail(err, errlen, "seccomp_load()", -rc);
    }

    seccomp_release(ctx);

    return 0;

failed:

    seccomp_release(ctx);
    return -1;
}


#ifdef SBX_SANITIZE

/*
 * The helper starts with an empty environment, so the runtime's options
 * are compiled in.  No leak check: LeakSanitizer stops the world with
 * clone() and ptrace(), which the filter forbids.  No symbolizer: it is a
 * process of its own.  Reports go to SBX_SANITIZE_FD, opened here before
 * the sandbox: SBX_SANITIZE_LOG/helper.PID, or stderr.
 */

const char *__asan_default_options(void);
const char *__ubsan_default_options(void);
void __sanitizer_set_report_fd(void *fd);


const char *
__asan_default_options(void)
{
    return "detect_leaks=0:symbolize=0:color=never:print_summary=0:"
           "stack_trace_format='    #%n %p'";
}


const char *
__ubsan_default_options(void)
{
    return "print_stacktrace=1:symbolize=0:color=never:print_summary=0:"
           "stack_trace_format='    #%n %p'";
}


void
sbx_sanitize_init(void)
{
    int   fd;
    char  path[512];

    fd = -1;

#ifdef SBX_SANITIZE_LOG
    snprintf(path, sizeof(path), "%s/helper.%ld", SBX_SANITIZE_LOG,
             (long) getpid());
    fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
#else
    (void) path;
#endif

    if (fd == -1) {
        fd = dup(2);
    }

    if (fd == -1 || (fd != SBX_SANITIZE_FD && dup2(fd, SBX_SANITIZE_FD) == -1))
    {
        return;
    }

    if (fd != SBX_SANITIZE_FD) {
        close(fd);
    }

    __sanitizer_set_report_fd((void *) (long) SBX_SANITIZE_FD);
}

#endif


int
sbx_sandbox_apply(int profile, uint64_t as_limit, char *err, size_t errlen)
{
    struct rlimit  rl;

    if (sbx_drop_root(err, errlen) != 0) {
        return -1;
    }

    if (sbx_rlimit(RLIMIT_NOFILE, 0, "setrlimit(RLIMIT_NOFILE)", err, errlen)
        || sbx_rlimit(RLIMIT_NPROC, 0, "setrlimit(RLIMIT_NPROC)", err, errlen)
        || sbx_rlimit(RLIMIT_CORE, 0, "setrlimit(RLIMIT_CORE)", err, errlen)
#ifndef SBX_SANITIZE
        || (profile == SBX_PROFILE_SERVE
            && sbx_rlimit(RLIMIT_FSIZE, 0, "setrlimit(RLIMIT_FSIZE)", err,
                          errlen))
#endif
        || sbx_rlimit(RLIMIT_MEMLOCK, 0, "setrlimit(RLIMIT_MEMLOCK)", err,
                      errlen)
        || sbx_rlimit(RLIMIT_MSGQUEUE, 0, "setrlimit(RLIMIT_MSGQUEUE)", err,
                      errlen)
        || (profile == SBX_PROFILE_SERVE
            && sbx_rlimit(RLIMIT_CPU, SBX_CPU_LIMIT_SEC,
                          "setrlimit(RLIMIT_CPU)", err, errlen)))
    {
        return -1;
    }

    /* a runaway check or run stops; SIGXCPU first, so it can say why */
    if (profile == SBX_PROFILE_CLI) {
        rl.rlim_cur = SBX_CLI_CPU_LIMIT;
        rl.rlim_max = SBX_CLI_CPU_LIMIT + 1;

        if (setrlimit(RLIMIT_CPU, &rl) != 0) {
            return sbx_fail(err, errlen, "setrlimit(RLIMIT_CPU)", errno);
        }
    }

#ifndef SBX_SANITIZE
    /* sanitizer runtimes reserve terabytes of shadow address space */
    if (as_limit
        && sbx_rlimit(RLIMIT_AS, as_limit, "setrlimit(RLIMIT_AS)", err, errlen))
    {
        return -1;
    }
#else
    (void) as_limit;
#endif

    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0) {
        return sbx_fail(err, errlen, "prctl(PR_SET_DUMPABLE)", errno);
    }

    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) {
        return sbx_fail(err, errlen, "prctl(PR_SET_NO_NEW_PRIVS)", errno);
    }

    return sbx_filter(profile, err, errlen);
}


/* ---- --self-test: every forbidden call must kill, allowed ones must not */

typedef struct {
    const char  *name;
    void       (*probe)(void);
    int          allowed;
} sbx_probe_t;


static void
sbx_probe_openat(void)
{
    syscall(SYS_openat, AT_FDCWD, "/etc/passwd", O_RDONLY);
}


static void
sbx_probe_open(void)
{
    syscall(SYS_open, "/etc/passwd", O_RDONLY);
}


static void
sbx_probe_socket(void)
{
    syscall(SYS_socket, AF_INET, SOCK_STREAM, 0);
}


static void
sbx_probe_connect(void)
{
    syscall(SYS_connect, 3, NULL, 0);
}


static void
sbx_probe_execve(void)
{
    char  *argv[] = { "/bin/true", NULL };

    syscall(SYS_execve, "/bin/true", argv, NULL);
}


static void
sbx_probe_fork(void)
{
    syscall(SYS_fork);
}


static void
sbx_probe_clone(void)
{
    syscall(SYS_clone, SIGCHLD, 0, NULL, NULL, 0);
}


static void
sbx_probe_ptrace(void)
{
    syscall(SYS_ptrace, PTRACE_TRACEME, 0, NULL, NULL);
}


static void
sbx_probe_mprotect_exec(void)
{
    void  *p = mmap(NULL, 4096, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

    syscall(SYS_mprotect, p, 4096, PROT_READ | PROT_EXEC);
}


static void
sbx_probe_mmap_exec(void)
{
    syscall(SYS_mmap, NULL, 4096, PROT_READ | PROT_EXEC,
            MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
}


static void
sbx_probe_kill(void)
{
    syscall(SYS_kill, 1, 0);
}


static void
sbx_probe_write_stdout(void)
{
    syscall(SYS_write, 1, "x", 1);
}


static void
sbx_probe_read_stdin(void)
{
    char  c;

    syscall(SYS_read, 0, &c, 1);
}


static void
sbx_probe_setuid(void)
{
    syscall(SYS_setuid, 0);
}


static void
sbx_probe_prctl(void)
{
    syscall(SYS_prctl, PR_SET_DUMPABLE, 1, 0, 0, 0);
}


static void
sbx_probe_unshare(void)
{
    syscall(SYS_unshare, 0);
}


static void
sbx_probe_getpid(void)
{
    syscall(SYS_getpid);
}


static void
sbx_probe_memory(void)
{
    void             *p;
    char             *q;
    struct timespec   ts;

    p = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE,
             MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        _exit(1);
    }

    memset(p, 1, 1 << 20);
    munmap(p, 1 << 20);

    q = malloc(8 << 20);
    if (q == NULL) {
        _exit(1);
    }

    memset(q, 1, 8 << 20);
    free(q);

    clock_gettime(CLOCK_MONOTONIC, &ts);
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
}


static void
sbx_probe_channel(void)
{
    char  c = 'x';

    if (syscall(SYS_write, 3, &c, 1) != 1) {
        _exit(1);
    }
}


#ifdef SBX_SANITIZE

/* a heap overflow: the runtime must be able to report it under the filter */

static void
sbx_probe_sanitizer(void)
{
    char *volatile  p;

    p = malloc(16);
    p[16] = 'x';
    free(p);
}

#define SBX_PROBE_REPORT  2     /* the sanitizer reports and exits */
#define SBX_GETPID_ALLOWED  1

#else
#define SBX_GETPID_ALLOWED  0
#endif


static const sbx_probe_t  sbx_probes[] = {
    { "open", sbx_probe_open, 0 },
    { "openat", sbx_probe_openat, 0 },
    { "socket", sbx_probe_socket, 0 },
    { "connect", sbx_probe_connect, 0 },
    { "execve", sbx_probe_execve, 0 },
    { "fork", sbx_probe_fork, 0 },
    { "clone", sbx_probe_clone, 0 },
    { "ptrace", sbx_probe_ptrace, 0 },
    { "mprotect(PROT_EXEC)", sbx_probe_mprotect_exec, 0 },
    { "mmap(PROT_EXEC)", sbx_probe_mmap_exec, 0 },
    { "kill", sbx_probe_kill, 0 },
    { "write to fd 1", sbx_probe_write_stdout, 0 },
    { "read from fd 0", sbx_probe_read_stdin, 0 },
    { "setuid", sbx_probe_setuid, 0 },
    { "prctl", sbx_probe_prctl, 0 },
    { "unshare", sbx_probe_unshare, 0 },
    { "getpid", sbx_probe_getpid, SBX_GETPID_ALLOWED },
    { "mmap/malloc/clock_gettime", sbx_probe_memory, 1 },
    { "write to the channel", sbx_probe_channel, 1 },
#ifdef SBX_SANITIZE
    { "sanitizer report", sbx_probe_sanitizer, SBX_PROBE_REPORT },
#endif
    { NULL, NULL, 0 }
};


int
sbx_self_test(void)
{
    int          i, n, status, failed = 0, sv[2];
    pid_t        pid;
    char         err[256];
    const char  *how;

    for (n = 0; sbx_probes[n].name; n++) { /* void */ }

    printf("1..%d\n", n);
    fflush(stdout);

    for (i = 0; i < n; i++) {
        if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) {
            printf("Bail out! socketpair() failed: %s\n", strerror(errno));
            return 1;
        }

        pid = fork();

        if (pid == -1) {
            printf("Bail out! fork() failed: %s\n", strerror(errno));
            return 1;
        }

        if (pid == 0) {
            if (dup2(sv[1], 3) != 3) {
                _exit(2);
            }

#ifdef SBX_SANITIZE
            /* the report comes back on the channel, not to the output */
            if (sbx_probes[i].allowed == SBX_PROBE_REPORT
                && dup2(sv[1], SBX_SANITIZE_FD) != SBX_SANITIZE_FD)
            {
                _exit(2);
            }

            /* a forked child: the runtime would reopen the report file */
            __sanitizer_set_report_fd((void *) (long) SBX_SANITIZE_FD);
#endif

            if (sbx_sandbox_apply(SBX_PROFILE_SERVE, 1ULL << 30, err,
                                  sizeof(err)) != 0)
            {
                fprintf(stderr, "sandbox: %s\n", err);
                _exit(2);
            }

            sbx_probes[i].probe();
            _exit(0);
        }

        close(sv[1]);

        while (waitpid(pid, &status, 0) == -1 && errno == EINTR) {
            /* void */
        }

#ifdef SBX_SANITIZE
        if (sbx_probes[i].allowed == SBX_PROBE_REPORT) {
            ssize_t  r;
            char     report[4096];

            r = recv(sv[0], report, sizeof(report) - 1, MSG_DONTWAIT);
            report[r > 0 ? r : 0] = '\0';
            close(sv[0]);

            if (WIFEXITED(status) && WEXITSTATUS(status) != 0
                && strstr(report, "AddressSanitizer: heap-buffer") != NULL)
            {
                printf("ok %d - %s is written\n", i + 1, sbx_probes[i].name);
            } else {
                printf("not ok %d - %s is written (status 0x%x)\n", i + 1,
                       sbx_probes[i].name, status);
                failed++;
            }

            fflush(stdout);
            continue;
        }
#endif

        close(sv[0]);

        if (sbx_probes[i].allowed) {
            if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
                printf("ok %d - %s is allowed\n", i + 1, sbx_probes[i].name);
            } else {
                printf("not ok %d - %s is allowed (status 0x%x)\n", i + 1,
                       sbx_probes[i].name, status);
                failed++;
            }

        } else {
            if (WIFSIGNALED(status) && WTERMSIG(status) == SIGSYS) {
                printf("ok %d - %s kills the helper (SIGSYS)\n", i + 1,
                       sbx_probes[i].name);
            } else {
                how = WIFSIGNALED(status) ? "killed by another signal"
                                          : "survived";
                printf("not ok %d - %s kills the helper (%s, status 0x%x)\n",
                       i + 1, sbx_probes[i].name, how, status);
                failed++;
            }
        }

        fflush(stdout);
    }

    return failed ? 1 : 0;
}
