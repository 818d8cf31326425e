/*
 * sbx_main.c: sbx-lua-helper entry points.
 *
 *   sbx-lua-helper serve PPID MEMORY    (started by an nginx worker; fd 3)
 *   sbx-lua-helper check SCRIPT [--capabilities LIST] [--limits LIST]
 *                        [--chunkname NAME]        (SCRIPT "-": stdin)
 *   sbx-lua-helper run SCRIPT --request REQ.json [--response RES.json]
 *                        [--capabilities LIST] [--limits LIST]
 *   sbx-lua-helper --self-test
 */

#define _GNU_SOURCE

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/prctl.h>
#include <sys/time.h>
#include <sys/stat.h>

#include "sbx_engine.h"
#include "sbx_sandbox.h"
#include "sbx_cli.h"


#define SBX_RBUF_MIN    (64 * 1024)


static void
sbx_usage(void)
{
    fprintf(stderr,
        "usage: sbx-lua-helper check SCRIPT [--capabilities NAME[,NAME...]]\n"
        "                            [--limits memory=SIZE,instructions=N,"
        "timeout=TIME]\n"
        "       sbx-lua-helper run SCRIPT --request REQ.json "
        "[--response RES.json]\n"
        "                          [--capabilities NAME[,NAME...]] "
        "[--limits ...]\n"
        "       sbx-lua-helper --self-test\n");
}


/* ---- serve ---- */

static int
sbx_write_all(int fd, const uint8_t *p, size_t len)
{
    ssize_t  n;

    while (len) {
        n = write(fd, p, len);

        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }

            return -1;
        }

        p += n;
        len -= (size_t) n;
    }

    return 0;
}


static void
sbx_send_fatal(const char *msg)
{
    uint8_t  buf[SBX_FRAME_HDR_SIZE + 4 + SBX_MAX_ERROR_MSG];
    size_t   len = strlen(msg);
    sbx_wr_t w;

    if (len > SBX_MAX_ERROR_MSG) {
        len = SBX_MAX_ERROR_MSG;
    }

    sbx_wr_init(&w, buf + SBX_FRAME_HDR_SIZE, sizeof(buf) - SBX_FRAME_HDR_SIZE);
    sbx_put_str(&w, msg, len);
    sbx_frame_hdr_write(buf, (uint32_t) w.need, SBX_MSG_FATAL, 0, 0, 0);

    (void) sbx_write_all(SBX_CHANNEL_FD, buf, SBX_FRAME_HDR_SIZE + w.need);
}


typedef struct {
    uint8_t            *buf;
    size_t              size;
    size_t              start;
    size_t              end;
} sbx_rbuf_t;


/*
 * Reads one whole frame.  Reads as much as the socket holds, so a frame and
 * the next one's header usually arrive in one read().
 */

static int
sbx_read_frame(sbx_rbuf_t *rb, sbx_frame_hdr_t *h, const uint8_t **payload)
{
    size_t    need, have;
    ssize_t   n;
    uint8_t  *p;

    for ( ;; ) {
        have = rb->end - rb->start;

        if (have >= SBX_FRAME_HDR_SIZE) {
            sbx_frame_hdr_read(rb->buf + rb->start, h);

            if (sbx_frame_hdr_check(h, SBX_FRAME_MAX) != 0) {
                return -1;
            }

            need = SBX_FRAME_HDR_SIZE + (size_t) h->len;

            if (have >= need) {
                *payload = rb->buf + rb->start + SBX_FRAME_HDR_SIZE;
                rb->start += need;
                return 0;
            }

            if (need > rb->size - rb->start) {
                if (rb->start) {
                    memmove(rb->buf, rb->buf + rb->start, have);
                    rb->start = 0;
                    rb->end = have;
                }

                if (need > rb->size) {
                    p = realloc(rb->buf, need);
                    if (p == NULL) {
                        return -1;
                    }

                    rb->buf = p;
                    rb->size = need;
                }
            }

        } else if (rb->start && rb->start == rb->end) {
            rb->start = 0;
            rb->end = 0;

        } else if (rb->size - rb->end < SBX_FRAME_HDR_SIZE) {
            memmove(rb->buf, rb->buf + rb->start, have);
            rb->start = 0;
            rb->end = have;
        }

        n = read(SBX_CHANNEL_FD, rb->buf + rb->end, rb->size - rb->end);

        if (n == 0) {
            return 1;       /* the worker went away */
        }

        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }

            return -1;
        }

        rb->end += (size_t) n;
    }
}


