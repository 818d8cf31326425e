/*
 * ngx_http_sbx_pool.c: helper pools, per worker.
 *
 * Each worker spawns `size` helpers per pool (posix_spawn: a fresh exec of
 * sbx-lua-helper, empty environment but TZ, the channel as fd 3, every other
 * fd closed, signals reset) and talks to each over a socketpair driven by
 * nginx events.  A helper runs one call at a time, in order; the worker may
 * pipeline up to `pipeline` calls to it (sent ahead, so the helper finds the
 * next call waiting when it finishes one), but never behind a call that has
 * been running for long.  Calls beyond that wait in a bounded queue.  When
 * a helper dies only the call it was running fails: the calls pipelined
 * behind it never started, and go back to the front of the queue.
 *
 * A helper that dies is reaped (waitpid on its pid; SIGCHLD is left at its
 * default in workers so nginx's own handler does not reap helpers) and
 * replaced at once; one that fails to start is retried with backoff.  The
 * wall-clock backstop is a timer per helper for the call it runs: past the
 * connector's timeout plus a grace period the helper is SIGKILLed.
 *
 * Ownership: the worker owns its end of each socketpair (an nginx
 * connection); the helper owns fd 3.  Memory of a call belongs to its
 * request; a helper only points at it while the call is in flight, and a
 * request that goes away first detaches itself (ngx_http_sbx_call_cancel).
 */

#define _GNU_SOURCE

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <spawn.h>
#include <sys/wait.h>

#include "ngx_http_sbx_module.h"


#define NGX_HTTP_SBX_H_DEAD       0
#define NGX_HTTP_SBX_H_STARTING   1
#define NGX_HTTP_SBX_H_IDLE       2
#define NGX_HTTP_SBX_H_BUSY       3

#define NGX_HTTP_SBX_START_TIMEOUT    10000
#define NGX_HTTP_SBX_BACKOFF_MIN      100
#define NGX_HTTP_SBX_BACKOFF_MAX      10000
#define NGX_HTTP_SBX_CPU_RECYCLE_MS   (2880 * 1000)   /* 80% of RLIMIT_CPU */
#define NGX_HTTP_SBX_IBUF_MIN         (64 * 1024)
#define NGX_HTTP_SBX_RESULT_MAX       (256 * 1024 * 1024)
#define NGX_HTTP_SBX_PIPELINE_AGE     2     /* ms a head call may run and
                                               still get calls behind it */

/* why a helper went away, for the log and metrics */
#define NGX_HTTP_SBX_GONE_EOF         0
#define NGX_HTTP_SBX_GONE_KILLED      1   /* timeout kill */
#define NGX_HTTP_SBX_GONE_RECYCLED    2
#define NGX_HTTP_SBX_GONE_BROKEN      3   /* protocol violation */
#define NGX_HTTP_SBX_GONE_FATAL       4   /* reported a set-up failure */
#define NGX_HTTP_SBX_GONE_EXITING     5   /* worker exit */
#define NGX_HTTP_SBX_GONE_DROPPED     6   /* a request left mid-write */


/* a call sent (or being sent) to a helper */
typedef struct {
    ngx_http_sbx_call_t          *call;           /* NULL: abandoned */
    ngx_http_sbx_connector_t     *connector;
    uint32_t                      id;
} ngx_http_sbx_slot_t;


struct ngx_http_sbx_helper_s {
    ngx_http_sbx_pool_t          *pool;
    ngx_uint_t                    slot;
    ngx_pid_t                     pid;
    ngx_connection_t             *c;
    ngx_uint_t                    state;

    /* calls in flight, in order: slots[0] runs, the rest wait in fd 3 */
    ngx_http_sbx_slot_t           slots[NGX_HTTP_SBX_MAX_PIPELINE];
    ngx_uint_t                    nslots;
    ngx_uint_t                    nwritten;       /* slots fully sent */
    ngx_flag_t                    wslot;          /* obuf: slots[nwritten] */
    ngx_flag_t                    recycle;        /* no new calls */
    ngx_msec_t                    head_start;     /* slots[0] began */

    u_char                       *ibuf;
    size_t                        isize;
    size_t                        ilen;

    u_char                       *obuf;
    size_t                        olen;
    size_t                        osent;
    u_char                       *ocopy;          /* obuf, when allocated */

    ngx_uint_t                    served;
    uint32_t                      next_id;
    ngx_msec_t                    backoff;

    ngx_event_t                   timer;          /* deadline of a call */
    ngx_event_t                   respawn_ev;
};


typedef struct {
    ngx_pid_t                     pid;
    ngx_uint_t                    why;
    ngx_uint_t                    served;
    ngx_uint_t                    tries;
} ngx_http_sbx_zombie_t;


static ngx_int_t ngx_http_sbx_helper_spawn(ngx_http_sbx_helper_t *h);
static void ngx_http_sbx_helper_gone(ngx_http_sbx_helper_t *h,
    ngx_uint_t why);
static void ngx_http_sbx_helper_read(ngx_event_t *rev);
static void ngx_http_sbx_helper_write(ngx_event_t *wev);
static void ngx_http_sbx_helper_timeout(ngx_event_t *ev);
static void ngx_http_sbx_helper_respawn(ngx_event_t *ev);
static void ngx_http_sbx_reap(ngx_event_t *ev);
static void ngx_http_sbx_dispatch(ngx_http_sbx_pool_t *pool);
static void ngx_http_sbx_call_finish(ngx_http_sbx_call_t *call,
    ngx_uint_t outcome);
static void ngx_http_sbx_call_wait_timeout(ngx_event_t *ev);
static void ngx_http_sbx_call_cleanup(void *data);
static void ngx_http_sbx_requeue(ngx_http_sbx_pool_t *pool,
    ngx_http_sbx_call_t *call);
static void ngx_http_sbx_arm_head(ngx_http_sbx_helper_t *h);


/*
 * Calls waiting for a helper: those in the queue and those pipelined
 * behind a running call.  Together they are bounded by sbx_pool queue=, so
 * pipelining never lets more calls wait than the queue would.
 */

