//! An approximate radix tree over routing text, shared by all workers ("tenants"), after
//! SGLang's router (`sgl-router/src/tree.rs`, itself modelled on SGLang's RadixAttention
//! cache): one tree of byte strings, every node remembering which tenants inserted text
//! through it and when. It approximates each worker's prefix cache without a tokenizer.
//!
//! Differences from SGLang's tree, with reasons:
//! - **Bounded at all times.** Each tenant's size (bytes of text it holds) is capped by
//!   `max_tenant_bytes` and the whole tree by `max_total_bytes`; an insert that crosses a
//!   cap evicts least-recently-used leaves right away (down to 90 % of the cap, so the
//!   cost is amortised). SGLang trims only on a timer, so memory grows without bound in
//!   between.
//! - Single-threaded arena (`Vec<Node>` + free list, `u32` links): a policy instance is
//!   never called concurrently, so no sharded maps or locks.
//! - Logical clock (one tick per insert) instead of wall time: strictly ordered, no host
//!   call.
//!
//! Invariant: a tenant present on a node is present on all its ancestors (inserts mark
//! the whole path; eviction removes a tenant only from nodes where no child holds it).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Index of a tenant (worker slot) in the tree.
pub type Tenant = u16;

const ROOT: u32 = 0;
const NONE: u32 = u32::MAX;

#[derive(Clone, Debug, Default)]
struct Node {
    /// Text on the edge into this node (empty for the root).
    edge: Vec<u8>,
    parent: u32,
    /// First byte of each child's edge, parallel to `children` (scanned linearly).
    child_keys: Vec<u8>,
    children: Vec<u32>,
    /// Tenants holding this node, with their last access tick.
    tenants: Vec<(Tenant, u64)>,
}

impl Node {
    fn has(&self, t: Tenant) -> bool {
        self.tenants.iter().any(|(x, _)| *x == t)
    }
    fn stamp(&self, t: Tenant) -> Option<u64> {
        self.tenants.iter().find(|(x, _)| *x == t).map(|(_, s)| *s)
    }
}

/// The result of matching a text against the tree, per tenant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TenantMatch {
    /// Bytes of the text this tenant holds as a prefix.
    pub matched: usize,
    /// True when the text *extends* this tenant's cached text (the tenant's cached path
    /// ends exactly where the match ends, or the whole text matched): a later turn of the
    /// same conversation, or a repeat. False when the text branches off in the middle of
    /// cached text (a shared system prompt or few-shot header followed by something new).
    pub continuation: bool,
}

/// The approximate radix tree.
#[derive(Clone, Debug)]
pub struct RadixTree {
    nodes: Vec<Node>,
    free: Vec<u32>,
    tenant_bytes: Vec<u64>,
    total_bytes: u64,
    clock: u64,
    /// Per-tenant cap, bytes of text.
    pub max_tenant_bytes: u64,
    /// Whole-tree cap, bytes of edge text.
    pub max_total_bytes: u64,
}

fn lcp(a: &[u8], b: &[u8]) -> usize {
    let n = a.len().min(b.len());
    // Compare 8 bytes at a time, then finish bytewise.
    let mut i = 0;
    while i + 8 <= n {
        let x = u64::from_ne_bytes(a[i..i + 8].try_into().unwrap());
        let y = u64::from_ne_bytes(b[i..i + 8].try_into().unwrap());
        if x != y {
            break;
        }
        i += 8;
    }
    while i < n && a[i] == b[i] {
        i += 1;
    }
    i
}

impl RadixTree {
    /// An empty tree with the given caps (bytes).
    pub fn new(max_tenant_bytes: u64, max_total_bytes: u64) -> Self {
        RadixTree {
            nodes: vec![Node {
                parent: NONE,
                ..Node::default()
            }],
            free: Vec::new(),
            tenant_bytes: Vec::new(),
            total_bytes: 0,
            clock: 0,
            max_tenant_bytes,
            max_total_bytes,
        }
    }

    /// Bytes of text held by tenant `t`.
    pub fn tenant_size(&self, t: Tenant) -> u64 {
        self.tenant_bytes.get(t as usize).copied().unwrap_or(0)
    }

    /// Bytes of edge text stored in the tree (each shared byte once).
    pub fn total_size(&self) -> u64 {
        self.total_bytes
    }

    /// Live nodes, root included.
    pub fn node_count(&self) -> usize {
        self.nodes.len() - self.free.len()
    }

