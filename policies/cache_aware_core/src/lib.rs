//! `cache_aware`: prefix-cache affinity with load balancing, after SGLang's cache-aware
//! router (approximate radix tree per worker over the request's text) with
//! vllm-project/router's parameters and defaults.
//!
//! Per request, over the eligible candidates (load = router in-flight + engine queue,
//! [`Candidate::load`]):
//! 1. **Imbalanced** (`max − min > balance_abs_threshold` **and**
//!    `max > min × balance_rel_threshold`): the least loaded worker.
//! 2. Otherwise match the routing text against the tree. Workers holding more than
//!    `cache_threshold` of the text are holders. Holders whose cached text the request
//!    *extends* (a later turn of a conversation) rank before holders it merely
//!    branches off (a shared system prompt or few-shot header, then something new); then
//!    the least loaded, then the longest match. A branch holder must be **within its fair
//!    share** (see below), and among them the smallest recent share goes first.
//! 3. Otherwise the least loaded worker; ties go to the smallest recent share, then the
//!    least cached text, then at random, so unrelated prompts spread over the fleet.
//! 4. The text is inserted into the tree under the chosen worker.
//!
//! **Fair share** (the idea of "consistent hashing with bounded loads", Mirrokni, Thorup,
//! Zadimoghaddam, SODA 2018, applied to cache affinity): over the last `balance_window`
//! decisions, a branch holder may take the request only while its count is within
//! `ceil((affinity_load_factor − 1) × mean)` of the least-used candidate's (mean = recent
//! decisions per candidate). A popular prefix then fills its holders up to that slack and
//! spills to the least-used worker, which becomes a holder too: per-worker request share
//! stays within about the load factor (max *and* min), while each prefix keeps only as
//! many homes as its traffic needs. Conversations that extend their own cached history
//! are exempt: moving one costs its whole prefill, and the new conversations are what the
//! bound spreads. Exact repeats are not exempt: many clients sending one popular prompt
//! must spread too.
//!
//! What this fixes in the anchors (vllm-project/router, SGLang):
//! - Chat requests get real routing text (the host renders the messages in order), so
//!   multi-turn chats keep their worker; vllm-project/router routes chat on the session
//!   id only.
//! - The anchors' in-flight thresholds (64 requests apart *and* 1.5×) never trigger at
//!   low concurrency, so every new conversation sharing a system prompt longer than 30 %
//!   of its text piles onto the first worker that saw it. The fair-share bound spreads
//!   them at any concurrency.
//! - A holder that is not eligible is skipped, not deleted from the tree (it keeps its
//!   entries for when it comes back) and never sends the request to "the first worker".
//! - The tree is bounded at all times (`max_tree_size` bytes per worker and
//!   `max_total_bytes` overall, enforced on insert), see [`tree`].
//!
//! Config (JSON, all optional; the router fills the first five from its flags):
//! `cache_threshold` (0.3, in [0,1]), `balance_abs_threshold` (64 requests),
//! `balance_rel_threshold` (1.5, ≥ 1), `eviction_interval_secs` (120 s: interval of the
//! pass that drops entries of workers no longer in the fleet), `max_tree_size` (bytes of
//! text per worker, 2^26 like vllm-project/router), `max_total_bytes` (bytes of text in
//! the whole tree, 24 MiB so the tree fits the default 64 MiB policy memory limit),
//! `affinity_load_factor` (1.25, ≥ 1), `balance_window` (256 decisions).
//!
//! State hand-off: `export_state` writes the tree as (worker URL, text) leaf paths, oldest
//! first; `import_state` replays them, so a hot-swapped version starts warm.

pub mod tree;

use serde::Deserialize;
use std::collections::HashMap;
use tree::{RadixTree, Tenant, TenantMatch};
use vllm_router_sdk::prelude::*;

