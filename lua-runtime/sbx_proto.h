/*
 * sbx_proto.h: the wire protocol between an nginx worker and its
 * sbx-lua-helper processes.  This header is the whole contract between the
 * nginx glue (ngx_sbx_module/) and the engine (lua-runtime/): it includes no
 * nginx or Lua header.
 *
 * Transport: a SOCK_STREAM socketpair; the helper's end is always fd 3.
 * Every message is a frame: a 16-byte header followed by `len` payload
 * bytes.  Both ends are on the same host, so integers are host order.
 * A receiver checks `len` against its cap before allocating anything and
 * treats every byte from the peer as hostile: all reads are bounds checked.
 *
 *   worker -> helper   SBX_MSG_INIT    once, right after spawn
 *   helper -> worker   SBX_MSG_READY   scripts loaded, sandbox installed
 *   helper -> worker   SBX_MSG_FATAL   set-up failed (message), then exit
 *   worker -> helper   SBX_MSG_CALL    run one hook of one connector
 *   helper -> worker   SBX_MSG_RESULT  the hook's outcome
 *
 * A helper serves one CALL at a time; the worker may write the next CALL
 * before the previous RESULT arrived (it waits in the socket), and RESULTs
 * come back in CALL order.
 */

#ifndef SBX_PROTO_H
#define SBX_PROTO_H

#include <stddef.h>
#include <stdint.h>


#define SBX_CHANNEL_FD          3

#define SBX_FRAME_HDR_SIZE      16
#define SBX_FRAME_MAX           (256 * 1024 * 1024)

#define SBX_MSG_INIT            1
#define SBX_MSG_READY           2
#define SBX_MSG_FATAL           3
#define SBX_MSG_CALL            4
#define SBX_MSG_RESULT          5

/* SBX_MSG_CALL flags: which hook */
#define SBX_HOOK_REQUEST        1
#define SBX_HOOK_RESPONSE       2

/*
 * SBX_MSG_RESULT flags: the CALL's, and this bit when the helper asks to
 * be replaced once it has answered (its heap outside Lua grew)
 */
#define SBX_RESULT_RECYCLE      0x8000

/* hooks a script defines (`check` reports them, the worker records them) */
#define SBX_HAS_REQUEST         1
#define SBX_HAS_RESPONSE        2

/* capabilities: bit per module a connector may be given */
#define SBX_CAP_JSON            0x0001
#define SBX_CAP_BASE64          0x0002
#define SBX_CAP_HEX             0x0004
#define SBX_CAP_SHA256          0x0008
#define SBX_CAP_HMAC            0x0010
#define SBX_CAP_LOG             0x0020

/* RESULT outcome */
#define SBX_OUT_RESPONSE        1   /* a response table: status, headers, body */
#define SBX_OUT_REQUEST         2   /* the (changed) request, to go upstream */
#define SBX_OUT_NOHOOK          3   /* the script has no such hook */
#define SBX_OUT_SCRIPT_ERROR    10  /* runtime error raised by the script */
#define SBX_OUT_BAD_RETURN      11  /* the hook returned an invalid value */
#define SBX_OUT_INSTRUCTIONS    12  /* instruction budget exhausted */
#define SBX_OUT_MEMORY          13  /* memory cap hit */
#define SBX_OUT_TIMEOUT         14  /* wall-clock deadline passed */

/* log levels of lines a script wrote (print, log capability) */
#define SBX_LOG_INFO            1
#define SBX_LOG_WARN            2
#define SBX_LOG_ERR             3

/* bounds the helper enforces and the worker checks again */
#define SBX_MAX_HEADERS         100
#define SBX_MAX_HEADER_NAME     256
#define SBX_MAX_HEADER_VALUE    8192
#define SBX_MAX_LOG_LINES       20
#define SBX_MAX_LOG_BYTES       4096
#define SBX_MAX_ERROR_MSG       512
#define SBX_MAX_SCRIPT_SIZE     (1024 * 1024)
#define SBX_MAX_CONNECTORS      1024


typedef struct {
    uint32_t            len;
    uint16_t            type;
    uint16_t            flags;
    uint32_t            id;
    uint32_t            aux;
} sbx_frame_hdr_t;


typedef struct {
    const uint8_t      *data;
    size_t              len;
} sbx_str_t;


typedef struct {
    sbx_str_t           name;
    sbx_str_t           value;
} sbx_header_t;


/*
 * Writer.  With start == NULL it only measures: `need` is the size the
 * payload will take.  Writes past `end` set `overflow`.
 */
typedef struct {
    uint8_t            *start;
    uint8_t            *pos;
    uint8_t            *end;
    size_t              need;
    int                 overflow;
} sbx_wr_t;


/* Reader: every get fails (returns -1 and sets err) past `end`. */
typedef struct {
    const uint8_t      *pos;
    const uint8_t      *end;
    int                 err;
} sbx_rd_t;


/*
 * INIT payload:
 *   u64 address-space limit (0: none), u32 flags, u32 nconnectors, then per
 *   connector: str name, str chunkname, str source, u32 capabilities,
 *   u64 memory limit, u64 instruction limit, u32 timeout (ms).
 *
 * CALL payload (aux = connector index, flags = hook):
 *   str method, str uri, str args, str request id, str client ip,
 *   str country, str continent, u32 nheaders, headers, u8 has body, str body,
 *   and for SBX_HOOK_RESPONSE: u32 status, u32 nheaders, headers,
 *   u8 has body, str body.
 *
 * "u8 has body, str body" is always both fields: has body 0 means no body
 * (nil in Lua) and comes with an empty str.
 *
 * RESULT payload:
 *   u8 outcome, u64 instructions, u64 memory peak, u32 time (us),
 *   u32 helper cpu total (ms), u32 nlogs, per log: u8 level, str line,
 *   then for SBX_OUT_RESPONSE: u32 status, u32 nheaders, headers,
 *     u8 has body, str body;
 *   for SBX_OUT_REQUEST: str uri, str args, u32 nheaders, headers,
 *     u8 has body, str body;
 *   for errors: str message.
 */

void sbx_frame_hdr_write(uint8_t *p, uint32_t len, uint16_t type,
    uint16_t flags, uint32_t id, uint32_t aux);
void sbx_frame_hdr_read(const uint8_t *p, sbx_frame_hdr_t *h);
int sbx_frame_hdr_check(const sbx_frame_hdr_t *h, uint32_t max);

void sbx_wr_init(sbx_wr_t *w, uint8_t *buf, size_t size);
void sbx_put_u8(sbx_wr_t *w, uint8_t v);
void sbx_put_u32(sbx_wr_t *w, uint32_t v);
void sbx_put_u64(sbx_wr_t *w, uint64_t v);
void sbx_put_str(sbx_wr_t *w, const void *data, size_t len);

void sbx_rd_init(sbx_rd_t *r, const uint8_t *buf, size_t len);
int sbx_get_u8(sbx_rd_t *r, uint8_t *v);
int sbx_get_u32(sbx_rd_t *r, uint32_t *v);
int sbx_get_u64(sbx_rd_t *r, uint64_t *v);
int sbx_get_str(sbx_rd_t *r, sbx_str_t *s);
int sbx_get_count(sbx_rd_t *r, uint32_t *n, uint32_t max, size_t min_item);

int sbx_header_name_valid(const uint8_t *p, size_t len);
int sbx_header_value_valid(const uint8_t *p, size_t len);

const char *sbx_outcome_name(unsigned outcome);


#endif /* SBX_PROTO_H */