static int
sbx_load_init(sbx_engine_t *e, const uint8_t *p, size_t len,
    char *err, size_t errlen)
{
    int           idx;
    uint32_t      flags, n, i;
    uint64_t      as;
    unsigned      hooks;
    sbx_rd_t      rd;
    sbx_script_t  s;

    sbx_rd_init(&rd, p, len);

    if (sbx_get_u64(&rd, &as) || sbx_get_u32(&rd, &flags)
        || sbx_get_count(&rd, &n, SBX_MAX_CONNECTORS, 32))
    {
        snprintf(err, errlen, "malformed INIT frame");
        return -1;
    }

    for (i = 0; i < n; i++) {
        if (sbx_get_str(&rd, &s.name) || sbx_get_str(&rd, &s.chunkname)
            || sbx_get_str(&rd, &s.source) || sbx_get_u32(&rd, &s.caps)
            || sbx_get_u64(&rd, &s.memory)
            || sbx_get_u64(&rd, &s.instructions)
            || sbx_get_u32(&rd, &s.timeout_ms))
        {
            snprintf(err, errlen, "malformed INIT frame");
            return -1;
        }

        idx = sbx_engine_load(e, &s, &hooks, err, errlen);

        if (idx != (int) i) {
            return -1;
        }
    }

    return 0;
}


static int
sbx_serve(int argc, char **argv)
{
    int               rc;
    pid_t             ppid;
    char              err[SBX_MAX_ERROR_MSG];
    size_t            outlen;
    uint8_t          *out;
    uint64_t          as;
    sbx_rbuf_t        rb;
    sbx_engine_t     *e;
    sbx_frame_hdr_t   h;
    const uint8_t    *payload;

    if (argc < 4) {
        sbx_usage();
        return 2;
    }

    ppid = (pid_t) strtol(argv[2], NULL, 10);
    as = strtoull(argv[3], NULL, 10);

    /* the worker's death kills the helper; it may already be gone */
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0 || getppid() != ppid) {
        return 1;
    }

    if (fcntl(SBX_CHANNEL_FD, F_GETFD) == -1) {
        fprintf(stderr, "sbx-lua-helper: serve needs the channel on fd 3\n");
        return 2;
    }

    /* with TZ set, glibc reads the zone file now and never again */
    tzset();

    e = sbx_engine_create(err, sizeof(err));
    if (e == NULL) {
        sbx_send_fatal(err);
        return 1;
    }

    if (sbx_sandbox_apply(SBX_PROFILE_SERVE, as, err, sizeof(err)) != 0) {
        sbx_send_fatal(err);
        return 1;
    }

    /* from here on: no files, no sockets, no processes, no exec */

    rb.size = SBX_RBUF_MIN;
    rb.buf = malloc(rb.size);
    rb.start = 0;
    rb.end = 0;

    if (rb.buf == NULL) {
        sbx_send_fatal("out of memory");
        return 1;
    }

    rc = sbx_read_frame(&rb, &h, &payload);
    if (rc != 0 || h.type != SBX_MSG_INIT) {
        return rc == 1 ? 0 : 3;
    }

    if (sbx_load_init(e, payload, h.len, err, sizeof(err)) != 0) {
        sbx_send_fatal(err);
        return 1;
    }

    sbx_engine_ready(e, as);

    {
        uint8_t  ready[SBX_FRAME_HDR_SIZE];

        sbx_frame_hdr_write(ready, 0, SBX_MSG_READY, 0, 0, 0);

        if (sbx_write_all(SBX_CHANNEL_FD, ready, sizeof(ready)) != 0) {
            return 0;
        }
    }

    for ( ;; ) {
        rc = sbx_read_frame(&rb, &h, &payload);

        if (rc == 1) {
            return 0;
        }

        if (rc != 0 || h.type != SBX_MSG_CALL) {
            return 3;
        }

        if (sbx_engine_call(e, h.aux, h.flags, payload, h.len, &out, &outlen)
            != 0)
        {
            return 3;
        }

        sbx_frame_hdr_write(out, (uint32_t) outlen, SBX_MSG_RESULT,
                            (uint16_t) (h.flags
                                        | (sbx_engine_wants_recycle(e)
                                           ? SBX_RESULT_RECYCLE : 0)),
                            h.id, h.aux);

        if (sbx_write_all(SBX_CHANNEL_FD, out, SBX_FRAME_HDR_SIZE + outlen)
            != 0)
        {
            return 0;
        }

        sbx_engine_idle(e);
    }
}


/* ---- shared by check and run ---- */