/// Tunables (see module docs for defaults and units).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Minimum match ratio (matched bytes / text bytes) for cache affinity.
    pub cache_threshold: f64,
    /// Absolute load gap (requests) beyond which balance beats affinity.
    pub balance_abs_threshold: u64,
    /// Relative load gap (max / min) beyond which balance beats affinity.
    pub balance_rel_threshold: f64,
    /// Seconds between passes that purge departed workers' entries.
    pub eviction_interval_secs: u64,
    /// Cap per worker, bytes of text.
    pub max_tree_size: u64,
    /// Cap over the whole tree, bytes of text.
    pub max_total_bytes: u64,
    /// A holder's share of recent decisions may exceed the mean by this factor.
    pub affinity_load_factor: f64,
    /// Recent decisions counted for the fair share.
    pub balance_window: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            cache_threshold: 0.3,
            balance_abs_threshold: 64,
            balance_rel_threshold: 1.5,
            eviction_interval_secs: 120,
            max_tree_size: 1 << 26,
            max_total_bytes: 24 << 20,
            affinity_load_factor: 1.25,
            balance_window: 256,
        }
    }
}

impl Config {
    /// Parse and check a JSON config; the error names the bad field.
    pub fn parse(json: &str) -> Result<Config, String> {
        let cfg: Config = if json.trim().is_empty() {
            Config::default()
        } else {
            serde_json::from_str(json).map_err(|e| format!("cache_aware config: {e}"))?
        };
        if !(0.0..=1.0).contains(&cfg.cache_threshold) {
            return Err("cache_aware: cache_threshold must be within [0, 1]".into());
        }
        if cfg.affinity_load_factor < 1.0 || cfg.balance_window == 0 {
            return Err(
                "cache_aware: affinity_load_factor must be >= 1.0 and balance_window > 0".into(),
            );
        }
        if cfg.balance_rel_threshold < 1.0 {
            return Err("cache_aware: balance_rel_threshold must be >= 1.0".into());
        }
        if cfg.max_tree_size == 0 || cfg.max_total_bytes == 0 || cfg.eviction_interval_secs == 0 {
            return Err(
                "cache_aware: max_tree_size, max_total_bytes and eviction_interval_secs must be > 0"
                    .into(),
            );
        }
        Ok(cfg)
    }
}

/// The policy: the tree plus the mapping between worker ids and tree tenants (tenants
/// are keyed by worker URL, so a worker that leaves and returns finds its entries).
pub struct CacheAware {
    cfg: Config,
    tree: RadixTree,
    /// Tenant of each worker id (index = id).
    tenant_of: Vec<Option<Tenant>>,
    /// Worker key (URL or URL@rank) of each tenant; `None` = free slot.
    tenant_keys: Vec<Option<String>>,
    /// Tenants whose worker left, purged at the next eviction pass.
    departed: Vec<Tenant>,
    last_pass_ms: u64,
    /// Tenants of the last `balance_window` decisions, and the count per tenant.
    recent: std::collections::VecDeque<Tenant>,
    recent_count: Vec<u32>,
    /// Scratch: per-tenant candidate index for this request (`u32::MAX` = not a candidate).
    scratch_cand: Vec<u32>,
    scratch_match: Vec<TenantMatch>,
}

impl CacheAware {
    /// Record that `worker` got a request with routing text `text` without asking the
    /// tree (a caller that decided by other means, such as `kv_aware` from KV events),
    /// so the tree and the recent shares stay warm for when it falls back to them.
    pub fn observe(&mut self, text: &str, worker: WorkerId) {
        if let Some(t) = self.tenant(worker) {
            if !text.is_empty() {
                self.tree.insert(text.as_bytes(), t);
            }
            self.record(t);
        }
    }

