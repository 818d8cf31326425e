/*
 * sbx_check.c: finds the globals a compiled script reads and writes, with
 * their lines, by walking the text-compiled chunk's own dump (lua_dump,
 * debug information kept).  Reads are GETTABUP on the upvalue named _ENV;
 * writes are SETTABUP on it; a read of a library followed at once by a
 * GETFIELD of the same register with a constant key (`os.execute`) is
 * reported with the field.
 *
 * The dump layout and opcodes are those of Lua 5.4 (ldump.c, lopcodes.h);
 * the header is checked so another version is refused, not misread.
 */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sbx_check.h"


#define SBX_OP_LOADK        3
#define SBX_OP_LOADKX       4
#define SBX_OP_LOADNIL      8
#define SBX_OP_GETUPVAL     9
#define SBX_OP_SETUPVAL     10
#define SBX_OP_GETTABUP     11
#define SBX_OP_GETTABLE     12
#define SBX_OP_GETFIELD     14
#define SBX_OP_SETTABUP     15
#define SBX_OP_SETTABLE     16
#define SBX_OP_SETI         17
#define SBX_OP_SETFIELD     18
#define SBX_OP_SELF         20
#define SBX_OP_MMBIN        46
#define SBX_OP_MMBINK       48
#define SBX_OP_CLOSE        54
#define SBX_OP_JMP          56
#define SBX_OP_TEST         66
#define SBX_OP_CALL         68
#define SBX_OP_RETURN1      72
#define SBX_OP_FORLOOP      73
#define SBX_OP_TFORLOOP     77
#define SBX_OP_SETLIST      78
#define SBX_OP_VARARG       80
#define SBX_OP_EXTRAARG     82

#define SBX_ABSLINEINFO     (-0x80)

#define SBX_GET_OP(i)       ((i) & 0x7f)
#define SBX_GET_A(i)        (((i) >> 7) & 0xff)
#define SBX_GET_B(i)        (((i) >> 16) & 0xff)
#define SBX_GET_C(i)        (((i) >> 24) & 0xff)
#define SBX_GET_BX(i)       ((i) >> 15)
#define SBX_GET_AX(i)       ((i) >> 7)

#define SBX_NREGS           256

#define SBX_MAX_DEPTH       250


typedef struct {
    const uint8_t      *p;
    const uint8_t      *end;
    int                 err;
    sbx_access_pt       cb;
    void               *data;
} sbx_dump_t;


typedef struct {
    const uint8_t      *s;
    size_t              len;
} sbx_kstr_t;


/*
 * With more than 256 constants, a global's name does not fit an operand:
 * the compiler loads _ENV with GETUPVAL and the name with LOADK (or
 * LOADKX), then uses GETTABLE/SETTABLE.  Registers are followed along the
 * code: which hold _ENV, which hold a constant.
 */

typedef struct {
    uint8_t             env[SBX_NREGS];
    int32_t             k[SBX_NREGS];
} sbx_regs_t;


static void
sbx_regs_reset(sbx_regs_t *r, unsigned from)
{
    for ( /* void */ ; from < SBX_NREGS; from++) {
        r->env[from] = 0;
        r->k[from] = -1;
    }
}


static size_t
sbx_varint(sbx_dump_t *d)
{
    size_t   x = 0;
    uint8_t  b;
    int      n = 0;

    do {
        if (d->p >= d->end || ++n > 10) {
            d->err = 1;
            return 0;
        }

        b = *d->p++;
        x = (x << 7) | (b & 0x7f);

    } while ((b & 0x80) == 0);

    return x;
}


static void
sbx_skip(sbx_dump_t *d, size_t n)
{
    if (d->err || (size_t) (d->end - d->p) < n) {
        d->err = 1;
        return;
    }

    d->p += n;
}


static uint8_t
sbx_byte(sbx_dump_t *d)
{
    if (d->err || d->p >= d->end) {
        d->err = 1;
        return 0;
    }

    return *d->p++;
}


static sbx_kstr_t
sbx_string(sbx_dump_t *d)
{
    size_t      size;
    sbx_kstr_t  s = { NULL, 0 };

    size = sbx_varint(d);

    if (size == 0 || d->err) {
        return s;
    }

    s.s = d->p;
    s.len = size - 1;
    sbx_skip(d, size - 1);

    return s;
}


static const sbx_kstr_t *
sbx_kname(const sbx_kstr_t *ks, size_t nk, size_t idx)
{
    return idx < nk && ks[idx].s ? &ks[idx] : NULL;
}


/* one instruction: reports global reads and writes, follows registers */