static ngx_uint_t
ngx_http_sbx_waiting(ngx_http_sbx_pool_t *pool)
{
    ngx_uint_t  i, n;

    n = pool->queued;

    for (i = 0; pool->helpers && i < pool->size; i++) {
        if (pool->helpers[i].nslots > 1) {
            n += pool->helpers[i].nslots - 1;
        }
    }

    return n;
}


static void
ngx_http_sbx_report(ngx_http_sbx_pool_t *pool)
{
    ngx_http_sbx_metrics_pool(pool, pool->alive, ngx_http_sbx_waiting(pool));
}


/* the INIT frame of a pool: every script, its capabilities and limits */

static ngx_int_t
ngx_http_sbx_build_init(ngx_cycle_t *cycle, ngx_http_sbx_pool_t *pool)
{
    int                         pass;
    u_char                     *buf;
    sbx_wr_t                    w;
    ngx_uint_t                  i;
    ngx_http_sbx_connector_t  **cp, *c;

    cp = pool->connectors.elts;
    buf = NULL;

    for (pass = 0; pass < 2; pass++) {
        sbx_wr_init(&w, buf ? buf + SBX_FRAME_HDR_SIZE : NULL,
                    buf ? pool->init_len - SBX_FRAME_HDR_SIZE : 0);

        sbx_put_u64(&w, pool->memory);
        sbx_put_u32(&w, 0);
        sbx_put_u32(&w, (uint32_t) pool->connectors.nelts);

        for (i = 0; i < pool->connectors.nelts; i++) {
            c = cp[i];

            sbx_put_str(&w, c->name.data, c->name.len);
            sbx_put_str(&w, c->script.data, c->script.len);
            sbx_put_str(&w, c->source.data, c->source.len);
            sbx_put_u32(&w, c->caps);
            sbx_put_u64(&w, c->memory);
            sbx_put_u64(&w, c->instructions);
            sbx_put_u32(&w, (uint32_t) c->timeout);
        }

        if (buf == NULL) {
            pool->init_len = SBX_FRAME_HDR_SIZE + w.need;
            buf = ngx_palloc(cycle->pool, pool->init_len);
            if (buf == NULL) {
                return NGX_ERROR;
            }
        }
    }

    if (w.overflow) {
        return NGX_ERROR;
    }

    sbx_frame_hdr_write(buf, (uint32_t) w.need, SBX_MSG_INIT, 0, 0, 0);
    pool->init = buf;

    return NGX_OK;
}


ngx_int_t
ngx_http_sbx_pool_init_process(ngx_cycle_t *cycle,
    ngx_http_sbx_main_conf_t *smcf)
{
    ngx_uint_t              i, k;
    ngx_http_sbx_pool_t   **pp, *pool;
    ngx_http_sbx_helper_t  *h;
    struct sigaction        sa;

    /*
     * nginx's SIGCHLD handler would reap helpers (and log them as unknown
     * processes): workers have no other children, and helpers are reaped
     * by pid below.
     */
    ngx_memzero(&sa, sizeof(struct sigaction));
    sa.sa_handler = SIG_DFL;
    sigemptyset(&sa.sa_mask);

    if (sigaction(SIGCHLD, &sa, NULL) == -1) {
        ngx_log_error(NGX_LOG_ALERT, cycle->log, ngx_errno,
                      "sigaction(SIGCHLD) failed");
        return NGX_ERROR;
    }

    pp = smcf->pools.elts;

    for (i = 0; i < smcf->pools.nelts; i++) {
        pool = pp[i];

        if (pool->connectors.nelts == 0) {
            continue;
        }

        pool->log = cycle->log;
        pool->helper_path = smcf->helper_path;
        ngx_queue_init(&pool->queue);

        if (ngx_array_init(&pool->zombies, cycle->pool, 8,
                           sizeof(ngx_http_sbx_zombie_t)) != NGX_OK
            || ngx_http_sbx_build_init(cycle, pool) != NGX_OK)
        {
            return NGX_ERROR;
        }

        pool->reap_ev.handler = ngx_http_sbx_reap;
        pool->reap_ev.data = pool;
        pool->reap_ev.log = cycle->log;
        pool->reap_ev.cancelable = 1;

        pool->helpers = ngx_pcalloc(cycle->pool,
                                    pool->size * sizeof(ngx_http_sbx_helper_t));
        if (pool->helpers == NULL) {
            return NGX_ERROR;
        }

        for (k = 0; k < pool->size; k++) {
            h = &pool->helpers[k];
            h->pool = pool;
            h->slot = k;
            h->backoff = NGX_HTTP_SBX_BACKOFF_MIN;

            h->timer.handler = ngx_http_sbx_helper_timeout;
            h->timer.data = h;
            h->timer.log = cycle->log;

            h->respawn_ev.handler = ngx_http_sbx_helper_respawn;
            h->respawn_ev.data = h;
            h->respawn_ev.log = cycle->log;
            h->respawn_ev.cancelable = 1;

            h->isize = NGX_HTTP_SBX_IBUF_MIN;
            h->ibuf = ngx_alloc(h->isize, cycle->log);
            if (h->ibuf == NULL) {
                return NGX_ERROR;
            }

            if (ngx_http_sbx_helper_spawn(h) != NGX_OK) {
                ngx_add_timer(&h->respawn_ev, h->backoff);
            }
        }

        ngx_http_sbx_report(pool);
    }

    return NGX_OK;
}


void
ngx_http_sbx_pool_exit_process(ngx_cycle_t *cycle,
    ngx_http_sbx_main_conf_t *smcf)
{
    ngx_uint_t              i, k;
    ngx_http_sbx_pool_t   **pp, *pool;
    ngx_http_sbx_helper_t  *h;

    pp = smcf->pools.elts;

    for (i = 0; i < smcf->pools.nelts; i++) {
        pool = pp[i];

        if (pool->helpers == NULL) {
            continue;
        }

        for (k = 0; k < pool->size; k++) {
            h = &pool->helpers[k];

            if (h->state != NGX_HTTP_SBX_H_DEAD) {
                ngx_http_sbx_helper_gone(h, NGX_HTTP_SBX_GONE_EXITING);
            }

            if (h->respawn_ev.timer_set) {
                ngx_del_timer(&h->respawn_ev);
            }

            ngx_free(h->ibuf);
            h->ibuf = NULL;
        }

        if (pool->reap_ev.timer_set) {
            ngx_del_timer(&pool->reap_ev);
        }
    }
}


