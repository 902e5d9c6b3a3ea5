// Helpers for vllm-router policies in JavaScript (componentize-js). build.sh puts
// this file in front of the policy's own source, so these are plain functions.

/** The packed words of `select` (see wit/policy.wit) as candidate objects:
 *  {id, inFlight, engine: null | {running, waiting, kvCachePermille}}. */
function decodeCandidates(words, engine) {
  const out = [];
  for (let i = 0; i < words.length; i++) {
    const w = BigInt(words[i]);
    const e = i < engine.length ? BigInt(engine[i]) : 0n;
    out.push({
      id: Number(w & 0xffffffffn),
      inFlight: Number(w >> 32n),
      engine: (e >> 63n) === 0n ? null : {
        running: Number(e & 0xffffffn),
        waiting: Number((e >> 24n) & 0xffffffn),
        kvCachePermille: Number((e >> 48n) & 0x7ffn),
      },
    });
  }
  return out;
}

/** Decisions. */
function pick(id) { return { tag: 'worker', val: id }; }
function decline(reason) { return { tag: 'none', val: reason }; }