    /// For each candidate (same order), whether it may take a request with routing text
    /// `text` on cache affinity without breaking the fair share: `true` when the text
    /// *extends* what the tree saw sent there (a later turn of a conversation: moving it
    /// would cost its whole prefill) or when the worker's share of the last
    /// `balance_window` decisions is within `ceil((affinity_load_factor − 1) × mean)` of
    /// the least-used candidate's (see the module docs). For policies that know *what* is
    /// cached by other means (`kv_aware`) but want the same balance.
    pub fn affinity_allowed(&mut self, text: &str, candidates: &[Candidate]) -> Vec<bool> {
        let mean = (self.recent.len() + 1) as f64 / candidates.len().max(1) as f64;
        let slack = ((self.cfg.affinity_load_factor - 1.0) * mean).ceil() as u32;
        let recent: Vec<u32> = candidates
            .iter()
            .map(|c| self.tenant(c.id).map(|t| self.recent_of(t)).unwrap_or(0))
            .collect();
        let bound = recent.iter().copied().min().unwrap_or(0) + slack;
        let mut extends = vec![false; candidates.len()];
        if !text.is_empty() {
            let (cand, m) = self.match_candidates(text, candidates);
            for (t, tm) in m.iter().enumerate() {
                if let Some(&ci) = cand.get(t) {
                    if ci != u32::MAX
                        && tm.continuation
                        && tm.matched < text.len()
                        && tm.matched > 0
                    {
                        extends[ci as usize] = true;
                    }
                }
            }
            self.scratch_cand = cand;
            self.scratch_match = m;
        }
        recent
            .iter()
            .zip(extends)
            .map(|(r, e)| e || *r <= bound)
            .collect()
    }

    /// Match `text` against the tree for `candidates`: per tenant, the candidate index it
    /// maps to (`u32::MAX` = not a candidate) and its [`TenantMatch`]. Uses the scratch
    /// buffers; give them back (`self.scratch_cand`, `self.scratch_match`) after use so
    /// a decision allocates nothing.
    fn match_candidates(
        &mut self,
        text: &str,
        candidates: &[Candidate],
    ) -> (Vec<u32>, Vec<TenantMatch>) {
        let mut cand = std::mem::take(&mut self.scratch_cand);
        cand.clear();
        cand.resize(self.tenant_keys.len(), u32::MAX);
        for (i, c) in candidates.iter().enumerate() {
            if let Some(t) = self.tenant(c.id) {
                cand[t as usize] = i as u32;
            }
        }
        let mut m = std::mem::take(&mut self.scratch_match);
        m.clear();
        self.tree.match_prefix(
            text.as_bytes(),
            |t| cand.get(t as usize).is_some_and(|&i| i != u32::MAX),
            &mut m,
        );
        (cand, m)
    }

    /// The tree (for inspection in tests and benches).
    pub fn tree(&self) -> &RadixTree {
        &self.tree
    }

    fn tenant(&self, id: WorkerId) -> Option<Tenant> {
        self.tenant_of.get(id as usize).copied().flatten()
    }

    fn tenant_for_key(&mut self, key: &str) -> Tenant {
        if let Some(i) = self
            .tenant_keys
            .iter()
            .position(|k| k.as_deref() == Some(key))
        {
            return i as Tenant;
        }
        let i = match self.tenant_keys.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                self.tenant_keys.push(None);
                self.tenant_keys.len() - 1
            }
        };
        self.tenant_keys[i] = Some(key.to_string());
        self.departed.retain(|t| *t as usize != i);
        i as Tenant
    }

    fn least_loaded(
        &self,
        candidates: &[Candidate],
        among: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let mut best: Option<((u64, u32, u64), usize)> = None;
        let mut ties = 0u64;
        for (i, c) in candidates.iter().enumerate() {
            if !among(i) {
                continue;
            }
            let t = self.tenant(c.id);
            let size = t.map(|t| self.tree.tenant_size(t)).unwrap_or(0);
            let recent = t.map(|t| self.recent_of(t)).unwrap_or(0);
            let key = (c.load(), recent, size);
            match best {
                Some((k, _)) if k < key => {}
                Some((k, _)) if k == key => {
                    // Reservoir sampling among exact ties: uniform without a second pass.
                    ties += 1;
                    if host::random_below(ties as usize + 1) == 0 {
                        best = Some((key, i));
                    }
                }
                _ => {
                    best = Some((key, i));
                    ties = 0;
                }
            }
        }
        best.map(|(_, i)| i)
    }

    fn recent_of(&self, t: Tenant) -> u32 {
        self.recent_count.get(t as usize).copied().unwrap_or(0)
    }

    fn record(&mut self, t: Tenant) {
        let i = t as usize;
        if self.recent_count.len() <= i {
            self.recent_count.resize(i + 1, 0);
        }
        self.recent_count[i] += 1;
        self.recent.push_back(t);
        if self.recent.len() > self.cfg.balance_window {
            if let Some(old) = self.recent.pop_front() {
                self.recent_count[old as usize] -= 1;
            }
        }
    }

    fn maintenance(&mut self) {
        let now = host::now_ms();
        if now.saturating_sub(self.last_pass_ms) < self.cfg.eviction_interval_secs * 1000 {
            return;
        }
        self.last_pass_ms = now;
        for t in std::mem::take(&mut self.departed) {
            self.tree.remove_all(t);
            self.tenant_keys[t as usize] = None;
        }
    }
}