static ngx_int_t
ngx_http_sbx_helper_spawn(ngx_http_sbx_helper_t *h)
{
    int                          sv[2], fd, rc;
    char                        *argv[5], *envp[2], *tz;
    char                         ppid[NGX_INT64_LEN + 1];
    char                         mem[NGX_INT64_LEN + 1];
    char                         tzbuf[256];
    sigset_t                     none, all;
    ngx_pid_t                    pid;
    ngx_connection_t            *c;
    ngx_http_sbx_pool_t         *pool = h->pool;
    posix_spawnattr_t            attr;
    posix_spawn_file_actions_t   fa;

    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == -1) {
        ngx_log_error(NGX_LOG_ERR, pool->log, ngx_errno,
                      "sbx: socketpair() failed");
        return NGX_ERROR;
    }

    /* keep the helper's end off fd 3, so dup2() below always copies */
    if (sv[1] <= SBX_CHANNEL_FD) {
        fd = fcntl(sv[1], F_DUPFD_CLOEXEC, 10);
        close(sv[1]);

        if (fd == -1) {
            close(sv[0]);
            return NGX_ERROR;
        }

        sv[1] = fd;
    }

    *ngx_sprintf((u_char *) ppid, "%P", ngx_pid) = '\0';
    *ngx_sprintf((u_char *) mem, "%uz", pool->memory) = '\0';

    argv[0] = (char *) pool->helper_path.data;
    argv[1] = "serve";
    argv[2] = ppid;
    argv[3] = mem;
    argv[4] = NULL;

    /* an empty environment but TZ, so os.date and os.time stay local */
    tz = getenv("TZ");
    *ngx_snprintf((u_char *) tzbuf, sizeof(tzbuf) - 1, "TZ=%s",
                  tz ? tz : ":/etc/localtime") = '\0';
    envp[0] = tzbuf;
    envp[1] = NULL;

    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_adddup2(&fa, 1, 2);
    posix_spawn_file_actions_adddup2(&fa, sv[1], SBX_CHANNEL_FD);
    posix_spawn_file_actions_addclosefrom_np(&fa, SBX_CHANNEL_FD + 1);

    sigemptyset(&none);
    sigfillset(&all);
    posix_spawnattr_init(&attr);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK
                                    | POSIX_SPAWN_SETSIGDEF);
    posix_spawnattr_setsigmask(&attr, &none);
    posix_spawnattr_setsigdefault(&attr, &all);

    rc = posix_spawn(&pid, argv[0], &fa, &attr, argv, envp);

    posix_spawn_file_actions_destroy(&fa);
    posix_spawnattr_destroy(&attr);
    close(sv[1]);

    if (rc != 0) {
        ngx_log_error(NGX_LOG_ERR, pool->log, rc,
                      "sbx: posix_spawn(\"%V\") failed for pool \"%V\"",
                      &pool->helper_path, &pool->name);
        close(sv[0]);
        return NGX_ERROR;
    }

    if (ngx_nonblocking(sv[0]) == -1) {
        ngx_log_error(NGX_LOG_ERR, pool->log, ngx_socket_errno,
                      ngx_nonblocking_n " failed");
        goto failed;
    }

    c = ngx_get_connection(sv[0], pool->log);
    if (c == NULL) {
        goto failed;
    }

    c->data = h;
    c->read->handler = ngx_http_sbx_helper_read;
    c->write->handler = ngx_http_sbx_helper_write;
    c->read->log = pool->log;
    c->write->log = pool->log;

    h->c = c;
    h->pid = pid;
    h->state = NGX_HTTP_SBX_H_STARTING;
    h->nslots = 0;
    h->nwritten = 0;
    h->wslot = 0;
    h->recycle = 0;
    h->ilen = 0;
    h->served = 0;
    h->obuf = pool->init;
    h->olen = pool->init_len;
    h->osent = 0;

    if (ngx_add_conn && (ngx_event_flags & NGX_USE_EPOLL_EVENT)) {
        if (ngx_add_conn(c) == NGX_ERROR) {
            h->c = NULL;
            ngx_free_connection(c);
            goto failed;
        }

    } else if (ngx_handle_read_event(c->read, 0) != NGX_OK) {
        h->c = NULL;
        ngx_free_connection(c);
        goto failed;
    }

    ngx_add_timer(&h->timer, NGX_HTTP_SBX_START_TIMEOUT);

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, pool->log, 0,
                   "sbx: helper %P of pool \"%V\" spawned", pid, &pool->name);

    ngx_http_sbx_helper_write(c->write);

    return NGX_OK;

failed:

    close(sv[0]);
    kill(pid, SIGKILL);

    {
        ngx_http_sbx_zombie_t  *z;

        z = ngx_array_push(&pool->zombies);
        if (z) {
            z->pid = pid;
            z->why = NGX_HTTP_SBX_GONE_EXITING;
            z->served = 0;
            z->tries = 0;
        }

        ngx_http_sbx_reap(&pool->reap_ev);
    }

    return NGX_ERROR;
}


