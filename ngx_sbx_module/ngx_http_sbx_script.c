/*
 * ngx_http_sbx_script.c: loading a connector's script at configuration
 * time: size cap, SHA-256 digest and pin, then the same checks connector
 * authors run (`sbx-lua-helper check`: text-only compile, reads of globals
 * the script is not given, its top level run once under its limits), in
 * the helper binary, sandboxed.  The source is kept in the configuration
 * and handed to helpers over their channel: helpers never open files.
 */

#define _GNU_SOURCE

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <spawn.h>
#include <sys/wait.h>
#include <openssl/evp.h>

#include "ngx_http_sbx_module.h"


#define NGX_HTTP_SBX_CHECK_OUTPUT  8192


static ngx_int_t
ngx_http_sbx_read_script(ngx_conf_t *cf, ngx_http_sbx_connector_t *c)
{
    ssize_t          n;
    ngx_fd_t         fd;
    ngx_file_t       file;
    ngx_file_info_t  fi;

    fd = ngx_open_file(c->script.data, NGX_FILE_RDONLY, NGX_FILE_OPEN, 0);
    if (fd == NGX_INVALID_FILE) {
        ngx_log_error(NGX_LOG_EMERG, cf->log, ngx_errno,
                      ngx_open_file_n " \"%V\" failed (\"script\" of "
                      "sbx_connector \"%V\" in %s:%ui)", &c->script, &c->name,
                      c->conf_file, c->script_line);
        return NGX_ERROR;
    }

    if (ngx_fd_info(fd, &fi) == NGX_FILE_ERROR) {
        ngx_log_error(NGX_LOG_EMERG, cf->log, ngx_errno,
                      ngx_fd_info_n " \"%V\" failed", &c->script);
        ngx_close_file(fd);
        return NGX_ERROR;
    }

    if (!ngx_is_file(&fi) || ngx_file_size(&fi) > SBX_MAX_SCRIPT_SIZE) {
        ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                      "script \"%V\" is not a regular file of at most %d "
                      "bytes (\"script\" of sbx_connector \"%V\" in %s:%ui)",
                      &c->script, SBX_MAX_SCRIPT_SIZE, &c->name,
                      c->conf_file, c->script_line);
        ngx_close_file(fd);
        return NGX_ERROR;
    }

    c->source.len = (size_t) ngx_file_size(&fi);
    c->source.data = ngx_pnalloc(cf->pool, c->source.len + 1);
    if (c->source.data == NULL) {
        ngx_close_file(fd);
        return NGX_ERROR;
    }

    ngx_memzero(&file, sizeof(ngx_file_t));
    file.fd = fd;
    file.name = c->script;
    file.log = cf->log;

    n = c->source.len ? ngx_read_file(&file, c->source.data, c->source.len, 0)
                      : 0;

    ngx_close_file(fd);

    if (n != (ssize_t) c->source.len) {
        ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                      "script \"%V\" could not be read whole", &c->script);
        return NGX_ERROR;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_sbx_digest(ngx_conf_t *cf, ngx_http_sbx_connector_t *c)
{
    unsigned int  len;

    if (EVP_Digest(c->source.data, c->source.len, c->digest, &len,
                   EVP_sha256(), NULL) != 1 || len != 32)
    {
        ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                      "EVP_Digest() failed for \"%V\"", &c->script);
        return NGX_ERROR;
    }

    c->digest_hex.data = ngx_pnalloc(cf->pool, 64);
    if (c->digest_hex.data == NULL) {
        return NGX_ERROR;
    }

    ngx_hex_dump(c->digest_hex.data, c->digest, 32);
    c->digest_hex.len = 64;

    if (c->pinned.len
        && ngx_strncmp(c->pinned.data, c->digest_hex.data, 64) != 0)
    {
        ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                      "script \"%V\" of sbx_connector \"%V\" does not match "
                      "its pin: \"sha256\" is %V but the file's digest is "
                      "%V in %s:%ui", &c->script, &c->name, &c->pinned,
                      &c->digest_hex, c->conf_file, c->sha256_line);
        return NGX_ERROR;
    }

    return NGX_OK;
}