impl Policy for CacheAware {
    fn new(config: &str) -> Result<Self, String> {
        let cfg = Config::parse(config)?;
        let tree = RadixTree::new(cfg.max_tree_size, cfg.max_total_bytes);
        Ok(CacheAware {
            cfg,
            tree,
            tenant_of: Vec::new(),
            tenant_keys: Vec::new(),
            departed: Vec::new(),
            last_pass_ms: 0,
            recent: std::collections::VecDeque::new(),
            recent_count: Vec::new(),
            scratch_cand: Vec::new(),
            scratch_match: Vec::new(),
        })
    }

    fn workers_changed(&mut self, workers: &[Worker]) {
        let mut present: HashMap<String, WorkerId> = HashMap::with_capacity(workers.len());
        for w in workers {
            present.insert(w.key(), w.id);
        }
        // Tenants whose worker left are purged at the next pass (not here: a worker that
        // flaps out and back keeps its entries).
        for (i, k) in self.tenant_keys.iter().enumerate() {
            if let Some(k) = k {
                if !present.contains_key(k) && !self.departed.contains(&(i as Tenant)) {
                    self.departed.push(i as Tenant);
                }
            }
        }
        self.tenant_of.clear();
        for w in workers {
            let t = self.tenant_for_key(&w.key());
            let id = w.id as usize;
            if self.tenant_of.len() <= id {
                self.tenant_of.resize(id + 1, None);
            }
            self.tenant_of[id] = Some(t);
        }
    }

