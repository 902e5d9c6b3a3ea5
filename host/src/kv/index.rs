//! The router's index of which worker holds which KV block.
//!
//! vLLM's own block hash (SHA-256 over pickled data with a per-process seed, by default)
//! cannot be recomputed outside the engine, so — as llm-d's kv-cache indexer, SMG's
//! `kv_index` and vllm-project/router's `kv_aware` do — the index keys blocks by a
//! **router-side chain hash over token ids**: `key(b) = H(key(parent), tokens(b))`, with
//! `H` SipHash-1-3 under fixed keys (the same on every replica) and the root key 0. Each
//! source keeps a map from the engine's hash to that key, to resolve `parent_block_hash`
//! and `BlockRemoved`.
//!
//! Memory bound: at most `max_blocks_per_worker` blocks per worker (default 262,144, that
//! is 4 Mi tokens at vLLM's block size 16 — more than any single engine's GPU cache). A
//! block costs ≈ 100 bytes (engine→key map entry 16 B + store-order entry 8 B + its
//! share of the key→holders map ≈ 48 B, plus hash-table slack), so ≈ 26 MiB per worker at
//! the bound. Past it, the oldest stored blocks of that worker are forgotten first (FIFO
//! by store time: the engine's own `BlockRemoved` events normally keep the index far
//! below the bound; the bound only matters when removals were lost).

use parking_lot::RwLock;
use std::collections::{HashMap, VecDeque};
use std::hash::Hasher;
use std::time::{Duration, Instant};

/// How long a routed prompt's blocks count as held before the engine confirms them
/// (vllm-project/router's design note uses the same 2 s for its speculative insert).
pub const SPECULATION_TTL: Duration = Duration::from_secs(2);
/// Most speculative entries kept (oldest dropped first).
const MAX_PENDING: usize = 1 << 20;

use super::events::KvEvent;

/// State of one worker's event source (`kv_mode` in the peers' RFC).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceState {
    /// No events (none configured or discovered, not connected yet).
    Fallback,
    /// Every event since the last (re)synchronisation was applied.
    Exact,
    /// Events were lost (sequence gap, disconnect) and not yet recovered by a replay.
    Degraded,
}

impl SourceState {
    /// The number the contract and the `vllm_router_kv_source_state` gauge use: 0
    /// fallback, 1 exact, 2 degraded.
    pub fn code(self) -> u64 {
        match self {
            SourceState::Fallback => 0,
            SourceState::Exact => 1,
            SourceState::Degraded => 2,
        }
    }

    /// Lower-case name for logs and the debug API.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceState::Fallback => "fallback",
            SourceState::Exact => "exact",
            SourceState::Degraded => "degraded",
        }
    }
}

/// Default per-worker bound, blocks.
pub const DEFAULT_MAX_BLOCKS_PER_WORKER: usize = 262_144;

/// The chain key of a block: `H(parent, tokens)`. `parent` is 0 for a prompt's first block.
pub fn block_key(parent: u64, tokens: &[u32]) -> u64 {
    // SipHash-1-3 with zero keys: deterministic across processes and replicas.
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new();
    h.write_u64(parent);
    for t in tokens {
        h.write_u32(*t);
    }
    // 0 is the root's parent; never hand it out as a block key.
    h.finish().max(1)
}

/// The chain keys of a token sequence's full blocks (a partial tail block is dropped, as
/// vLLM never caches one).
pub fn prompt_keys(tokens: &[u32], block_size: usize) -> Vec<u64> {
    if block_size == 0 {
        return Vec::new();
    }
    let mut parent = 0;
    tokens
        .chunks_exact(block_size)
        .map(|b| {
            parent = block_key(parent, b);
            parent
        })
        .collect()
}

#[derive(Debug)]
struct Source {
    state: SourceState,
    engine_to_key: HashMap<u64, u64>,
    /// Engine hashes in store order, for the FIFO bound; may hold removed hashes (skipped
    /// when popped, compacted when it grows past twice the live count).
    order: VecDeque<u64>,
    block_size: u32,
}