    fn child(&self, n: u32, first: u8) -> Option<u32> {
        let node = &self.nodes[n as usize];
        node.child_keys
            .iter()
            .position(|k| *k == first)
            .map(|i| node.children[i])
    }

    fn alloc(&mut self, node: Node) -> u32 {
        match self.free.pop() {
            Some(i) => {
                self.nodes[i as usize] = node;
                i
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as u32
            }
        }
    }

    fn add_bytes(&mut self, t: Tenant, n: u64) {
        let t = t as usize;
        if self.tenant_bytes.len() <= t {
            self.tenant_bytes.resize(t + 1, 0);
        }
        self.tenant_bytes[t] += n;
    }

    fn touch(&mut self, n: u32, t: Tenant, now: u64) {
        let len = self.nodes[n as usize].edge.len() as u64;
        let node = &mut self.nodes[n as usize];
        match node.tenants.iter_mut().find(|(x, _)| *x == t) {
            Some(e) => e.1 = now,
            None => {
                node.tenants.push((t, now));
                self.add_bytes(t, len);
            }
        }
    }

    /// Match `text` and report, for each tenant `t` with `want(t)`, how much of `text` it
    /// holds as a prefix (`out[t]`, resized to cover every tenant seen). Returns the
    /// number of bytes matched by any tenant.
    pub fn match_prefix(
        &self,
        text: &[u8],
        want: impl Fn(Tenant) -> bool,
        out: &mut Vec<TenantMatch>,
    ) -> usize {
        let mut node = ROOT;
        let mut pos = 0usize;
        let mut best = 0usize;
        let set = |out: &mut Vec<TenantMatch>, t: Tenant, m: TenantMatch| {
            let i = t as usize;
            if out.len() <= i {
                out.resize(i + 1, TenantMatch::default());
            }
            out[i] = m;
        };
        loop {
            let rest = &text[pos..];
            let next = if rest.is_empty() {
                None
            } else {
                self.child(node, rest[0])
            };
            let Some(c) = next else {
                // The walk ends at `node`'s boundary: tenants here extend their cached
                // text iff they hold no child (their cached path ends here too) or the
                // whole text is consumed.
                if node != ROOT {
                    let n = &self.nodes[node as usize];
                    for &(t, _) in &n.tenants {
                        if !want(t) {
                            continue;
                        }
                        let cont = rest.is_empty()
                            || !n.children.iter().any(|&ch| self.nodes[ch as usize].has(t));
                        set(
                            out,
                            t,
                            TenantMatch {
                                matched: pos,
                                continuation: cont,
                            },
                        );
                    }
                }
                return best.max(if node == ROOT { 0 } else { pos });
            };
            let cn = &self.nodes[c as usize];
            let common = lcp(&cn.edge, rest);
            // Tenants that stop at `node` (not in `c`) branch off or end here.
            if node != ROOT {
                let n = &self.nodes[node as usize];
                for &(t, _) in &n.tenants {
                    if want(t) && !cn.has(t) {
                        let cont = !n.children.iter().any(|&ch| self.nodes[ch as usize].has(t));
                        set(
                            out,
                            t,
                            TenantMatch {
                                matched: pos,
                                continuation: cont,
                            },
                        );
                    }
                }
            }
            best = pos + common;
            if common < cn.edge.len() {
                // The text diverges inside `c`'s edge (or ends inside it).
                let ended = pos + common == text.len();
                for &(t, _) in &cn.tenants {
                    if want(t) {
                        set(
                            out,
                            t,
                            TenantMatch {
                                matched: pos + common,
                                continuation: ended,
                            },
                        );
                    }
                }
                return best;
            }
            pos += common;
            node = c;
        }
    }

    /// Record that tenant `t` now caches `text`: marks the path, splitting an edge where
    /// the text diverges, then enforces the caps.
    pub fn insert(&mut self, text: &[u8], t: Tenant) {
        self.clock += 1;
        let now = self.clock;
        let mut node = ROOT;
        let mut pos = 0usize;
        while pos < text.len() {
            let rest = &text[pos..];
            match self.child(node, rest[0]) {
                None => {
                    let leaf = self.alloc(Node {
                        edge: rest.to_vec(),
                        parent: node,
                        child_keys: Vec::new(),
                        children: Vec::new(),
                        tenants: vec![(t, now)],
                    });
                    let n = &mut self.nodes[node as usize];
                    n.child_keys.push(rest[0]);
                    n.children.push(leaf);
                    self.add_bytes(t, rest.len() as u64);
                    self.total_bytes += rest.len() as u64;
                    break;
                }
                Some(c) => {
                    let common = lcp(&self.nodes[c as usize].edge, rest);
                    let c = if common < self.nodes[c as usize].edge.len() {
                        self.split(c, common)
                    } else {
                        c
                    };
                    self.touch(c, t, now);
                    pos += common;
                    node = c;
                }
            }
        }
        self.enforce(t);
    }