static void
ngx_http_sbx_log_gone(ngx_http_sbx_pool_t *pool, ngx_http_sbx_zombie_t *z,
    int status)
{
    ngx_uint_t  level, reason;

    if (z->why == NGX_HTTP_SBX_GONE_EXITING
        || z->why == NGX_HTTP_SBX_GONE_DROPPED)
    {
        return;
    }

    if (WIFSIGNALED(status)) {
        if (z->why == NGX_HTTP_SBX_GONE_KILLED) {
            /* logged when the kill was decided, with the connector */
            ngx_http_sbx_metrics_restart(pool, NGX_HTTP_SBX_RESTART_TIMEOUT);
            return;
        }

        if (WTERMSIG(status) == SIGSYS) {
            ngx_log_error(NGX_LOG_ERR, pool->log, 0,
                          "sbx: helper %P of pool \"%V\" was killed by "
                          "seccomp: sandbox violation (SIGSYS)",
                          z->pid, &pool->name);
            reason = NGX_HTTP_SBX_RESTART_SECCOMP;

        } else {
            ngx_log_error(NGX_LOG_ERR, pool->log, 0,
                          "sbx: helper %P of pool \"%V\" exited on signal "
                          "%d%s", z->pid, &pool->name, WTERMSIG(status),
                          WTERMSIG(status) == SIGXCPU
                          ? " (CPU time limit)" : "");
            reason = NGX_HTTP_SBX_RESTART_SIGNAL;
        }

        ngx_http_sbx_metrics_restart(pool, reason);
        return;
    }

    if (z->why == NGX_HTTP_SBX_GONE_RECYCLED) {
        ngx_log_error(NGX_LOG_INFO, pool->log, 0,
                      "sbx: helper %P of pool \"%V\" recycled after %ui "
                      "requests", z->pid, &pool->name, z->served);
        ngx_http_sbx_metrics_restart(pool, NGX_HTTP_SBX_RESTART_RECYCLE);
        return;
    }

    level = NGX_LOG_ERR;
    reason = NGX_HTTP_SBX_RESTART_EXIT;

    if (z->why == NGX_HTTP_SBX_GONE_FATAL) {
        reason = NGX_HTTP_SBX_RESTART_STARTUP;
    }

    ngx_log_error(level, pool->log, 0,
                  "sbx: helper %P of pool \"%V\" exited with code %d%s",
                  z->pid, &pool->name, WEXITSTATUS(status),
                  WEXITSTATUS(status) == 3 ? " (protocol error)" : "");

    ngx_http_sbx_metrics_restart(pool, reason);
}


/* reaps helpers that went away; retried until each one is reaped */

static void
ngx_http_sbx_reap(ngx_event_t *ev)
{
    int                     status;
    ngx_pid_t               pid;
    ngx_uint_t              i;
    ngx_http_sbx_pool_t    *pool = ev->data;
    ngx_http_sbx_zombie_t  *z;

    z = pool->zombies.elts;

    for (i = 0; i < pool->zombies.nelts; /* void */) {
        pid = waitpid(z[i].pid, &status, WNOHANG);

        if (pid == z[i].pid || (pid == -1 && ngx_errno == ECHILD)) {
            if (pid == z[i].pid) {
                ngx_http_sbx_log_gone(pool, &z[i], status);
            }

            z[i] = z[--pool->zombies.nelts];
            continue;
        }

        if (++z[i].tries == 50) {
            /* still there after a while: make sure it goes */
            kill(z[i].pid, SIGKILL);
        }

        i++;
    }

    if (pool->zombies.nelts && !pool->reap_ev.timer_set) {
        ngx_add_timer(&pool->reap_ev, 10);
    }
}


static void
ngx_http_sbx_helper_gone(ngx_http_sbx_helper_t *h, ngx_uint_t why)
{
    ngx_uint_t              was, i, n;
    ngx_http_sbx_call_t    *call;
    ngx_http_sbx_pool_t    *pool = h->pool;
    ngx_http_sbx_slot_t     slots[NGX_HTTP_SBX_MAX_PIPELINE];
    ngx_http_sbx_zombie_t  *z;

    was = h->state;

    if (was == NGX_HTTP_SBX_H_DEAD) {
        return;
    }

    h->state = NGX_HTTP_SBX_H_DEAD;

    if (h->timer.timer_set) {
        ngx_del_timer(&h->timer);
    }

    if (h->c) {
        ngx_close_connection(h->c);
        h->c = NULL;
    }

    if (why != NGX_HTTP_SBX_GONE_RECYCLED) {
        kill(h->pid, SIGKILL);
    }

    if (was != NGX_HTTP_SBX_H_STARTING) {
        pool->alive--;
    }

    z = ngx_array_push(&pool->zombies);
    if (z) {
        z->pid = h->pid;
        z->why = why;
        z->served = h->served;
        z->tries = 0;
    }

    ngx_http_sbx_reap(&pool->reap_ev);

    n = h->nslots;
    ngx_memcpy(slots, h->slots, n * sizeof(ngx_http_sbx_slot_t));

    h->nslots = 0;
    h->nwritten = 0;
    h->wslot = 0;
    h->obuf = NULL;

    if (h->ocopy) {
        ngx_free(h->ocopy);
        h->ocopy = NULL;
    }

    for (i = 0; i < n; i++) {
        if (slots[i].call) {
            slots[i].call->helper = NULL;
        }
    }

    call = n ? slots[0].call : NULL;

    if (why == NGX_HTTP_SBX_GONE_EXITING) {
        for (i = 0; i < n; i++) {
            if (slots[i].call) {
                ngx_http_sbx_call_finish(slots[i].call,
                                         NGX_HTTP_SBX_CALL_DIED);
            }
        }

        return;
    }

    /* the calls behind the running one never started: they go first */
    for (i = n; i > 1; i--) {
        if (slots[i - 1].call) {
            ngx_http_sbx_requeue(pool, slots[i - 1].call);
        }
    }

    /* a helper that never became ready backs off; others come back now */
    if (was == NGX_HTTP_SBX_H_STARTING) {
        ngx_add_timer(&h->respawn_ev, h->backoff);
        h->backoff = ngx_min(h->backoff * 2, NGX_HTTP_SBX_BACKOFF_MAX);

    } else {
        if (pool->deaths_sec != ngx_time()) {
            pool->deaths_sec = ngx_time();
            pool->deaths = 0;
        }

        if (why != NGX_HTTP_SBX_GONE_RECYCLED
            && why != NGX_HTTP_SBX_GONE_DROPPED
            && ++pool->deaths > 10 * pool->size)
        {
            /* a crash loop: respawn at a bounded rate */
            ngx_add_timer(&h->respawn_ev, 1000);

        } else if (ngx_http_sbx_helper_spawn(h) != NGX_OK) {
            ngx_add_timer(&h->respawn_ev, h->backoff);
        }
    }

    if (call) {
        ngx_http_sbx_call_finish(call, why == NGX_HTTP_SBX_GONE_KILLED
                                       ? NGX_HTTP_SBX_CALL_KILLED
                                       : NGX_HTTP_SBX_CALL_DIED);
    }

    /*
     * requeued calls may run elsewhere now; with no helper left that could
     * start, waiting calls fail closed
     */
    ngx_http_sbx_dispatch(pool);
}