int
sbx_read_file(const char *path, char **data, size_t *len, size_t max,
    char *err, size_t errlen)
{
    int          fd;
    char        *p;
    size_t       n = 0, size = 4096;
    ssize_t      r;

    fd = strcmp(path, "-") == 0 ? dup(0) : open(path, O_RDONLY | O_CLOEXEC);
    if (fd == -1) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return -1;
    }

    p = malloc(size);

    for ( ;; ) {
        if (p == NULL) {
            close(fd);
            snprintf(err, errlen, "%s: out of memory", path);
            return -1;
        }

        if (n == size) {
            if (size > max) {
                free(p);
                close(fd);
                snprintf(err, errlen, "%s:1: file is larger than %zu bytes",
                         path, max);
                return SBX_FILE_TOO_LARGE;
            }

            size *= 2;
            p = realloc(p, size);
            continue;
        }

        r = read(fd, p + n, size - n);

        if (r < 0 && errno == EINTR) {
            continue;
        }

        if (r < 0) {
            snprintf(err, errlen, "%s: %s", path, strerror(errno));
            free(p);
            close(fd);
            return -1;
        }

        if (r == 0) {
            break;
        }

        n += (size_t) r;
    }

    close(fd);

    if (n > max) {
        free(p);
        snprintf(err, errlen, "%s:1: file is larger than %zu bytes", path, max);
        return SBX_FILE_TOO_LARGE;
    }

    *data = p;
    *len = n;

    return 0;
}


static int
sbx_parse_size(const char *s, uint64_t *v)
{
    char  *end;

    errno = 0;
    *v = strtoull(s, &end, 10);

    if (errno || end == s) {
        return -1;
    }

    switch (*end) {
    case 'k': case 'K': *v <<= 10; end++; break;
    case 'm': case 'M': *v <<= 20; end++; break;
    case 'g': case 'G': *v <<= 30; end++; break;
    }

    return *end == '\0' || *end == ',' ? 0 : -1;
}


/*
 * The same bounds as the "limits" directive in nginx.conf: memory at
 * least 256k, instructions at least 1000, timeout from 1ms to 60s.
 */

int
sbx_parse_limits(const char *list, sbx_script_t *s, char *err, size_t errlen)
{
    char        *copy, *tok, *save = NULL, *end;
    uint64_t     v;
    double       ms;

    copy = strdup(list);
    if (copy == NULL) {
        return -1;
    }

    for (tok = strtok_r(copy, ",", &save); tok;
         tok = strtok_r(NULL, ",", &save))
    {
        if (strncmp(tok, "memory=", 7) == 0) {
            if (sbx_parse_size(tok + 7, &v) != 0 || v < 256 * 1024) {
                goto invalid;
            }

            s->memory = v;

        } else if (strncmp(tok, "instructions=", 13) == 0) {
            if (sbx_parse_size(tok + 13, &v) != 0 || v < 1000) {
                goto invalid;
            }

            s->instructions = v;

        } else if (strncmp(tok, "timeout=", 8) == 0) {
            ms = strtod(tok + 8, &end);

            if (end == tok + 8 || ms <= 0) {
                goto invalid;
            }

            if (strcmp(end, "s") == 0) {
                ms *= 1000;
            } else if (strcmp(end, "ms") != 0 && *end != '\0') {
                goto invalid;
            }

            if (ms < 1 || ms > 60000) {
                goto invalid;
            }

            s->timeout_ms = (uint32_t) ms;

        } else {
            goto invalid;
        }
    }

    free(copy);
    return 0;

invalid:

    snprintf(err, errlen, "invalid limit \"%s\" (expected memory=SIZE of "
             "at least 256k, instructions=N of at least 1000 or timeout=TIME "
             "from 1ms to 60s, as in nginx.conf)", tok);
    free(copy);
    return -1;
}


/* TZ for the sandbox: kept if set, else the system zone, read once */

void
sbx_clean_environment(void)
{
    char  *tz, *copy = NULL;

    tz = getenv("TZ");
    if (tz) {
        copy = strdup(tz);
    }

    clearenv();
    setenv("TZ", copy ? copy : ":/etc/localtime", 1);
    free(copy);
    tzset();
}


static const char *volatile  sbx_check_name = "stdin";


/* RLIMIT_CPU: a top level that spins in one C call is stopped here */

/* and a wall-clock backstop: 3 x timeout + 1 s, as for run */

static void
sbx_check_xcpu(int signo)
{
    const char  *name = (const char *) sbx_check_name;
    static const char  cpu[] = ":1: check stopped: CPU time limit exceeded\n";
    static const char  wall[] = ":1: top level: time limit exceeded (stopped "
                                "by the wall-clock backstop)\n";

    (void) !write(1, name, strlen(name));

    if (signo == SIGALRM) {
        (void) !write(1, wall, sizeof(wall) - 1);

    } else {
        (void) !write(1, cpu, sizeof(cpu) - 1);
    }

    _exit(1);
}