impl Source {
    fn new() -> Self {
        Source {
            state: SourceState::Fallback,
            engine_to_key: HashMap::new(),
            order: VecDeque::new(),
            block_size: 0,
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    holders: Holders,
    sources: HashMap<u32, Source>,
    /// Speculative holders: blocks of prompts just routed to a worker, counted as held
    /// until `expiry` (the engine's `BlockStored` arrives only once it has prefilled
    /// them; until then a burst of requests sharing a prefix would see no holder).
    pending: HashMap<u64, Vec<(u32, Instant)>>,
    /// (expiry, key) in insertion order, for pruning.
    pending_order: VecDeque<(Instant, u64)>,
}

/// Block key → (worker id, how many of its engine hashes map to this key).
type Holders = HashMap<u64, Vec<(u32, u32)>>;

/// One more engine hash of `worker` maps to `key`.
fn add_holder(holders: &mut Holders, key: u64, worker: u32) {
    let h = holders.entry(key).or_default();
    match h.iter_mut().find(|(w, _)| *w == worker) {
        Some(e) => e.1 += 1,
        None => h.push((worker, 1)),
    }
}

/// One engine hash of `worker` no longer maps to `key`.
fn drop_holder(holders: &mut Holders, key: u64, worker: u32) {
    if let Some(h) = holders.get_mut(&key) {
        if let Some(i) = h.iter().position(|(w, _)| *w == worker) {
            h[i].1 -= 1;
            if h[i].1 == 0 {
                h.swap_remove(i);
            }
        }
        if h.is_empty() {
            holders.remove(&key);
        }
    }
}

impl Inner {
    fn clear(&mut self, worker: u32) {
        let Some(src) = self.sources.get_mut(&worker) else {
            return;
        };
        for (_, k) in src.engine_to_key.drain() {
            drop_holder(&mut self.holders, k, worker);
        }
        src.order.clear();
    }
}

/// What applying a batch did, for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// Blocks added.
    pub stored: u64,
    /// Blocks removed (removals of unknown hashes are not counted).
    pub removed: u64,
    /// `BlockStored` events whose parent was unknown (skipped: a missed event).
    pub orphans: u64,
    /// Blocks forgotten to keep within the bound.
    pub evicted: u64,
}

/// The shared index: one per router, surviving policy hot swaps.
#[derive(Debug)]
pub struct KvIndex {
    inner: RwLock<Inner>,
    max_blocks_per_worker: usize,
    /// Block size the request side cuts prompts with: `--kv-event-block-size`, replaced
    /// by the first `block_size` an event carries.
    block_size: std::sync::atomic::AtomicU32,
}

impl KvIndex {
    /// An empty index. `block_size`: tokens per block until an event says otherwise.
    pub fn new(max_blocks_per_worker: usize, block_size: u32) -> Self {
        KvIndex {
            inner: RwLock::new(Inner::default()),
            max_blocks_per_worker: max_blocks_per_worker.max(1),
            block_size: block_size.max(1).into(),
        }
    }

    /// Tokens per block for cutting prompts.
    pub fn block_size(&self) -> usize {
        self.block_size.load(std::sync::atomic::Ordering::Relaxed) as usize
    }

    /// Whether any source is registered (else tokenizing a prompt is pointless).
    pub fn has_sources(&self) -> bool {
        self.inner
            .read()
            .sources
            .values()
            .any(|s| s.state != SourceState::Fallback)
    }

    /// Register `worker` as a source (state fallback until its first event).
    pub fn add_source(&self, worker: u32) {
        self.inner
            .write()
            .sources
            .entry(worker)
            .or_insert_with(Source::new);
    }

    /// Forget `worker` entirely (it left the fleet).
    pub fn remove_source(&self, worker: u32) {
        let mut g = self.inner.write();
        g.clear(worker);
        g.sources.remove(&worker);
    }

    /// Drop everything `worker` holds (an engine restart or an unrecoverable gap); its
    /// state is left as it was.
    pub fn clear_source(&self, worker: u32) {
        self.inner.write().clear(worker);
    }

    /// Set `worker`'s state (registers it if needed).
    pub fn set_state(&self, worker: u32, state: SourceState) {
        self.inner
            .write()
            .sources
            .entry(worker)
            .or_insert_with(Source::new)
            .state = state;
    }

    /// `worker`'s state (`Fallback` when unknown).
    pub fn state(&self, worker: u32) -> SourceState {
        self.inner
            .read()
            .sources
            .get(&worker)
            .map(|s| s.state)
            .unwrap_or(SourceState::Fallback)
    }

    /// Blocks `worker` holds.
    pub fn source_blocks(&self, worker: u32) -> usize {
        self.inner
            .read()
            .sources
            .get(&worker)
            .map(|s| s.engine_to_key.len())
            .unwrap_or(0)
    }