static void
ngx_http_sbx_helper_respawn(ngx_event_t *ev)
{
    ngx_http_sbx_helper_t  *h = ev->data;

    if (h->state != NGX_HTTP_SBX_H_DEAD || ngx_exiting || ngx_quit) {
        return;
    }

    if (ngx_http_sbx_helper_spawn(h) != NGX_OK) {
        ngx_add_timer(&h->respawn_ev, h->backoff);
        h->backoff = ngx_min(h->backoff * 2, NGX_HTTP_SBX_BACKOFF_MAX);
    }
}


static void
ngx_http_sbx_helper_timeout(ngx_event_t *ev)
{
    ngx_http_sbx_helper_t  *h = ev->data;

    if (h->state == NGX_HTTP_SBX_H_STARTING) {
        ngx_log_error(NGX_LOG_ERR, h->pool->log, 0,
                      "sbx: helper %P of pool \"%V\" did not become ready "
                      "in time, killed", h->pid, &h->pool->name);
        ngx_http_sbx_helper_gone(h, NGX_HTTP_SBX_GONE_FATAL);
        return;
    }

    if (h->nslots && h->slots[0].call) {
        ngx_log_error(NGX_LOG_ERR, h->pool->log, 0,
                      "sbx: helper %P of pool \"%V\" killed: connector "
                      "\"%V\" ran past its timeout of %Mms",
                      h->pid, &h->pool->name, &h->slots[0].connector->name,
                      h->slots[0].connector->timeout);

    } else {
        ngx_log_error(NGX_LOG_ERR, h->pool->log, 0,
                      "sbx: helper %P of pool \"%V\" killed: an abandoned "
                      "call ran past its timeout", h->pid, &h->pool->name);
    }

    ngx_http_sbx_helper_gone(h, NGX_HTTP_SBX_GONE_KILLED);
}


static void
ngx_http_sbx_helper_write(ngx_event_t *wev)
{
    ssize_t                 n;
    ngx_http_sbx_call_t    *call;
    ngx_connection_t       *c = wev->data;
    ngx_http_sbx_helper_t  *h = c->data;

    for ( ;; ) {

        while (h->obuf && h->osent < h->olen) {
            n = write(c->fd, h->obuf + h->osent, h->olen - h->osent);

            if (n > 0) {
                h->osent += n;
                continue;
            }

            if (n == -1 && ngx_errno == NGX_EINTR) {
                continue;
            }

            if (n == -1 && ngx_errno == NGX_EAGAIN) {
                wev->ready = 0;

                if (ngx_handle_write_event(wev, 0) != NGX_OK) {
                    ngx_http_sbx_helper_gone(h, NGX_HTTP_SBX_GONE_EOF);
                }

                return;
            }

            /* the helper is gone: its read side reports why */
            ngx_http_sbx_helper_gone(h, NGX_HTTP_SBX_GONE_EOF);
            return;
        }

        if (h->obuf && h->wslot) {
            h->nwritten++;
        }

        if (h->ocopy) {
            ngx_free(h->ocopy);
            h->ocopy = NULL;
        }

        h->obuf = NULL;
        h->wslot = 0;

        if (h->state == NGX_HTTP_SBX_H_STARTING || h->nwritten >= h->nslots) {
            return;
        }

        /* the next pipelined call (unsent calls are never abandoned) */
        call = h->slots[h->nwritten].call;

        h->obuf = call->out->pos;
        h->olen = call->out->last - call->out->pos;
        h->osent = 0;
        h->wslot = 1;
    }
}


/* the deadline of the call the helper runs now */

static void
ngx_http_sbx_arm_head(ngx_http_sbx_helper_t *h)
{
    ngx_msec_t  t;

    if (h->timer.timer_set) {
        ngx_del_timer(&h->timer);
    }

    if (h->nslots == 0) {
        h->state = NGX_HTTP_SBX_H_IDLE;
        return;
    }

    h->state = NGX_HTTP_SBX_H_BUSY;
    h->head_start = ngx_current_msec;

    /* the helper stops the script at the deadline; this is the backstop */
    t = h->slots[0].connector->timeout;
    ngx_add_timer(&h->timer, t + 50 + t / 10);
}


static void
ngx_http_sbx_helper_complete(ngx_http_sbx_helper_t *h, sbx_frame_hdr_t *fh,
    u_char *payload)
{
    uint32_t              cpu_ms;
    ngx_pid_t             pid;
    ngx_http_sbx_call_t  *call;
    ngx_http_sbx_pool_t  *pool = h->pool;

    call = h->slots[0].call;

    h->nslots--;
    h->nwritten--;
    ngx_memmove(&h->slots[0], &h->slots[1],
                h->nslots * sizeof(ngx_http_sbx_slot_t));

    h->served++;

    /* outcome u8, instructions u64, memory u64, time u32, cpu u32 */
    cpu_ms = 0;

    if (fh->len >= 25) {
        ngx_memcpy(&cpu_ms, payload + 21, 4);
    }

    if ((pool->max_requests && h->served >= pool->max_requests)
        || cpu_ms > NGX_HTTP_SBX_CPU_RECYCLE_MS)
    {
        h->recycle = 1;
    }

    if ((fh->flags & SBX_RESULT_RECYCLE) && !h->recycle) {
        ngx_log_error(NGX_LOG_INFO, pool->log, 0,
                      "sbx: helper %P of pool \"%V\" asks to be recycled: "
                      "its heap outside Lua grew (buffers lua-cjson left "
                      "behind on failed calls)", h->pid, &pool->name);
        h->recycle = 1;
    }

    ngx_http_sbx_arm_head(h);

    pid = h->pid;

    if (call) {
        call->helper = NULL;
        call->result = ngx_pnalloc(call->request->pool, fh->len);

        if (call->result == NULL) {
            ngx_http_sbx_call_finish(call, NGX_HTTP_SBX_CALL_DIED);

        } else {
            ngx_memcpy(call->result, payload, fh->len);
            call->result_len = fh->len;
            call->helper_pid = pid;
            ngx_http_sbx_call_finish(call, SBX_OUT_RESPONSE);
        }
    }

    /* finishing the call may have ended this helper: then stop here */
    if (h->pid != pid || h->state == NGX_HTTP_SBX_H_DEAD) {
        return;
    }

    if (h->recycle && h->nslots == 0) {
        ngx_http_sbx_helper_gone(h, NGX_HTTP_SBX_GONE_RECYCLED);
        return;
    }

    ngx_http_sbx_dispatch(pool);
}