    fn select(&mut self, req: &dyn Request, candidates: &[Candidate]) -> Decision {
        self.maintenance();
        let text = req.routing_text();
        let (mut min, mut max) = (u64::MAX, 0u64);
        for c in candidates {
            min = min.min(c.load());
            max = max.max(c.load());
        }
        let imbalanced = max - min > self.cfg.balance_abs_threshold
            && (max as f64) > (min as f64) * self.cfg.balance_rel_threshold;

        let chosen = if imbalanced || text.is_empty() {
            self.least_loaded(candidates, |_| true)
        } else {
            let (cand, m) = self.match_candidates(&text, candidates);
            let need = self.cfg.cache_threshold * text.len() as f64;
            let mean = (self.recent.len() + 1) as f64 / candidates.len() as f64;
            let slack = ((self.cfg.affinity_load_factor - 1.0) * mean).ceil() as u32;
            let min_recent = candidates
                .iter()
                .map(|c| self.tenant(c.id).map(|t| self.recent_of(t)).unwrap_or(0))
                .min()
                .unwrap_or(0);
            let bound = min_recent + slack;
            // Holders above the threshold: extending beats branching off, then least
            // loaded; branch holders must be within their fair share and the smallest
            // recent share goes first; then the longest match.
            let mut best: Option<(bool, u64, u32, std::cmp::Reverse<usize>, usize)> = None;
            for (t, tm) in m.iter().enumerate() {
                let recent = self.recent_of(t as Tenant);
                // An exact repeat of cached text is popular-prompt traffic as often as a
                // retry: it gets the fair-share bound like a shared prefix.
                let extends = tm.continuation && tm.matched < text.len();
                if (tm.matched as f64) <= need || (!extends && recent > bound) {
                    continue;
                }
                let Some(&ci) = cand.get(t) else { continue };
                if ci == u32::MAX {
                    continue;
                }
                let key = (
                    !extends,
                    candidates[ci as usize].load(),
                    if extends { 0 } else { recent },
                    std::cmp::Reverse(tm.matched),
                    ci as usize,
                );
                if best.is_none_or(|b| key < b) {
                    best = Some(key);
                }
            }
            self.scratch_cand = cand;
            self.scratch_match = m;
            match best {
                Some((_, _, _, _, i)) => Some(i),
                None => self.least_loaded(candidates, |_| true),
            }
        };
        let Some(i) = chosen else {
            return Decision::None("no candidates".into());
        };
        let id = candidates[i].id;
        if let Some(t) = self.tenant(id) {
            if !text.is_empty() {
                self.tree.insert(text.as_bytes(), t);
            }
            self.record(t);
        }
        Decision::Worker(id)
    }

    fn export_state(&self) -> Vec<u8> {
        // Format: repeated records [u16 key len][key][u32 text len][text], oldest first.
        let mut out = Vec::new();
        for (t, text, _) in self.tree.leaf_paths() {
            let Some(Some(key)) = self.tenant_keys.get(t as usize) else {
                continue;
            };
            out.extend_from_slice(&(key.len() as u16).to_le_bytes());
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(&(text.len() as u32).to_le_bytes());
            out.extend_from_slice(&text);
        }
        out
    }

