/*
 * vllm_router_policy.h: the C SDK for vllm-router policies (world
 * vllm:router-policy/policy@0.1.0), one header, no wit-bindgen needed.
 *
 * Write one function and include this header in exactly one .c file:
 *
 *     #define VR_POLICY_IMPLEMENTATION
 *     #include "vllm_router_policy.h"
 *     vr_decision vr_select(vr_request req, const vr_candidate *c, size_t n) {
 *         return vr_pick(c[0].id);
 *     }
 *
 * Optional hooks (define the macro before the include, then the function):
 *   VR_HAVE_INIT          const char *vr_init(const char *config, size_t len);
 *                         return NULL to accept, or an error message to refuse the load
 *   VR_HAVE_WORKERS       void vr_workers_changed(const vr_worker *w, size_t n);
 *   VR_HAVE_COMPLETE      void vr_on_complete(const vr_completion *done);
 *
 * What the header does for you (the pitfalls of the canonical ABI in C):
 *   - decodes the packed candidate and engine words into vr_candidate;
 *   - drops the borrowed request before select returns (the router traps with
 *     "borrow handles still remain at the end of the call" otherwise);
 *   - frees the lists and strings the router passed in (the export owns them);
 *   - strings returned by the request accessors are malloc'd and NUL-terminated: free
 *     them with free() (vr_str_free is the same).
 *
 * Build (zig from PyPI, see build.sh of `vllm-router policy new NAME --lang c`):
 *   python3 -m ziglang cc --target=wasm32-wasi -mexec-model=reactor -O2 -o core.wasm policy.c
 *   wasm-tools component embed wit --world policy core.wasm -o core-wit.wasm
 *   wasm-tools component new core-wit.wasm --adapt wasi_snapshot_preview1=adapter.wasm -o policy.wasm
 * (printf works: the adapter sends stdout/stderr to the router's log.)
 */
#ifndef VLLM_ROUTER_POLICY_H
#define VLLM_ROUTER_POLICY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef uint32_t vr_worker_id;
typedef uint32_t vr_request; /* borrowed handle, valid during vr_select only */

typedef enum { VR_ROLE_REGULAR = 0, VR_ROLE_PREFILL = 1, VR_ROLE_DECODE = 2 } vr_role;
typedef enum { VR_STAGE_REGULAR = 0, VR_STAGE_PREFILL = 1, VR_STAGE_DECODE = 2 } vr_stage;
typedef enum { VR_DEBUG = 0, VR_INFO = 1, VR_WARN = 2, VR_ERROR = 3 } vr_level;

/* Engine load scraped from the worker's vLLM /metrics (present == false: no sample). */
typedef struct {
    bool present;
    uint32_t running;           /* vllm:num_requests_running */
    uint32_t waiting;           /* vllm:num_requests_waiting */
    uint16_t kv_cache_permille; /* vllm:kv_cache_usage_perc, 0..1000 */
} vr_engine_load;

typedef struct {
    vr_worker_id id;
    uint32_t in_flight; /* requests this router dispatched and not finished */
    vr_engine_load engine;
} vr_candidate;

typedef struct { const char *ptr; size_t len; } vr_str; /* not NUL-terminated */

typedef struct {
    vr_worker_id id;
    vr_str url;
    vr_role role;
    bool has_dp_rank;
    uint32_t dp_rank;
    const vr_str *labels; /* 2 * n_labels: key, value, key, value, ... */
    size_t n_labels;
} vr_worker;

typedef struct {
    vr_worker_id worker;
    uint16_t status;      /* HTTP status, 0 when no response arrived */
    uint32_t latency_ms;  /* dispatch to end of body */
    bool has_first_byte;
    uint32_t first_byte_ms;
    vr_stage stage;
} vr_completion;

typedef struct {
    bool declined;
    vr_worker_id worker;
    const char *reason; /* static or long-lived string when declined */
} vr_decision;

static inline vr_decision vr_pick(vr_worker_id id) { vr_decision d = {false, id, NULL}; return d; }
static inline vr_decision vr_decline(const char *reason) { vr_decision d = {true, 0, reason}; return d; }