/* returns NGX_ERROR when the helper was dropped */

static ngx_int_t
ngx_http_sbx_helper_frame(ngx_http_sbx_helper_t *h, sbx_frame_hdr_t *fh,
    u_char *payload)
{
    sbx_rd_t   rd;
    sbx_str_t  msg;
    u_char     text[SBX_MAX_ERROR_MSG * 4 + 8];

    switch (fh->type) {

    case SBX_MSG_READY:
        if (h->state != NGX_HTTP_SBX_H_STARTING) {
            break;
        }

        if (h->timer.timer_set) {
            ngx_del_timer(&h->timer);
        }

        h->state = NGX_HTTP_SBX_H_IDLE;
        h->backoff = NGX_HTTP_SBX_BACKOFF_MIN;
        h->pool->alive++;

        ngx_log_debug2(NGX_LOG_DEBUG_HTTP, h->pool->log, 0,
                       "sbx: helper %P of pool \"%V\" ready",
                       h->pid, &h->pool->name);

        ngx_http_sbx_report(h->pool);
        ngx_http_sbx_dispatch(h->pool);
        return NGX_OK;

    case SBX_MSG_FATAL:
        sbx_rd_init(&rd, payload, fh->len);

        if (sbx_get_str(&rd, &msg) != 0) {
            msg.data = (const uint8_t *) "(unreadable message)";
            msg.len = sizeof("(unreadable message)") - 1;
        }

        *ngx_http_sbx_ipc_escape(text, text + sizeof(text) - 1, msg.data,
                                 ngx_min(msg.len, SBX_MAX_ERROR_MSG)) = '\0';

        ngx_log_error(NGX_LOG_ERR, h->pool->log, 0,
                      "sbx: helper %P of pool \"%V\" could not start: %s; "
                      "its connectors do not run unsandboxed",
                      h->pid, &h->pool->name, text);

        ngx_http_sbx_helper_gone(h, NGX_HTTP_SBX_GONE_FATAL);
        return NGX_ERROR;

    case SBX_MSG_RESULT:
        /* the result of the call it runs, which it must have received */
        if (h->state != NGX_HTTP_SBX_H_BUSY || h->nwritten == 0
            || fh->id != h->slots[0].id)
        {
            break;
        }

        ngx_http_sbx_helper_complete(h, fh, payload);

        return h->state == NGX_HTTP_SBX_H_DEAD ? NGX_ERROR : NGX_OK;
    }

    ngx_log_error(NGX_LOG_ERR, h->pool->log, 0,
                  "sbx: helper %P of pool \"%V\" broke the protocol "
                  "(frame type %ud), killed", h->pid, &h->pool->name,
                  (unsigned) fh->type);

    ngx_http_sbx_helper_gone(h, NGX_HTTP_SBX_GONE_BROKEN);

    return NGX_ERROR;
}


static void
ngx_http_sbx_helper_read(ngx_event_t *rev)
{
    size_t                  need, start;
    ssize_t                 n;
    u_char                 *p;
    ngx_pid_t               pid;
    sbx_frame_hdr_t         fh;
    ngx_connection_t       *c = rev->data;
    ngx_http_sbx_helper_t  *h = c->data;

    for ( ;; ) {
        if (h->ilen == h->isize) {
            /* a frame bigger than the buffer: grow to fit it */
            need = h->isize * 2;

            if (h->ilen >= SBX_FRAME_HDR_SIZE) {
                sbx_frame_hdr_read(h->ibuf, &fh);
                need = ngx_max(need, SBX_FRAME_HDR_SIZE + (size_t) fh.len);
            }

            p = ngx_alloc(need, h->pool->log);
            if (p == NULL) {
                ngx_http_sbx_helper_gone(h, NGX_HTTP_SBX_GONE_BROKEN);
                return;
            }

            ngx_memcpy(p, h->ibuf, h->ilen);
            ngx_free(h->ibuf);
            h->ibuf = p;
            h->isize = need;
        }

        n = read(c->fd, h->ibuf + h->ilen, h->isize - h->ilen);

        if (n == 0) {
            ngx_http_sbx_helper_gone(h, NGX_HTTP_SBX_GONE_EOF);
            return;
        }

        if (n == -1) {
            if (ngx_errno == NGX_EINTR) {
                continue;
            }

            if (ngx_errno == NGX_EAGAIN) {
                break;
            }

            ngx_http_sbx_helper_gone(h, NGX_HTTP_SBX_GONE_EOF);
            return;
        }

        h->ilen += n;

        /* handle every whole frame; keep a partial one at the start */
        start = 0;

        while (h->ilen - start >= SBX_FRAME_HDR_SIZE) {
            sbx_frame_hdr_read(h->ibuf + start, &fh);

            if (sbx_frame_hdr_check(&fh, NGX_HTTP_SBX_RESULT_MAX) != 0) {
                ngx_log_error(NGX_LOG_ERR, h->pool->log, 0,
                              "sbx: helper %P of pool \"%V\" sent a "
                              "malformed frame, killed", h->pid,
                              &h->pool->name);
                ngx_http_sbx_helper_gone(h, NGX_HTTP_SBX_GONE_BROKEN);
                return;
            }

            if (h->ilen - start < SBX_FRAME_HDR_SIZE + (size_t) fh.len) {
                break;
            }

            pid = h->pid;

            /*
             * a frame may end this helper (recycling, protocol error) and
             * start its successor in the same slot, with fresh buffers
             */
            if (ngx_http_sbx_helper_frame(h, &fh, h->ibuf + start
                                                  + SBX_FRAME_HDR_SIZE)
                != NGX_OK
                || h->pid != pid)
            {
                return;
            }

            start += SBX_FRAME_HDR_SIZE + fh.len;
        }

        if (start) {
            ngx_memmove(h->ibuf, h->ibuf + start, h->ilen - start);
            h->ilen -= start;
        }

        if (h->ilen < h->isize) {
            continue;
        }
    }

    if (ngx_handle_read_event(rev, 0) != NGX_OK) {
        ngx_http_sbx_helper_gone(h, NGX_HTTP_SBX_GONE_EOF);
    }
}