    /// Split node `c` after `at` bytes of its edge; returns the new upper node. Tenant
    /// sizes and the total do not change (the same bytes, in two pieces).
    fn split(&mut self, c: u32, at: usize) -> u32 {
        let parent = self.nodes[c as usize].parent;
        let tail = self.nodes[c as usize].edge.split_off(at);
        let head = std::mem::replace(&mut self.nodes[c as usize].edge, tail);
        let tenants = self.nodes[c as usize].tenants.clone();
        let first_tail = self.nodes[c as usize].edge[0];
        let mid = self.alloc(Node {
            edge: head,
            parent,
            child_keys: vec![first_tail],
            children: vec![c],
            tenants,
        });
        self.nodes[c as usize].parent = mid;
        let p = &mut self.nodes[parent as usize];
        let i = p
            .children
            .iter()
            .position(|&x| x == c)
            .expect("child of parent");
        p.children[i] = mid;
        mid
    }

    fn enforce(&mut self, t: Tenant) {
        if self.tenant_size(t) > self.max_tenant_bytes {
            let target = self.max_tenant_bytes / 10 * 9;
            self.evict(Some(t), |tree| tree.tenant_size(t) <= target);
        }
        if self.total_bytes > self.max_total_bytes {
            let target = self.max_total_bytes / 10 * 9;
            self.evict(None, |tree| tree.total_bytes <= target);
        }
    }