/* Request accessors: malloc'd NUL-terminated copies (free them), NULL when absent. */
char *vr_request_path(vr_request r);
char *vr_request_model(vr_request r);
char *vr_request_header(vr_request r, const char *name);
char *vr_request_body_field(vr_request r, const char *path);
char *vr_request_routing_text(vr_request r);
char *vr_request_id(vr_request r);
uint64_t vr_request_body_length(vr_request r);
vr_stage vr_request_stage(vr_request r);
static inline void vr_str_free(char *s) { free(s); }

/* Host functions. vr_log is rate-limited by the router (20 lines/s): rare events only. */
void vr_log(vr_level level, const char *msg);
uint64_t vr_now_ms(void);  /* ms since the router started, monotonic */
uint64_t vr_random(void);  /* 64 random bits, not for cryptography */

/* Read a top-level integer field of a flat JSON config (def when absent). */
long long vr_config_int(const char *config, size_t len, const char *key, long long def);

/* Implemented by the policy. */
vr_decision vr_select(vr_request req, const vr_candidate *candidates, size_t n);

#ifdef VR_POLICY_IMPLEMENTATION

#define VR_IMPORT(module, name) __attribute__((import_module(module), import_name(name)))
#define VR_EXPORT(name) __attribute__((export_name(name)))
#define VR_TYPES "vllm:router-policy/types@0.1.0"
#define VR_HOST "vllm:router-policy/host@0.1.0"
#define VR_BALANCER "vllm:router-policy/balancer@0.1.0#"

VR_IMPORT(VR_HOST, "log") void vr__log(int32_t level, const char *p, size_t n);
VR_IMPORT(VR_HOST, "now-ms") int64_t vr__now_ms(void);
VR_IMPORT(VR_HOST, "random") int64_t vr__random(void);
VR_IMPORT(VR_TYPES, "[method]request.path") void vr__path(int32_t self, void *ret);
VR_IMPORT(VR_TYPES, "[method]request.model") void vr__model(int32_t self, void *ret);
VR_IMPORT(VR_TYPES, "[method]request.header") void vr__header(int32_t self, const char *p, size_t n, void *ret);
VR_IMPORT(VR_TYPES, "[method]request.body-field") void vr__body_field(int32_t self, const char *p, size_t n, void *ret);
VR_IMPORT(VR_TYPES, "[method]request.routing-text") void vr__routing_text(int32_t self, void *ret);
VR_IMPORT(VR_TYPES, "[method]request.body-length") int64_t vr__body_length(int32_t self);
VR_IMPORT(VR_TYPES, "[method]request.request-id") void vr__request_id(int32_t self, void *ret);
VR_IMPORT(VR_TYPES, "[method]request.stage") int32_t vr__stage(int32_t self);
VR_IMPORT(VR_TYPES, "[resource-drop]request") void vr__drop(int32_t self);

void vr_log(vr_level level, const char *msg) { vr__log((int32_t)level, msg, strlen(msg)); }
uint64_t vr_now_ms(void) { return (uint64_t)vr__now_ms(); }
uint64_t vr_random(void) { return (uint64_t)vr__random(); }

VR_EXPORT("cabi_realloc")
void *cabi_realloc(void *ptr, size_t old_size, size_t align, size_t new_size) {
    (void)old_size; (void)align; /* malloc aligns to 16 */
    if (new_size == 0) return (void *)align;
    void *p = realloc(ptr, new_size);
    if (!p) __builtin_trap();
    return p;
}

/* Turn a (ptr, len) the router allocated into a NUL-terminated string (reuses it). */
static void vr__free(void *p, size_t n) { if (n) free(p); } /* size 0: not malloc'd */
static char *vr__own(char *p, size_t n) {
    char *s = (char *)(n ? realloc(p, n + 1) : malloc(1));
    if (!s) __builtin_trap();
    s[n] = 0;
    return s;
}
static char *vr__str(const uint32_t *ret) { return vr__own((char *)(uintptr_t)ret[0], ret[1]); }
static char *vr__opt_str(const uint32_t *ret) {
    if ((ret[0] & 0xff) == 0) return NULL;
    return vr__own((char *)(uintptr_t)ret[1], ret[2]);
}