/* ---- calls ---- */

static void
ngx_http_sbx_assign(ngx_http_sbx_helper_t *h, ngx_http_sbx_call_t *call)
{
    ngx_http_sbx_slot_t       *slot;
    ngx_http_sbx_connector_t  *c = call->connector;

    slot = &h->slots[h->nslots++];
    slot->call = call;
    slot->connector = c;
    slot->id = ++h->next_id;

    call->helper = h;
    call->helper_pid = h->pid;
    call->id = slot->id;
    call->start = ngx_current_msec;

    sbx_frame_hdr_write(call->out->pos,
                        (uint32_t) (call->out->last - call->out->pos
                                    - SBX_FRAME_HDR_SIZE),
                        SBX_MSG_CALL, (uint16_t) call->hook, call->id,
                        (uint32_t) c->index);

    if (h->nslots == 1) {
        ngx_http_sbx_arm_head(h);
    }

    if (h->obuf == NULL) {
        ngx_http_sbx_helper_write(h->c->write);
    }
}


/*
 * A helper for a call: an idle one, else a busy one to pipeline to.  A call
 * taken from the queue may always be pipelined (it waits either way); a new
 * one only while fewer than queue= calls wait.
 */

static ngx_http_sbx_helper_t *
ngx_http_sbx_idle_helper(ngx_http_sbx_pool_t *pool, ngx_flag_t queued)
{
    ngx_uint_t              i, room;
    ngx_http_sbx_helper_t  *h, *best;

    best = NULL;
    room = queued || ngx_http_sbx_waiting(pool) < pool->queue_max;

    for (i = 0; i < pool->size; i++) {
        h = &pool->helpers[i];

        if (h->recycle) {
            continue;
        }

        if (h->state == NGX_HTTP_SBX_H_IDLE) {
            return h;
        }

        /*
         * pipelining: never behind a call that is already taking long, and
         * never past the helper's max_requests
         */
        if (!room
            || h->state != NGX_HTTP_SBX_H_BUSY
            || h->nslots >= pool->pipeline
            || ngx_current_msec - h->head_start > NGX_HTTP_SBX_PIPELINE_AGE
            || (pool->max_requests
                && h->served + h->nslots >= pool->max_requests))
        {
            continue;
        }

        if (best == NULL || h->nslots < best->nslots) {
            best = h;
        }
    }

    return best;
}


static void
ngx_http_sbx_requeue(ngx_http_sbx_pool_t *pool, ngx_http_sbx_call_t *call)
{
    call->helper = NULL;
    call->queued = 1;

    ngx_queue_insert_head(&pool->queue, &call->queue);
    pool->queued++;

    if (!call->wait_ev.timer_set) {
        ngx_add_timer(&call->wait_ev, ngx_max(call->connector->timeout,
                                              1000));
    }
}


static void
ngx_http_sbx_dispatch(ngx_http_sbx_pool_t *pool)
{
    ngx_uint_t              i, starting;
    ngx_queue_t            *q;
    ngx_http_sbx_call_t    *call;
    ngx_http_sbx_helper_t  *h;

    while (!ngx_queue_empty(&pool->queue)) {
        h = ngx_http_sbx_idle_helper(pool, 1);

        if (h == NULL) {
            break;
        }

        q = ngx_queue_head(&pool->queue);
        ngx_queue_remove(q);
        pool->queued--;

        call = ngx_queue_data(q, ngx_http_sbx_call_t, queue);
        call->queued = 0;

        if (call->wait_ev.timer_set) {
            ngx_del_timer(&call->wait_ev);
        }

        ngx_http_sbx_assign(h, call);
    }

    if (pool->alive == 0 && !ngx_queue_empty(&pool->queue)) {
        starting = 0;

        for (i = 0; i < pool->size; i++) {
            if (pool->helpers[i].state == NGX_HTTP_SBX_H_STARTING) {
                starting = 1;
            }
        }

        if (!starting) {
            /* nothing can run them: fail closed, now */
            while (!ngx_queue_empty(&pool->queue)) {
                q = ngx_queue_head(&pool->queue);
                ngx_queue_remove(q);
                pool->queued--;

                call = ngx_queue_data(q, ngx_http_sbx_call_t, queue);
                call->queued = 0;

                if (call->wait_ev.timer_set) {
                    ngx_del_timer(&call->wait_ev);
                }

                ngx_http_sbx_call_finish(call,
                                         NGX_HTTP_SBX_CALL_UNAVAILABLE);
            }
        }
    }

    ngx_http_sbx_report(pool);
}


static void
ngx_http_sbx_call_finish(ngx_http_sbx_call_t *call, ngx_uint_t outcome)
{
    ngx_http_sbx_ctx_t  *ctx;
    ngx_http_request_t  *r = call->request;

    call->outcome = outcome;
    call->helper = NULL;

    if (call->wait_ev.timer_set) {
        ngx_del_timer(&call->wait_ev);
    }

    if (r == NULL) {
        return;
    }

    call->request = NULL;

    /* the audit's "helper" and "helper_ms" */
    ctx = ngx_http_get_module_ctx(r, ngx_http_sbx_module);

    if (ctx) {
        ctx->waiting = 0;
        ctx->helper_pid = call->helper_pid;

        if (call->start) {
            ctx->helper_ms += ngx_current_msec - call->start;
        }
    }

    /* the request outlives the call from here on */
    call->done(r, call);
}