    /// Distinct blocks in the index.
    pub fn blocks(&self) -> usize {
        self.inner.read().holders.len()
    }

    /// Apply one batch's events from `worker`. Only the GPU tier (events with medium
    /// `GPU` or none) is indexed: a block offloaded to CPU or disk is not a prefix-cache
    /// hit for the scheduler.
    pub fn apply(&self, worker: u32, events: &[KvEvent]) -> Applied {
        let mut out = Applied::default();
        let mut g = self.inner.write();
        g.sources.entry(worker).or_insert_with(Source::new);
        for e in events {
            match e {
                KvEvent::BlockStored {
                    block_hashes,
                    parent,
                    token_ids,
                    block_size,
                    medium,
                    ..
                } => {
                    if !gpu(medium) {
                        continue;
                    }
                    let inner = &mut *g;
                    let src = inner.sources.get_mut(&worker).expect("inserted above");
                    if src.block_size == 0 {
                        src.block_size = *block_size;
                        self.block_size
                            .store(*block_size, std::sync::atomic::Ordering::Relaxed);
                    }
                    let mut key = match parent {
                        None => 0,
                        Some(p) => match src.engine_to_key.get(p) {
                            Some(k) => *k,
                            None => {
                                out.orphans += 1;
                                continue;
                            }
                        },
                    };
                    for (i, h) in block_hashes.iter().enumerate() {
                        let bs = *block_size as usize;
                        let Some(tokens) = token_ids.get(i * bs..(i + 1) * bs) else {
                            break;
                        };
                        key = block_key(key, tokens);
                        if let Some(old) = src.engine_to_key.insert(*h, key) {
                            // Re-stored under the same engine hash: replace, don't double count.
                            drop_holder(&mut inner.holders, old, worker);
                        }
                        src.order.push_back(*h);
                        add_holder(&mut inner.holders, key, worker);
                        out.stored += 1;
                    }
                    // The bound: forget the oldest stored blocks.
                    while src.engine_to_key.len() > self.max_blocks_per_worker {
                        let Some(h) = src.order.pop_front() else {
                            break;
                        };
                        if let Some(k) = src.engine_to_key.remove(&h) {
                            drop_holder(&mut inner.holders, k, worker);
                            out.evicted += 1;
                        }
                    }
                    if src.order.len() > 2 * src.engine_to_key.len() + 1024 {
                        let live = &src.engine_to_key;
                        src.order.retain(|h| live.contains_key(h));
                    }
                }
                KvEvent::BlockRemoved {
                    block_hashes,
                    medium,
                } => {
                    if !gpu(medium) {
                        continue;
                    }
                    for h in block_hashes {
                        let key = g
                            .sources
                            .get_mut(&worker)
                            .and_then(|s| s.engine_to_key.remove(h));
                        if let Some(k) = key {
                            drop_holder(&mut g.holders, k, worker);
                            out.removed += 1;
                        }
                    }
                }
                KvEvent::AllBlocksCleared => g.clear(worker),
                KvEvent::Other(_) => {}
            }
        }
        out
    }

    /// A prompt with block `keys` was just routed to `worker`: count its blocks as held
    /// there until `now + SPECULATION_TTL` (or until the engine's events say so).
    pub fn speculate(&self, worker: u32, keys: &[u64], now: Instant) {
        let expiry = now + SPECULATION_TTL;
        let mut g = self.inner.write();
        // Prune what expired (and the overflow), oldest first.
        while let Some(&(t, k)) = g.pending_order.front() {
            if t > now && g.pending_order.len() < MAX_PENDING {
                break;
            }
            g.pending_order.pop_front();
            if let Some(v) = g.pending.get_mut(&k) {
                v.retain(|(_, e)| *e > now && *e != t);
                if v.is_empty() {
                    g.pending.remove(&k);
                }
            }
        }
        for k in keys {
            let v = g.pending.entry(*k).or_default();
            match v.iter_mut().find(|(w, _)| *w == worker) {
                Some(e) => e.1 = expiry,
                None => v.push((worker, expiry)),
            }
            g.pending_order.push_back((expiry, *k));
        }
    }

    /// [`KvIndex::match_prefix_at`] now.
    pub fn match_prefix(&self, keys: &[u64], candidates: &[u32], out: &mut Vec<u64>) {
        self.match_prefix_at(keys, candidates, out, Instant::now())
    }