char *vr_request_path(vr_request r) { uint32_t ret[2]; vr__path(r, ret); return vr__str(ret); }
char *vr_request_model(vr_request r) { uint32_t ret[3]; vr__model(r, ret); return vr__opt_str(ret); }
char *vr_request_header(vr_request r, const char *name) {
    uint32_t ret[3]; vr__header(r, name, strlen(name), ret); return vr__opt_str(ret);
}
char *vr_request_body_field(vr_request r, const char *path) {
    uint32_t ret[3]; vr__body_field(r, path, strlen(path), ret); return vr__opt_str(ret);
}
char *vr_request_routing_text(vr_request r) { uint32_t ret[2]; vr__routing_text(r, ret); return vr__str(ret); }
char *vr_request_id(vr_request r) { uint32_t ret[2]; vr__request_id(r, ret); return vr__str(ret); }
uint64_t vr_request_body_length(vr_request r) { return (uint64_t)vr__body_length(r); }
vr_stage vr_request_stage(vr_request r) { return (vr_stage)vr__stage(r); }

long long vr_config_int(const char *c, size_t len, const char *key, long long def) {
    size_t k = strlen(key);
    int depth = 0;
    for (size_t i = 0; i < len; i++) {
        char ch = c[i];
        if (ch == '{' || ch == '[') depth++;
        else if (ch == '}' || ch == ']') depth--;
        else if (ch == '"') {
            size_t j = i + 1;
            while (j < len && c[j] != '"') j += (c[j] == '\\') ? 2 : 1;
            size_t end = j; /* closing quote */
            size_t m = end + 1;
            while (m < len && (c[m] == ' ' || c[m] == '\n' || c[m] == '\t' || c[m] == '\r')) m++;
            if (depth == 1 && m < len && c[m] == ':' && end - i - 1 == k && memcmp(c + i + 1, key, k) == 0) {
                m++;
                while (m < len && (c[m] == ' ' || c[m] == '\n' || c[m] == '\t')) m++;
                bool neg = m < len && c[m] == '-';
                if (neg) m++;
                if (m >= len || c[m] < '0' || c[m] > '9') return def;
                long long v = 0;
                while (m < len && c[m] >= '0' && c[m] <= '9') v = v * 10 + (c[m++] - '0');
                return neg ? -v : v;
            }
            i = end;
        }
    }
    return def;
}

static uint32_t vr__ret[4];
static char *vr__kept;

static void *vr__result(const char *err) {
    free(vr__kept);
    vr__kept = NULL;
    if (!err) { vr__ret[0] = 0; return vr__ret; }
    size_t n = strlen(err);
    vr__kept = (char *)malloc(n + 1);
    memcpy(vr__kept, err, n + 1);
    vr__ret[0] = 1;
    vr__ret[1] = (uint32_t)(uintptr_t)vr__kept;
    vr__ret[2] = (uint32_t)n;
    return vr__ret;
}

#ifdef VR_HAVE_INIT
const char *vr_init(const char *config, size_t len);
#endif
VR_EXPORT(VR_BALANCER "init")
void *vr__export_init(char *config, size_t len) {
    const char *err = NULL;
#ifdef VR_HAVE_INIT
    err = vr_init(config, len);
#endif
    vr__free(config, len);
    return vr__result(err);
}