static void
ngx_http_sbx_call_wait_timeout(ngx_event_t *ev)
{
    ngx_http_sbx_call_t  *call = ev->data;
    ngx_http_sbx_pool_t  *pool = call->connector->pool;

    if (!call->queued) {
        return;
    }

    ngx_queue_remove(&call->queue);
    call->queued = 0;
    pool->queued--;

    ngx_log_error(NGX_LOG_WARN, pool->log, 0,
                  "sbx: a call of connector \"%V\" waited %Mms for a helper "
                  "of pool \"%V\", rejected", &call->connector->name,
                  call->connector->timeout, &pool->name);

    ngx_http_sbx_report(pool);
    ngx_http_sbx_call_finish(call, NGX_HTTP_SBX_CALL_OVERLOADED);
}


/*
 * Starts a call.  Returns NGX_AGAIN when call->done will be called later,
 * NGX_DECLINED with call->outcome set when the call cannot be taken now
 * (queue full: NGX_HTTP_SBX_CALL_OVERLOADED; no helper could start:
 * NGX_HTTP_SBX_CALL_UNAVAILABLE), NGX_ERROR on allocation failure.
 */

ngx_int_t
ngx_http_sbx_call_start(ngx_http_request_t *r, ngx_http_sbx_call_t *call)
{
    ngx_uint_t              i, possible;
    ngx_pool_cleanup_t     *cln;
    ngx_http_sbx_pool_t    *pool = call->connector->pool;
    ngx_http_sbx_helper_t  *h;

    call->request = r;

    call->wait_ev.handler = ngx_http_sbx_call_wait_timeout;
    call->wait_ev.data = call;
    call->wait_ev.log = r->connection->log;

    if (pool->helpers == NULL) {
        call->outcome = NGX_HTTP_SBX_CALL_UNAVAILABLE;
        return NGX_DECLINED;
    }

    cln = ngx_pool_cleanup_add(r->pool, 0);
    if (cln == NULL) {
        return NGX_ERROR;
    }

    cln->handler = ngx_http_sbx_call_cleanup;
    cln->data = call;

    h = ngx_http_sbx_idle_helper(pool, 0);

    if (h) {
        ngx_http_sbx_assign(h, call);
        return NGX_AGAIN;
    }

    possible = 0;

    for (i = 0; i < pool->size; i++) {
        if (pool->helpers[i].state != NGX_HTTP_SBX_H_DEAD) {
            possible = 1;
            break;
        }
    }

    if (!possible) {
        call->request = NULL;
        call->outcome = NGX_HTTP_SBX_CALL_UNAVAILABLE;
        return NGX_DECLINED;
    }

    if (ngx_http_sbx_waiting(pool) >= pool->queue_max) {
        call->request = NULL;
        call->outcome = NGX_HTTP_SBX_CALL_OVERLOADED;
        return NGX_DECLINED;
    }

    ngx_queue_insert_tail(&pool->queue, &call->queue);
    call->queued = 1;
    pool->queued++;

    ngx_add_timer(&call->wait_ev, ngx_max(call->connector->timeout, 1000));

    ngx_http_sbx_report(pool);

    return NGX_AGAIN;
}


/* the request is going away: detach its call from the pool */

void
ngx_http_sbx_call_cancel(ngx_http_sbx_call_t *call)
{
    ngx_uint_t              i;
    ngx_http_sbx_pool_t    *pool = call->connector->pool;
    ngx_http_sbx_helper_t  *h;

    call->request = NULL;

    if (call->wait_ev.timer_set) {
        ngx_del_timer(&call->wait_ev);
    }

    if (call->queued) {
        ngx_queue_remove(&call->queue);
        call->queued = 0;
        pool->queued--;
        ngx_http_sbx_report(pool);
        return;
    }

    h = call->helper;

    if (h == NULL) {
        return;
    }

    for (i = 0; i < h->nslots; i++) {
        if (h->slots[i].call == call) {
            break;
        }
    }

    if (i == h->nslots) {
        return;
    }

    call->helper = NULL;

    if (i < h->nwritten) {
        /* sent: let it finish (its deadline still guards it), drop it */
        h->slots[i].call = NULL;
        return;
    }

    if (i == h->nwritten && h->wslot && h->osent) {
        /*
         * Partly sent, from the request's memory: the rest is sent from a
         * copy, the helper runs the call and its answer is dropped.  The
         * helper and the calls it has besides this one go on: a client
         * that hangs up must not fail another client's call.
         */
        h->slots[i].call = NULL;

        if (h->ocopy == NULL) {
            h->ocopy = ngx_alloc(h->olen - h->osent, pool->log);

            if (h->ocopy == NULL) {
                ngx_http_sbx_helper_gone(h, NGX_HTTP_SBX_GONE_DROPPED);
                return;
            }

            ngx_memcpy(h->ocopy, h->obuf + h->osent, h->olen - h->osent);
            h->obuf = h->ocopy;
            h->olen -= h->osent;
            h->osent = 0;
        }

        return;
    }

    /* not sent at all: forget it */
    if (i == h->nwritten && h->wslot) {
        h->obuf = NULL;
        h->wslot = 0;
    }

    h->nslots--;
    ngx_memmove(&h->slots[i], &h->slots[i + 1],
                (h->nslots - i) * sizeof(ngx_http_sbx_slot_t));

    if (i == 0) {
        /* it was next to run (nothing was sent yet) */
        ngx_http_sbx_arm_head(h);
    }

    if (h->obuf == NULL) {
        ngx_http_sbx_helper_write(h->c->write);
    }
}


static void
ngx_http_sbx_call_cleanup(void *data)
{
    ngx_http_sbx_call_t  *call = data;

    if (call->request || call->queued || call->helper) {
        ngx_http_sbx_call_cancel(call);
    }
}