static void
sbx_scan(sbx_dump_t *d, sbx_regs_t *r, const uint8_t *code, size_t ncode,
    size_t i, uint32_t ins, size_t env, const sbx_kstr_t *ks, size_t nk,
    int line)
{
    unsigned           op, a, b, c;
    uint32_t           next;
    const sbx_kstr_t  *name = NULL, *field = NULL;

    op = SBX_GET_OP(ins);
    a = SBX_GET_A(ins);
    b = SBX_GET_B(ins);
    c = SBX_GET_C(ins);

    switch (op) {

    case SBX_OP_GETTABUP:
        if (b == env) {
            name = sbx_kname(ks, nk, c);
        }

        break;

    case SBX_OP_GETTABLE:
        if (r->env[b] && r->k[c] >= 0) {
            name = sbx_kname(ks, nk, (size_t) r->k[c]);
        }

        break;

    case SBX_OP_GETFIELD:
        if (r->env[b]) {
            name = sbx_kname(ks, nk, c);
        }

        break;

    case SBX_OP_SETTABUP:
        if (a == env && (name = sbx_kname(ks, nk, b)) != NULL) {
            d->cb(d->data, 1, (const char *) name->s, name->len, NULL, 0,
                  line);
        }

        return;

    case SBX_OP_SETTABLE:
        if (r->env[a] && r->k[b] >= 0
            && (name = sbx_kname(ks, nk, (size_t) r->k[b])) != NULL)
        {
            d->cb(d->data, 1, (const char *) name->s, name->len, NULL, 0,
                  line);
        }

        return;

    case SBX_OP_SETFIELD:
        if (r->env[a] && (name = sbx_kname(ks, nk, b)) != NULL) {
            d->cb(d->data, 1, (const char *) name->s, name->len, NULL, 0,
                  line);
        }

        return;

    case SBX_OP_GETUPVAL:
        r->env[a] = b == env;
        r->k[a] = -1;
        return;

    case SBX_OP_LOADK:
        r->env[a] = 0;
        r->k[a] = (int32_t) SBX_GET_BX(ins);
        return;

    case SBX_OP_LOADKX:
        r->env[a] = 0;
        r->k[a] = -1;

        if (i + 1 < ncode) {
            memcpy(&next, code + (i + 1) * 4, 4);

            if (SBX_GET_OP(next) == SBX_OP_EXTRAARG) {
                r->k[a] = (int32_t) SBX_GET_AX(next);
            }
        }

        return;

    /* instructions that write no register */
    case SBX_OP_SETUPVAL:
    case SBX_OP_SETI:
    case SBX_OP_CLOSE:
    case SBX_OP_SETLIST:
    case SBX_OP_EXTRAARG:
        return;

    /* instructions that may write a run of registers from A on */
    case SBX_OP_LOADNIL:
    case SBX_OP_SELF:
    case SBX_OP_CALL:
    case SBX_OP_VARARG:
        sbx_regs_reset(r, a);
        return;

    default:
        if ((op >= SBX_OP_MMBIN && op <= SBX_OP_MMBINK)
            || (op >= SBX_OP_JMP && op <= SBX_OP_TEST)
            || (op > SBX_OP_CALL && op <= SBX_OP_RETURN1))
        {
            return;
        }

        if (op >= SBX_OP_FORLOOP && op <= SBX_OP_TFORLOOP) {
            sbx_regs_reset(r, a);
            return;
        }

        r->env[a] = 0;
        r->k[a] = -1;
        return;
    }

    /* a read: GETTABUP, GETTABLE or GETFIELD into register A */

    r->env[a] = 0;
    r->k[a] = -1;

    if (name == NULL) {
        return;
    }

    /* `os.execute`: the next instruction reads a field of the result */
    if (i + 1 < ncode) {
        memcpy(&next, code + (i + 1) * 4, 4);

        if (SBX_GET_OP(next) == SBX_OP_GETFIELD && SBX_GET_B(next) == a) {
            field = sbx_kname(ks, nk, SBX_GET_C(next));

        } else if (SBX_GET_OP(next) == SBX_OP_GETTABLE
                   && SBX_GET_B(next) == a && r->k[SBX_GET_C(next)] >= 0)
        {
            field = sbx_kname(ks, nk, (size_t) r->k[SBX_GET_C(next)]);
        }
    }

    d->cb(d->data, 0, (const char *) name->s, name->len,
          field ? (const char *) field->s : NULL, field ? field->len : 0,
          line);
}