/*
 * Runs `sbx-lua-helper check - ...` with the source on stdin.  Blocking:
 * this is configuration time.  The helper sandboxes itself before it
 * compiles or runs anything.
 */

static ngx_int_t
ngx_http_sbx_check(ngx_conf_t *cf, ngx_http_sbx_main_conf_t *smcf,
    ngx_http_sbx_connector_t *c)
{
    int                          in[2], out[2], status, rc, ok;
    char                        *argv[12], *envp[2];
    char                         caps[128], limits[128];
    u_char                      *p, *end, *line;
    pid_t                        pid;
    size_t                       sent, got;
    ssize_t                      n;
    ngx_str_t                   *names;
    ngx_uint_t                   i;
    posix_spawnattr_t            attr;
    posix_spawn_file_actions_t   fa;
    u_char                       buf[NGX_HTTP_SBX_CHECK_OUTPUT];

    if (access((char *) smcf->helper_path.data, X_OK) != 0) {
        ngx_log_error(NGX_LOG_EMERG, cf->log, ngx_errno,
                      "sbx helper \"%V\" is not executable (set "
                      "\"sbx_helper_path\" or run \"make\"), needed to "
                      "check the script of sbx_connector \"%V\" in %s:%ui",
                      &smcf->helper_path, &c->name, c->conf_file,
                      c->script_line);
        return NGX_ERROR;
    }

    p = (u_char *) caps;
    end = p + sizeof(caps) - 1;

    if (c->cap_names) {
        names = c->cap_names->elts;

        for (i = 0; i < c->cap_names->nelts; i++) {
            p = ngx_slprintf(p, end, "%s%V", i ? "," : "", &names[i]);
        }
    }

    *p = '\0';

    p = ngx_snprintf((u_char *) limits, sizeof(limits) - 1,
                     "memory=%uz,instructions=%ui,timeout=%Mms",
                     c->memory, c->instructions, c->timeout);
    *p = '\0';

    i = 0;
    argv[i++] = (char *) smcf->helper_path.data;
    argv[i++] = "check";
    argv[i++] = "-";
    argv[i++] = "--chunkname";
    argv[i++] = (char *) c->script.data;
    argv[i++] = "--limits";
    argv[i++] = limits;

    if (caps[0]) {
        argv[i++] = "--capabilities";
        argv[i++] = caps;
    }

    argv[i] = NULL;

    envp[0] = "TZ=UTC";
    envp[1] = NULL;

    /*
     * stdin is a socket, not a pipe: send(MSG_NOSIGNAL) gets EPIPE instead
     * of a SIGPIPE that would kill "nginx -t" when a broken helper exits
     * before it has read the script
     */
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, in) != 0) {
        ngx_log_error(NGX_LOG_EMERG, cf->log, ngx_errno,
                      "socketpair() failed");
        return NGX_ERROR;
    }

    if (pipe2(out, O_CLOEXEC) != 0) {
        ngx_log_error(NGX_LOG_EMERG, cf->log, ngx_errno, "pipe2() failed");
        close(in[0]);
        close(in[1]);
        return NGX_ERROR;
    }

    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, in[0], 0);
    posix_spawn_file_actions_adddup2(&fa, out[1], 1);
    posix_spawn_file_actions_adddup2(&fa, out[1], 2);
    posix_spawn_file_actions_addclosefrom_np(&fa, 3);

    posix_spawnattr_init(&attr);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK
                                    | POSIX_SPAWN_SETSIGDEF);
    {
        sigset_t  none, all;

        sigemptyset(&none);
        sigfillset(&all);
        posix_spawnattr_setsigmask(&attr, &none);
        posix_spawnattr_setsigdefault(&attr, &all);
    }

    rc = posix_spawn(&pid, argv[0], &fa, &attr, argv, envp);

    posix_spawn_file_actions_destroy(&fa);
    posix_spawnattr_destroy(&attr);

    close(in[0]);
    close(out[1]);

    if (rc != 0) {
        ngx_log_error(NGX_LOG_EMERG, cf->log, rc,
                      "posix_spawn(\"%V\") failed", &smcf->helper_path);
        close(in[1]);
        close(out[0]);
        return NGX_ERROR;
    }

    /* the helper reads all of stdin before it writes anything */
    for (sent = 0; sent < c->source.len; sent += n) {
        n = send(in[1], c->source.data + sent, c->source.len - sent,
                 MSG_NOSIGNAL);

        if (n <= 0) {
            if (n < 0 && ngx_errno == NGX_EINTR) {
                n = 0;
                continue;
            }

            break;
        }
    }

    close(in[1]);

    got = 0;

    for ( ;; ) {
        n = read(out[0], buf + got, sizeof(buf) - 1 - got);

        if (n < 0 && ngx_errno == NGX_EINTR) {
            continue;
        }

        if (n <= 0) {
            break;
        }

        got += n;

        if (got == sizeof(buf) - 1) {
            /* drain the rest */
            u_char  sink[512];

            while (read(out[0], sink, sizeof(sink)) > 0) { /* void */ }
            break;
        }
    }

    close(out[0]);

    while (waitpid(pid, &status, 0) == -1) {
        if (ngx_errno != NGX_EINTR) {
            ngx_log_error(NGX_LOG_EMERG, cf->log, ngx_errno,
                          "waitpid() failed");
            return NGX_ERROR;
        }
    }

    buf[got] = '\0';

    while (got && (buf[got - 1] == '\n' || buf[got - 1] == '\r')) {
        buf[--got] = '\0';
    }

    /*
     * Fail closed: only "SCRIPT: ok, hooks: ..." with exit code 0 passes,
     * not a helper that exits 0 without checking anything.
     */
    ok = got > c->script.len + sizeof(": ok, hooks:") - 1
         && ngx_strncmp(buf, c->script.data, c->script.len) == 0
         && ngx_strncmp(buf + c->script.len, ": ok, hooks:",
                        sizeof(": ok, hooks:") - 1) == 0
         && ngx_strchr(buf, '\n') == NULL;

    if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
        if (!ok) {
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "checking script \"%V\" of sbx_connector \"%V\" "
                          "failed: the helper \"%V\" exited without "
                          "reporting the check (expected \"%V: ok, "
                          "hooks: ...\", got \"%*s\") in %s:%ui",
                          &c->script, &c->name, &smcf->helper_path,
                          &c->script, ngx_min(got, 200), buf,
                          c->conf_file, c->script_line);
            return NGX_ERROR;
        }

        line = buf + c->script.len + sizeof(": ok, hooks:") - 1;

        if (ngx_strstr(line, " request")) {
            c->hooks |= SBX_HAS_REQUEST;
        }

        if (ngx_strstr(line, " response")) {
            c->hooks |= SBX_HAS_RESPONSE;
        }

        return NGX_OK;
    }

    if (WIFSIGNALED(status)) {
        ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                      "checking script \"%V\" of sbx_connector \"%V\" "
                      "failed: the helper was killed by signal %d%s in "
                      "%s:%ui", &c->script, &c->name, WTERMSIG(status),
                      WTERMSIG(status) == SIGSYS ? " (seccomp violation)"
                      : WTERMSIG(status) == SIGXCPU ? " (CPU time limit)"
                      : "", c->conf_file, c->script_line);
        return NGX_ERROR;
    }

    /* report each problem line the helper printed: "file:line: message" */
    for (line = buf; *line; line = p) {
        p = (u_char *) ngx_strchr(line, '\n');

        if (p) {
            *p++ = '\0';
        } else {
            p = line + ngx_strlen(line);
        }

        ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                      "script of sbx_connector \"%V\": %s in %s:%ui",
                      &c->name, line, c->conf_file, c->script_line);
    }

    if (got == 0) {
        ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                      "checking script \"%V\" of sbx_connector \"%V\" "
                      "failed: the helper exited with code %d in %s:%ui",
                      &c->script, &c->name, WEXITSTATUS(status),
                      c->conf_file, c->script_line);
    }

    return NGX_ERROR;
}


char *
ngx_http_sbx_script_load(ngx_conf_t *cf, ngx_http_sbx_main_conf_t *smcf,
    ngx_http_sbx_connector_t *c)
{
    if (ngx_http_sbx_read_script(cf, c) != NGX_OK
        || ngx_http_sbx_digest(cf, c) != NGX_OK
        || ngx_http_sbx_check(cf, smcf, c) != NGX_OK)
    {
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}