    fn import_state(&mut self, state: &[u8]) -> Result<(), String> {
        let mut rest = state;
        let mut take = |n: usize| -> Result<&[u8], String> {
            if rest.len() < n {
                return Err("cache_aware: truncated state".into());
            }
            let (a, b) = rest.split_at(n);
            rest = b;
            Ok(a)
        };
        let mut entries = Vec::new();
        loop {
            let Ok(len) = take(2) else { break };
            let klen = u16::from_le_bytes([len[0], len[1]]) as usize;
            let key = String::from_utf8(take(klen)?.to_vec())
                .map_err(|_| "cache_aware: bad worker key in state".to_string())?;
            let tl = take(4)?;
            let tlen = u32::from_le_bytes([tl[0], tl[1], tl[2], tl[3]]) as usize;
            entries.push((key, take(tlen)?.to_vec()));
        }
        for (key, text) in entries {
            // Only workers this version knows (or will know) get entries.
            let t = self.tenant_for_key(&key);
            if !self.tenant_of.contains(&Some(t)) && !self.departed.contains(&t) {
                self.departed.push(t);
            }
            self.tree.insert(&text, t);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vllm_router_sdk::testing::{FakeRequest, Harness, seed_random};

    fn chat(msgs: &[(&str, &str)]) -> FakeRequest {
        FakeRequest::chat_messages(msgs)
    }

    #[test]
    fn multi_turn_chat_keeps_its_worker() {
        seed_random(1);
        let mut h = Harness::<CacheAware>::new("{}", 4).unwrap();
        let sys = "You are a careful assistant who answers in detail. ".repeat(4);
        let mut placed = Vec::new();
        for s in 0..8 {
            let u1 = format!("conversation {s}: tell me about topic {s}");
            let w1 = h.pick(&chat(&[("system", &sys), ("user", &u1)]));
            let w2 = h.pick(&chat(&[
                ("system", &sys),
                ("user", &u1),
                ("assistant", "here is a long answer about it"),
                ("user", "and more?"),
            ]));
            assert_eq!(w1, w2, "turn 2 of conversation {s} moved");
            placed.push(w1);
        }
        // A shared system prompt does not pile conversations onto one worker.
        for w in 0..4 {
            assert_eq!(placed.iter().filter(|&&x| x == w).count(), 2, "{placed:?}");
        }
    }

    #[test]
    fn unrelated_prompts_spread_evenly() {
        seed_random(2);
        let mut h = Harness::<CacheAware>::new("{}", 4).unwrap();
        let mut counts = [0; 4];
        for i in 0..40 {
            let p = format!(
                "{i} completely unrelated prompt number {i} about {}",
                i * 7919
            );
            counts[h.pick(&FakeRequest::completion(&p)) as usize] += 1;
        }
        assert_eq!(counts, [10, 10, 10, 10]);
    }

    #[test]
    fn holder_wins_below_imbalance_and_loses_above() {
        seed_random(3);
        let mut h = Harness::<CacheAware>::new("{}", 2).unwrap();
        let doc = FakeRequest::completion(&"a long shared document ".repeat(20));
        let w = h.pick(&doc);
        // Moderately loaded holder still wins (affinity), ...
        h.set_in_flight(w, 50);
        assert_eq!(h.pick(&doc), w);
        // ... but beyond both thresholds (gap > 64 and > 1.5x) balance wins.
        h.set_in_flight(w, 100);
        h.set_in_flight(1 - w, 10);
        assert_eq!(h.pick(&doc), 1 - w);
    }

    #[test]
    fn unhealthy_holder_is_skipped_and_kept() {
        seed_random(4);
        let mut h = Harness::<CacheAware>::new("{}", 3).unwrap();
        let doc = FakeRequest::completion(&"the prompt we keep sending ".repeat(10));
        let w = h.pick(&doc);
        h.set_healthy(w, false);
        let other = h.pick(&doc);
        assert_ne!(other, w);
        h.set_healthy(w, true);
        // Both hold it now; the least loaded holder wins, and the first holder kept its
        // entries while it was away.
        h.set_in_flight(other, 3);
        assert_eq!(h.pick(&doc), w);
    }

    #[test]
    fn tree_stays_within_caps() {
        seed_random(5);
        let cfg = r#"{"max_tree_size": 20000, "max_total_bytes": 50000}"#;
        let mut h = Harness::<CacheAware>::new(cfg, 4).unwrap();
        for i in 0..2000 {
            let p = format!("{i} {}", "lorem ipsum ".repeat(1 + i % 40));
            h.pick(&FakeRequest::completion(&p));
            assert!(h.policy.tree().total_size() <= 50000);
            for t in 0..4 {
                assert!(h.policy.tree().tenant_size(t) <= 20000);
            }
        }
    }

    #[test]
    fn state_round_trip_keeps_affinity() {
        seed_random(6);
        let mut a = Harness::<CacheAware>::new("{}", 4).unwrap();
        let reqs: Vec<FakeRequest> = (0..8)
            .map(|i| FakeRequest::completion(&format!("document {i} ").repeat(30)))
            .collect();
        let placed: Vec<u32> = reqs.iter().map(|r| a.pick(r)).collect();
        let state = a.policy.export_state();
        let mut b = Harness::<CacheAware>::new("{}", 4).unwrap();
        b.policy.import_state(&state).unwrap();
        for (r, w) in reqs.iter().zip(&placed) {
            assert_eq!(b.pick(r), *w);
        }
        assert!(b.policy.import_state(&[1, 0]).is_err());
    }

    #[test]
    fn config_is_checked() {
        assert!(CacheAware::new(r#"{"cache_threshold": 1.5}"#).is_err());
        assert!(CacheAware::new(r#"{"balance_rel_threshold": 0.5}"#).is_err());
        assert!(CacheAware::new(r#"{"bogus": 1}"#).is_err());
        assert!(CacheAware::new(r#"{"cache_threshold": 0.5, "max_tree_size": 1000}"#).is_ok());
    }
}
