/*
 * {{name}}: a vllm-router policy in C (the example policy every language template
 * starts from). Fewest in-flight requests wins (ties: lowest id); workers whose engine
 * queue exceeds max_waiting (config, default 8) are skipped; when every worker is over
 * it the policy declines and the router's fallback decides. Logs once at init.
 * Build: ./build.sh (writes {{name}}.wasm).
 */
#include <stdio.h>
#define VR_HAVE_INIT
#define VR_POLICY_IMPLEMENTATION
#include "vllm-router/sdk-c/vllm_router_policy.h"

static uint32_t max_waiting = 8;

const char *vr_init(const char *config, size_t len) {
    long long v = vr_config_int(config, len, "max_waiting", 8);
    if (v < 0) return "max_waiting must be >= 0";
    max_waiting = (uint32_t)v;
    char line[96];
    snprintf(line, sizeof line, "{{name}} (c) ready, max_waiting=%u", max_waiting);
    vr_log(VR_INFO, line);
    return NULL;
}

vr_decision vr_select(vr_request req, const vr_candidate *c, size_t n) {
    (void)req;
    const vr_candidate *best = NULL;
    for (size_t i = 0; i < n; i++) {
        if (c[i].engine.present && c[i].engine.waiting > max_waiting) continue;
        if (!best || c[i].in_flight < best->in_flight) best = &c[i];
    }
    if (!best) return vr_decline("every worker's queue is over max_waiting");
    return vr_pick(best->id);
}