static int
sbx_function(sbx_dump_t *d, int depth)
{
    int               line, delta;
    size_t            ncode, nk, nup, nproto, nline, nabs, nloc, nupname, i;
    size_t            env, k;
    uint8_t           tag;
    uint32_t          ins;
    sbx_regs_t        regs;
    const uint8_t    *code, *lineinfo;
    sbx_kstr_t       *ks = NULL, *upnames = NULL;
    size_t           *abspc = NULL;
    int              *absline = NULL;
    int               linedefined, rc = -1;

    if (depth > SBX_MAX_DEPTH) {
        d->err = 1;
        return -1;
    }

    (void) sbx_string(d);                        /* source */
    linedefined = (int) sbx_varint(d);
    (void) sbx_varint(d);                        /* lastlinedefined */
    sbx_skip(d, 3);                              /* params, vararg, stack */

    ncode = sbx_varint(d);
    if (d->err || ncode > (size_t) (d->end - d->p) / 4) {
        d->err = 1;
        return -1;
    }

    code = d->p;
    sbx_skip(d, ncode * 4);

    nk = sbx_varint(d);
    if (d->err || nk > (size_t) (d->end - d->p)) {
        d->err = 1;
        return -1;
    }

    ks = calloc(nk ? nk : 1, sizeof(sbx_kstr_t));
    if (ks == NULL) {
        d->err = 1;
        return -1;
    }

    for (i = 0; i < nk && !d->err; i++) {
        tag = sbx_byte(d);

        switch (tag) {
        case 0x00: case 0x01: case 0x11:         /* nil, false, true */
            break;
        case 0x03: case 0x13:                    /* integer, float */
            sbx_skip(d, 8);
            break;
        case 0x04: case 0x14:                    /* short, long string */
            ks[i] = sbx_string(d);
            break;
        default:
            d->err = 1;
        }
    }

    nup = sbx_varint(d);
    sbx_skip(d, nup * 3);

    nproto = sbx_varint(d);
    for (i = 0; i < nproto && !d->err; i++) {
        if (sbx_function(d, depth + 1) != 0) {
            goto done;
        }
    }

    nline = sbx_varint(d);
    lineinfo = d->p;
    sbx_skip(d, nline);

    nabs = sbx_varint(d);
    if (d->err || nabs > (size_t) (d->end - d->p)) {
        d->err = 1;
        goto done;
    }

    abspc = calloc(nabs ? nabs : 1, sizeof(size_t));
    absline = calloc(nabs ? nabs : 1, sizeof(int));
    if (abspc == NULL || absline == NULL) {
        d->err = 1;
        goto done;
    }

    for (i = 0; i < nabs && !d->err; i++) {
        abspc[i] = sbx_varint(d);
        absline[i] = (int) sbx_varint(d);
    }

    nloc = sbx_varint(d);
    for (i = 0; i < nloc && !d->err; i++) {
        (void) sbx_string(d);
        (void) sbx_varint(d);
        (void) sbx_varint(d);
    }

    nupname = sbx_varint(d);
    if (d->err || nupname > (size_t) (d->end - d->p)) {
        d->err = 1;
        goto done;
    }

    upnames = calloc(nupname ? nupname : 1, sizeof(sbx_kstr_t));
    if (upnames == NULL) {
        d->err = 1;
        goto done;
    }

    for (i = 0; i < nupname && !d->err; i++) {
        upnames[i] = sbx_string(d);
    }

    if (d->err) {
        goto done;
    }

    /* which upvalue is _ENV */
    env = (size_t) -1;
    for (i = 0; i < nupname; i++) {
        if (upnames[i].len == 4 && memcmp(upnames[i].s, "_ENV", 4) == 0) {
            env = i;
            break;
        }
    }

    line = linedefined;
    k = 0;
    sbx_regs_reset(&regs, 0);

    for (i = 0; i < ncode; i++) {
        if (i < nline) {
            delta = (int8_t) lineinfo[i];

            if (delta != SBX_ABSLINEINFO) {
                line += delta;

            } else {
                while (k < nabs && abspc[k] < i) {
                    k++;
                }

                if (k < nabs && abspc[k] == i) {
                    line = absline[k];
                }
            }
        }

        if (env == (size_t) -1) {
            continue;
        }

        memcpy(&ins, code + i * 4, 4);
        sbx_scan(d, &regs, code, ncode, i, ins, env, ks, nk, line);
    }

    rc = 0;

done:

    free(ks);
    free(upnames);
    free(abspc);
    free(absline);

    return d->err ? -1 : rc;
}


int
sbx_check_dump(const uint8_t *dump, size_t len, sbx_access_pt cb,
    void *data)
{
    sbx_dump_t  d;

    /* "\x1bLua", version 5.4, format 0, LUAC_DATA, sizes 4 8 8 */
    static const uint8_t  hdr[] = {
        0x1b, 'L', 'u', 'a', 0x54, 0x00,
        0x19, 0x93, '\r', '\n', 0x1a, '\n', 4, 8, 8
    };

    if (len < sizeof(hdr) + 16 + 1 || memcmp(dump, hdr, sizeof(hdr)) != 0) {
        return -1;
    }

    d.p = dump + sizeof(hdr) + 16 + 1;   /* LUAC_INT, LUAC_NUM, nupvalues */
    d.end = dump + len;
    d.err = 0;
    d.cb = cb;
    d.data = data;

    return sbx_function(&d, 0);
}
