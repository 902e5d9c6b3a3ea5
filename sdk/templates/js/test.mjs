// Native tests of {{name}}'s decision under node: the helpers and the policy's choose()
// are evaluated without the component's host import.
import { readFileSync } from 'node:fs';
import assert from 'node:assert/strict';

const src = readFileSync('vllm-router/sdk-js/helpers.js', 'utf8') +
  readFileSync('policy.js', 'utf8')
    .replace(/^import .*$/m, 'const log = () => {};')
    .replace('export const balancer', 'const balancer') +
  '\nreturn { balancer };';
const { balancer } = new Function(src)();
const w = (id, inFlight) => BigInt(id) | (BigInt(inFlight) << 32n);
const eng = (waiting) => (1n << 63n) | (BigInt(waiting) << 24n);
balancer.init('{"max_waiting": 4}');
assert.deepEqual(balancer.select(null, [w(0, 3), w(1, 1), w(2, 2)], []), { tag: 'worker', val: 1 });
assert.deepEqual(balancer.select(null, [w(0, 3), w(1, 1), w(2, 2)], [0n, eng(9), 0n]), { tag: 'worker', val: 2 });
assert.equal(balancer.select(null, [w(0, 0)], [eng(5)]).tag, 'none');
console.log('ok: {{name}} native tests');