static int
sbx_check(int argc, char **argv)
{
    int            i, rc, problems;
    char          *src, out[8192], err[1024];
    const char    *path = NULL, *chunkname = NULL;
    size_t         len;
    unsigned       hooks;
    sbx_engine_t  *e;
    sbx_script_t   s;

    memset(&s, 0, sizeof(s));
    s.memory = SBX_DEFAULT_MEMORY;
    s.instructions = SBX_DEFAULT_INSTRUCTIONS;
    s.timeout_ms = SBX_DEFAULT_TIMEOUT_MS;

    for (i = 2; i < argc; i++) {
        if (strcmp(argv[i], "--capabilities") == 0 && i + 1 < argc) {
            if (sbx_caps_parse(argv[++i], &s.caps, err, sizeof(err)) != 0) {
                fprintf(stderr, "sbx-lua-helper: %s\n", err);
                return 2;
            }

        } else if (strcmp(argv[i], "--limits") == 0 && i + 1 < argc) {
            if (sbx_parse_limits(argv[++i], &s, err, sizeof(err)) != 0) {
                fprintf(stderr, "sbx-lua-helper: %s\n", err);
                return 2;
            }

        } else if (strcmp(argv[i], "--chunkname") == 0 && i + 1 < argc) {
            chunkname = argv[++i];

        } else if (path == NULL && (argv[i][0] != '-' || argv[i][1] == '\0'))
        {
            path = argv[i];

        } else {
            sbx_usage();
            return 2;
        }
    }

    if (path == NULL) {
        sbx_usage();
        return 2;
    }

    if (chunkname == NULL) {
        chunkname = strcmp(path, "-") == 0 ? "stdin" : path;
    }

    sbx_clean_environment();

    rc = sbx_read_file(path, &src, &len, SBX_MAX_SCRIPT_SIZE, err,
                       sizeof(err));

    if (rc == SBX_FILE_TOO_LARGE) {
        printf("%s\n", err);
        return 1;
    }

    if (rc != 0) {
        fprintf(stderr, "sbx-lua-helper: %s\n", err);
        return 2;
    }

    s.name.data = (const uint8_t *) "check";
    s.name.len = 5;
    s.chunkname.data = (const uint8_t *) chunkname;
    s.chunkname.len = strlen(chunkname);
    s.source.data = (const uint8_t *) src;
    s.source.len = len;

    e = sbx_engine_create(err, sizeof(err));
    if (e == NULL) {
        fprintf(stderr, "sbx-lua-helper: %s\n", err);
        return 1;
    }

    /* stdout is written by hand below: no stdio buffering decisions later */
    fflush(stdout);

    sbx_check_name = chunkname;
    (void) signal(SIGXCPU, sbx_check_xcpu);
    (void) signal(SIGALRM, sbx_check_xcpu);

    {
        struct itimerval  it;

        memset(&it, 0, sizeof(it));
        it.it_value.tv_sec = (s.timeout_ms * 3ULL + 1000) / 1000;
        it.it_value.tv_usec = (s.timeout_ms * 3ULL + 1000) % 1000 * 1000;
        (void) setitimer(ITIMER_REAL, &it, NULL);
    }

    if (sbx_sandbox_apply(SBX_PROFILE_CLI, 1ULL << 32, err, sizeof(err))
        != 0)
    {
        fprintf(stderr, "sbx-lua-helper: sandbox: %s\n", err);
        return 1;
    }

    problems = sbx_engine_check(e, &s, out, sizeof(out));

    if (problems) {
        (void) !write(1, out, strlen(out));
        return 1;
    }

    if (sbx_engine_load(e, &s, &hooks, err, sizeof(err)) < 0) {
        snprintf(out, sizeof(out), "%s\n", err);
        (void) !write(1, out, strlen(out));
        return 1;
    }

    snprintf(out, sizeof(out), "%s: ok, hooks:%s%s\n", chunkname,
             (hooks & SBX_HAS_REQUEST) ? " request" : "",
             (hooks & SBX_HAS_RESPONSE) ? " response" : "");
    (void) !write(1, out, strlen(out));

    return 0;
}


int
main(int argc, char **argv)
{
#ifdef SBX_SANITIZE
    sbx_sanitize_init();
#endif

    if (argc < 2) {
        sbx_usage();
        return 2;
    }

    if (strcmp(argv[1], "serve") == 0) {
        return sbx_serve(argc, argv);
    }

    if (strcmp(argv[1], "check") == 0) {
        return sbx_check(argc, argv);
    }

    if (strcmp(argv[1], "run") == 0) {
        return sbx_run(argc, argv);
    }

    if (strcmp(argv[1], "--self-test") == 0) {
        return sbx_self_test();
    }

    sbx_usage();
    return 2;
}