    /// Match a prompt's block keys (from [`prompt_keys`]) against `candidates` (worker
    /// ids) at time `now`: pushes one word per candidate onto `out` — the leading
    /// blocks it holds (from its events, or speculatively from a prompt routed there
    /// in the last [`SPECULATION_TTL`]) in bits 0..32, its [`SourceState::code`] in bits
    /// 32..34 — the `vllm:router-kv/prefix-cache` wire form.
    pub fn match_prefix_at(
        &self,
        keys: &[u64],
        candidates: &[u32],
        out: &mut Vec<u64>,
        now: Instant,
    ) {
        let g = self.inner.read();
        let start = out.len();
        // Per candidate: (hits so far, still matching).
        let mut run: Vec<(u32, bool)> = candidates
            .iter()
            .map(|w| {
                let live = g
                    .sources
                    .get(w)
                    .is_some_and(|s| s.state != SourceState::Fallback);
                (0, live)
            })
            .collect();
        let mut alive = run.iter().filter(|r| r.1).count();
        for k in keys {
            if alive == 0 {
                break;
            }
            let holders = g.holders.get(k).map(Vec::as_slice).unwrap_or(&[]);
            let pending = g.pending.get(k).map(Vec::as_slice).unwrap_or(&[]);
            for (i, w) in candidates.iter().enumerate() {
                if run[i].1 {
                    if holders.iter().any(|(h, _)| h == w)
                        || pending.iter().any(|(h, e)| h == w && *e > now)
                    {
                        run[i].0 += 1;
                    } else {
                        run[i].1 = false;
                        alive -= 1;
                    }
                }
            }
        }
        out.extend(candidates.iter().zip(&run).map(|(w, (hits, _))| {
            let state = g
                .sources
                .get(w)
                .map(|s| s.state)
                .unwrap_or(SourceState::Fallback);
            *hits as u64 | state.code() << 32
        }));
        debug_assert_eq!(out.len() - start, candidates.len());
    }
}

fn gpu(medium: &Option<String>) -> bool {
    medium
        .as_deref()
        .is_none_or(|m| m.eq_ignore_ascii_case("gpu"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(hashes: &[u64], parent: Option<u64>, tokens: &[u32]) -> KvEvent {
        KvEvent::BlockStored {
            block_hashes: hashes.to_vec(),
            parent,
            token_ids: tokens.to_vec(),
            block_size: 4,
            lora_name: None,
            medium: None,
        }
    }

    fn hits(ix: &KvIndex, tokens: &[u32], cands: &[u32]) -> Vec<(u32, u64)> {
        let keys = prompt_keys(tokens, ix.block_size());
        let mut out = Vec::new();
        ix.match_prefix(&keys, cands, &mut out);
        out.iter().map(|w| (*w as u32, w >> 32)).collect()
    }

    #[test]
    fn stored_prefix_makes_its_worker_hold_it_and_removal_undoes_it() {
        let ix = KvIndex::new(1000, 16);
        let prompt: Vec<u32> = (0..13).collect(); // 3 full blocks of 4 + a partial one
        ix.set_state(1, SourceState::Exact);
        ix.set_state(2, SourceState::Exact);
        // Worker 1 stores the first two blocks in one event, then the third chained on.
        ix.apply(1, &[stored(&[100, 101], None, &prompt[..8])]);
        assert_eq!(ix.block_size(), 4, "block size learned from the event");
        ix.apply(1, &[stored(&[102], Some(101), &prompt[8..12])]);
        // Worker 2 holds only the first block.
        ix.apply(2, &[stored(&[900], None, &prompt[..4])]);
        assert_eq!(hits(&ix, &prompt, &[1, 2, 3]), vec![(3, 1), (1, 1), (0, 0)]);
        // A different first block means no leading hit even if later tokens agree.
        let mut other = prompt.clone();
        other[0] = 999;
        assert_eq!(hits(&ix, &other, &[1, 2]), vec![(0, 1), (0, 1)]);
        // Removing the middle block ends the run there.
        let a = ix.apply(
            1,
            &[KvEvent::BlockRemoved {
                block_hashes: vec![101, 555],
                medium: None,
            }],
        );
        assert_eq!(a.removed, 1);
        assert_eq!(hits(&ix, &prompt, &[1]), vec![(1, 1)]);
        // Cleared: nothing left for worker 1, worker 2 untouched.
        ix.apply(1, &[KvEvent::AllBlocksCleared]);
        assert_eq!(hits(&ix, &prompt, &[1, 2]), vec![(0, 1), (1, 1)]);
        assert_eq!(ix.blocks(), 1);
    }

    #[test]
    fn unknown_parent_is_an_orphan_and_other_tiers_are_ignored() {
        let ix = KvIndex::new(1000, 4);
        ix.set_state(1, SourceState::Exact);
        let a = ix.apply(1, &[stored(&[5], Some(4242), &[1, 2, 3, 4])]);
        assert_eq!((a.stored, a.orphans), (0, 1));
        let cpu = KvEvent::BlockStored {
            block_hashes: vec![6],
            parent: None,
            token_ids: vec![1, 2, 3, 4],
            block_size: 4,
            lora_name: None,
            medium: Some("CPU".into()),
        };
        assert_eq!(ix.apply(1, &[cpu]).stored, 0);
        assert_eq!(ix.blocks(), 0);
    }

    #[test]
    fn the_bound_forgets_the_oldest_blocks_first() {
        let ix = KvIndex::new(2, 4);
        ix.set_state(1, SourceState::Exact);
        let toks: Vec<u32> = (0..12).collect();
        let a = ix.apply(1, &[stored(&[1, 2, 3], None, &toks)]);
        assert_eq!((a.stored, a.evicted), (3, 1));
        // The first block went: the prompt no longer has a leading hit.
        assert_eq!(hits(&ix, &toks, &[1]), vec![(0, 1)]);
        assert_eq!((ix.state(1), ix.source_blocks(1)), (SourceState::Exact, 2));
    }

    #[test]
    fn a_fallback_source_reports_nothing_and_degraded_is_flagged() {
        let ix = KvIndex::new(10, 4);
        let toks: Vec<u32> = (0..8).collect();
        ix.apply(1, &[stored(&[1, 2], None, &toks)]);
        // Events arrived but the state was never set: fallback, counts hidden.
        assert_eq!(hits(&ix, &toks, &[1]), vec![(0, 0)]);
        ix.set_state(1, SourceState::Degraded);
        assert_eq!(hits(&ix, &toks, &[1]), vec![(2, 2)]);
        ix.remove_source(1);
        assert_eq!(ix.blocks(), 0);
        assert!(!ix.has_sources());
    }

    #[test]
    fn a_routed_prompt_counts_as_held_until_its_speculation_expires() {
        let ix = KvIndex::new(10, 4);
        ix.set_state(1, SourceState::Exact);
        ix.set_state(2, SourceState::Exact);
        let toks: Vec<u32> = (0..8).collect();
        let keys = prompt_keys(&toks, 4);
        let t0 = Instant::now();
        ix.speculate(2, &keys, t0);
        let at = |t: Instant| {
            let mut out = Vec::new();
            ix.match_prefix_at(&keys, &[1, 2], &mut out, t);
            out.iter().map(|w| *w as u32).collect::<Vec<_>>()
        };
        assert_eq!(at(t0 + Duration::from_millis(100)), vec![0, 2]);
        assert_eq!(
            at(t0 + SPECULATION_TTL + Duration::from_millis(1)),
            vec![0, 0]
        );
        // The engine's event makes it real: no expiry any more.
        ix.apply(2, &[stored(&[7, 8], None, &toks)]);
        assert_eq!(at(t0 + SPECULATION_TTL * 10), vec![0, 2]);
        // Expired entries are pruned on the next speculation.
        ix.speculate(1, &keys[..1], t0 + SPECULATION_TTL * 10);
        assert_eq!(ix.inner.read().pending_order.len(), 1);
    }

    #[test]
    fn same_tokens_under_two_engine_hashes_are_counted_once_per_hash() {
        let ix = KvIndex::new(10, 4);
        ix.set_state(1, SourceState::Exact);
        let toks = [1, 2, 3, 4];
        ix.apply(1, &[stored(&[10], None, &toks), stored(&[11], None, &toks)]);
        ix.apply(
            1,
            &[KvEvent::BlockRemoved {
                block_hashes: vec![10],
                medium: None,
            }],
        );
        assert_eq!(
            hits(&ix, &toks, &[1]),
            vec![(1, 1)],
            "still held under hash 11"
        );
        ix.apply(
            1,
            &[KvEvent::BlockRemoved {
                block_hashes: vec![11],
                medium: None,
            }],
        );
        assert_eq!(hits(&ix, &toks, &[1]), vec![(0, 1)]);
    }
}