#ifdef VR_HAVE_WORKERS
void vr_workers_changed(const vr_worker *w, size_t n);
#endif
VR_EXPORT(VR_BALANCER "workers-changed")
void vr__export_workers_changed(uint8_t *list, size_t n) {
#ifdef VR_HAVE_WORKERS
    vr_worker *ws = (vr_worker *)calloc(n ? n : 1, sizeof(vr_worker));
    vr_str **labels = (vr_str **)calloc(n ? n : 1, sizeof(vr_str *));
    for (size_t i = 0; i < n; i++) {
        uint8_t *rec = list + i * 32;
        uint32_t *w32 = (uint32_t *)rec;
        ws[i].id = w32[0];
        ws[i].url.ptr = (const char *)(uintptr_t)w32[1];
        ws[i].url.len = w32[2];
        ws[i].role = (vr_role)rec[12];
        ws[i].has_dp_rank = rec[16] != 0;
        ws[i].dp_rank = w32[5];
        uint32_t *lp = (uint32_t *)(uintptr_t)w32[6];
        size_t nl = w32[7];
        labels[i] = (vr_str *)calloc(2 * nl + 1, sizeof(vr_str));
        for (size_t j = 0; j < 2 * nl; j++) {
            labels[i][j].ptr = (const char *)(uintptr_t)lp[2 * j];
            labels[i][j].len = lp[2 * j + 1];
        }
        ws[i].labels = labels[i];
        ws[i].n_labels = nl;
    }
    vr_workers_changed(ws, n);
#endif
    /* The export owns everything the router passed: free it. */
    for (size_t i = 0; i < n; i++) {
        uint32_t *w32 = (uint32_t *)(list + i * 32);
        vr__free((void *)(uintptr_t)w32[1], w32[2]);
        uint32_t *lp = (uint32_t *)(uintptr_t)w32[6];
        for (size_t j = 0; j < 2 * (size_t)w32[7]; j++) vr__free((void *)(uintptr_t)lp[2 * j], lp[2 * j + 1]);
        vr__free(lp, w32[7]);
#ifdef VR_HAVE_WORKERS
        free(labels[i]);
#endif
    }
#ifdef VR_HAVE_WORKERS
    free(labels);
    free(ws);
#endif
    vr__free(list, n);
}

VR_EXPORT(VR_BALANCER "select")
void *vr__export_select(int32_t req, uint64_t *words, size_t n, uint64_t *engine, size_t ne) {
    vr_candidate stack[64];
    vr_candidate *c = n <= 64 ? stack : (vr_candidate *)malloc(n * sizeof(vr_candidate));
    for (size_t i = 0; i < n; i++) {
        uint64_t w = words[i];
        c[i].id = (uint32_t)w;
        c[i].in_flight = (uint32_t)(w >> 32);
        uint64_t e = i < ne ? engine[i] : 0;
        c[i].engine.present = (e >> 63) != 0;
        c[i].engine.running = (uint32_t)(e & 0xFFFFFF);
        c[i].engine.waiting = (uint32_t)((e >> 24) & 0xFFFFFF);
        c[i].engine.kv_cache_permille = (uint16_t)((e >> 48) & 0x7FF);
    }
    vr_decision d = vr_select((vr_request)req, c, n);
    vr__drop(req);
    if (c != stack) free(c);
    vr__free(words, n);
    vr__free(engine, ne);
    if (!d.declined) {
        vr__ret[0] = 0;
        vr__ret[1] = d.worker;
        return vr__ret;
    }
    return vr__result(d.reason ? d.reason : "declined");
}

#ifdef VR_HAVE_COMPLETE
void vr_on_complete(const vr_completion *done);
#endif
VR_EXPORT(VR_BALANCER "on-complete")
void vr__export_on_complete(int32_t worker, int32_t status, int32_t latency, int32_t has_first,
                            int32_t first, int32_t stage) {
#ifdef VR_HAVE_COMPLETE
    vr_completion c = {(uint32_t)worker, (uint16_t)status, (uint32_t)latency, has_first != 0,
                       (uint32_t)first, (vr_stage)stage};
    vr_on_complete(&c);
#else
    (void)worker; (void)status; (void)latency; (void)has_first; (void)first; (void)stage;
#endif
}

VR_EXPORT(VR_BALANCER "export-state")
void *vr__export_export_state(void) {
    vr__ret[0] = 0;
    vr__ret[1] = 0;
    return vr__ret;
}

VR_EXPORT(VR_BALANCER "import-state")
void *vr__export_import_state(uint8_t *state, size_t len) {
    vr__free(state, len);
    return vr__result("this policy keeps no state");
}

#endif /* VR_POLICY_IMPLEMENTATION */
#endif /* VLLM_ROUTER_POLICY_H */