    /// Evict least-recently-used leaf entries (of tenant `only`, or of any tenant) until
    /// `done`. A leaf entry is (node, tenant) where no child of the node holds the tenant;
    /// removing it keeps the ancestor invariant. Nodes left without tenants are freed.
    fn evict(&mut self, only: Option<Tenant>, done: impl Fn(&Self) -> bool) {
        let mut heap: BinaryHeap<Reverse<(u64, u32, Tenant)>> = BinaryHeap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if i as u32 == ROOT || (n.tenants.is_empty() && n.parent == NONE) {
                continue;
            }
            for &(t, stamp) in &n.tenants {
                if only.is_some_and(|o| o != t) {
                    continue;
                }
                if !n.children.iter().any(|&c| self.nodes[c as usize].has(t)) {
                    heap.push(Reverse((stamp, i as u32, t)));
                }
            }
        }
        while !done(self) {
            let Some(Reverse((_, n, t))) = heap.pop() else {
                break;
            };
            let parent = self.remove_tenant(n, t);
            if parent != ROOT && parent != NONE {
                let p = &self.nodes[parent as usize];
                if let Some(stamp) = p.stamp(t) {
                    if !p.children.iter().any(|&c| self.nodes[c as usize].has(t)) {
                        heap.push(Reverse((stamp, parent, t)));
                    }
                }
            }
        }
    }

    /// Remove tenant `t` from leaf entry `n`; free the node when no tenant is left.
    /// Returns the node's parent.
    fn remove_tenant(&mut self, n: u32, t: Tenant) -> u32 {
        let node = &mut self.nodes[n as usize];
        let Some(i) = node.tenants.iter().position(|(x, _)| *x == t) else {
            return node.parent;
        };
        node.tenants.swap_remove(i);
        let len = node.edge.len() as u64;
        let parent = node.parent;
        let empty = node.tenants.is_empty();
        self.tenant_bytes[t as usize] -= len;
        if empty {
            debug_assert!(self.nodes[n as usize].children.is_empty());
            let p = &mut self.nodes[parent as usize];
            if let Some(j) = p.children.iter().position(|&x| x == n) {
                p.children.swap_remove(j);
                p.child_keys.swap_remove(j);
            }
            self.total_bytes -= len;
            self.nodes[n as usize] = Node {
                parent: NONE,
                ..Node::default()
            };
            self.free.push(n);
        }
        parent
    }

    /// Remove every entry of tenant `t` (a worker left the fleet).
    pub fn remove_all(&mut self, t: Tenant) {
        self.evict(Some(t), |tree| tree.tenant_size(t) == 0);
    }

    /// Serialise as `(tenant, text, last access)` paths, one per leaf entry: compact
    /// enough for a hot-swap hand-off and independent of the arena layout.
    pub fn leaf_paths(&self) -> Vec<(Tenant, Vec<u8>, u64)> {
        let mut out = Vec::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if i as u32 == ROOT || n.tenants.is_empty() {
                continue;
            }
            for &(t, stamp) in &n.tenants {
                if n.children.iter().any(|&c| self.nodes[c as usize].has(t)) {
                    continue;
                }
                let mut path = Vec::new();
                let mut cur = i as u32;
                let mut parts = Vec::new();
                while cur != ROOT {
                    parts.push(cur);
                    cur = self.nodes[cur as usize].parent;
                }
                for p in parts.iter().rev() {
                    path.extend_from_slice(&self.nodes[*p as usize].edge);
                }
                out.push((t, path, stamp));
            }
        }
        out.sort_by_key(|(_, _, s)| *s);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(tree: &RadixTree, text: &str) -> Vec<TenantMatch> {
        let mut out = Vec::new();
        tree.match_prefix(text.as_bytes(), |_| true, &mut out);
        out
    }

    #[test]
    fn match_lengths_and_continuation() {
        let mut t = RadixTree::new(1 << 20, 1 << 20);
        t.insert(b"system\nbe nice\nuser\nhello", 0);
        t.insert(b"system\nbe nice\nuser\nweather?", 1);
        let m = matches(&t, "system\nbe nice\nuser\nhello\nassistant\nhi");
        assert_eq!(m[0].matched, 25);
        assert!(m[0].continuation);
        assert_eq!(m[1].matched, 20);
        assert!(!m[1].continuation);
        let m = matches(&t, "system\nbe nice\nuser\nsomething else");
        assert!(!m[0].continuation && !m[1].continuation);
        assert_eq!(m[0].matched, 20);
        // A repeat is a continuation.
        let m = matches(&t, "system\nbe nice\nuser\nhello");
        assert!(m[0].continuation && m[0].matched == 25);
    }

    #[test]
    fn sizes_account_shared_bytes_once_in_total() {
        let mut t = RadixTree::new(1 << 20, 1 << 20);
        t.insert(b"abcdef", 0);
        t.insert(b"abcxyz", 1);
        assert_eq!(t.tenant_size(0), 6);
        assert_eq!(t.tenant_size(1), 6);
        assert_eq!(t.total_size(), 9);
        t.remove_all(0);
        assert_eq!(t.tenant_size(0), 0);
        assert_eq!(t.total_size(), 6);
        assert_eq!(matches(&t, "abcdef")[1].matched, 3);
    }

    #[test]
    fn caps_hold_after_every_insert() {
        let mut t = RadixTree::new(10_000, 25_000);
        let mut seed = 7u64;
        for i in 0..3000 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let text = format!(
                "prefix-{} body {} {}",
                seed % 13,
                seed,
                "x".repeat((seed % 200) as usize)
            );
            t.insert(text.as_bytes(), (i % 4) as Tenant);
            for tenant in 0..4 {
                assert!(t.tenant_size(tenant) <= 10_000);
            }
            assert!(t.total_size() <= 25_000);
        }
        // The recently inserted text is still there.
        assert!(t.node_count() > 10);
    }

    #[test]
    fn eviction_drops_least_recently_used_first() {
        let mut t = RadixTree::new(100, 1 << 20);
        t.insert(&[b'a'; 40], 0);
        t.insert(&[b'b'; 40], 0);
        // Touch "a" again so "b" is the oldest.
        t.insert(&[b'a'; 40], 0);
        t.insert(&[b'c'; 40], 0);
        let m = matches(&t, &"a".repeat(40));
        assert_eq!(m[0].matched, 40);
        let m = matches(&t, &"b".repeat(40));
        assert!(m.is_empty() || m[0].matched == 0);
    }

    #[test]
    fn leaf_paths_rebuild_the_same_matches() {
        let mut t = RadixTree::new(1 << 20, 1 << 20);
        t.insert(b"hello world", 0);
        t.insert(b"hello there", 1);
        t.insert(b"goodbye", 2);
        let mut u = RadixTree::new(1 << 20, 1 << 20);
        for (tenant, text, _) in t.leaf_paths() {
            u.insert(&text, tenant);
        }
        for q in ["hello world!", "hello th", "good", "zzz"] {
            assert_eq!(matches(&t, q), matches(&u, q), "{q}");
        }
        assert_eq!(t.total_size(), u.total_size());
    }
}
