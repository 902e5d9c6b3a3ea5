//! `--record-trace PATH`: one JSON line per routed request stage with what a policy saw,
//! for `vllm-router policy replay` (another policy over the same traffic, offline).
//!
//! Safe to hand to another team by default: the prompt is recorded as **prefix-block
//! hashes** (the routing text cut into blocks of [`BLOCK_CHARS`] characters, each keyed
//! by a chained 64-bit FNV-1a hash covering everything before it, as vLLM's prefix cache
//! keys blocks; the simulator uses the same keys), and session-key header values and the
//! body's `user` as 64-bit hashes. Raw text only with `--record-trace-text`.
//!
//! Line shape (`t_ms` since the router started; `stage` regular|prefill|decode):
//! `{"t_ms":12,"path":"/v1/chat/completions","model":"m","stage":"regular",
//!   "body_bytes":5120,"text_bytes":4096,"blocks":["9f…",…],"keys":{"x-session-id":"3a…"},
//!   "user":"…","slot":"default","worker":"http://10.0.0.1:8000","fallback":false}`
//!
//! The request path only formats a line and hands it to a bounded channel (4096 lines);
//! a writer thread appends to the file and rotates it at `--record-trace-max-mb` (the
//! previous file becomes `PATH.1`, one generation kept). Lines are dropped, never waited
//! for, when the writer falls behind (counted in the log at shutdown).

use crate::request::RequestInfo;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use vllm_router_runtime::RequestView;

/// Characters per prefix block (64 ≈ 16 tokens, vLLM's default block size).
pub const BLOCK_CHARS: usize = 64;

/// Header whose values make session keys (the consistent_hash key headers).
pub const KEY_HEADERS: &[&str] = &[
    "x-session-id",
    "x-user-id",
    "x-tenant-id",
    "x-correlation-id",
    "x-trace-id",
];

/// 64-bit FNV-1a (offset basis and prime of the FNV spec).
pub fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = seed;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// FNV-1a offset basis.
pub const FNV_BASIS: u64 = 0xcbf2_9ce4_8422_2325;

/// Chained block keys of `text`: key *i* hashes blocks 0..=i (complete blocks only).
pub fn block_keys(text: &[u8]) -> Vec<u64> {
    let mut h = FNV_BASIS;
    text.chunks_exact(BLOCK_CHARS)
        .map(|b| {
            h = fnv1a(h, b);
            h
        })
        .collect()
}

/// Records routed request stages to a file (see the module docs).
pub struct TraceRecorder {
    tx: SyncSender<String>,
    raw_text: bool,
    dropped: AtomicU64,
}

impl TraceRecorder {
    /// Start the writer thread for `path` (created or appended to). `max_bytes`: rotate
    /// when the file would grow past it. `raw_text`: also record the routing text.
    pub fn start(path: PathBuf, max_bytes: u64, raw_text: bool) -> anyhow::Result<Self> {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| anyhow::anyhow!("--record-trace {}: {e}", path.display()))?;
        let mut size = file.metadata().map(|m| m.len()).unwrap_or(0);
        let (tx, rx) = std::sync::mpsc::sync_channel::<String>(4096);
        std::thread::Builder::new()
            .name("trace-writer".into())
            .spawn(move || {
                let mut out = std::io::BufWriter::new(file.try_clone().expect("trace file"));
                let mut dirty = false;
                loop {
                    // Block while nothing is buffered (an idle router stays idle); with
                    // lines buffered, flush after 200 ms without a new one.
                    let next = if dirty {
                        rx.recv_timeout(std::time::Duration::from_millis(200))
                    } else {
                        rx.recv()
                            .map_err(|_| std::sync::mpsc::RecvTimeoutError::Disconnected)
                    };
                    let line = match next {
                        Ok(line) => line,
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                            let _ = out.flush();
                            dirty = false;
                            continue;
                        }
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                    };
                    dirty = true;
                    if size + line.len() as u64 > max_bytes && size > 0 {
                        let _ = out.flush();
                        let mut rotated = path.clone().into_os_string();
                        rotated.push(".1");
                        let _ = std::fs::rename(&path, &rotated);
                        match std::fs::File::create(&path) {
                            Ok(f) => {
                                file = f;
                                out = std::io::BufWriter::new(file.try_clone().expect("trace"));
                                size = 0;
                            }
                            Err(e) => {
                                tracing::warn!("trace rotation failed, recording stops: {e}");
                                return;
                            }
                        }
                    }
                    size += line.len() as u64;
                    let _ = out.write_all(line.as_bytes());
                }
                let _ = out.flush();
            })?;
        Ok(TraceRecorder {
            tx,
            raw_text,
            dropped: AtomicU64::new(0),
        })
    }

    /// Record one decided request stage. Never blocks.
    pub fn record(
        &self,
        req: &RequestInfo,
        stage: &str,
        slot: Option<&str>,
        worker: &str,
        fallback: bool,
    ) {
        let text = req.routing_text();
        let blocks: Vec<String> = block_keys(text.as_bytes())
            .iter()
            .map(|k| format!("{k:016x}"))
            .collect();
        let mut keys = serde_json::Map::new();
        for h in KEY_HEADERS {
            if let Some(v) = RequestView::header(req, h) {
                keys.insert(
                    (*h).to_string(),
                    format!("{:016x}", fnv1a(FNV_BASIS, v.as_bytes())).into(),
                );
            }
        }
        let mut line = serde_json::json!({
            "t_ms": crate::util::uptime_ms(),
            "path": req.path,
            "model": req.model,
            "stage": stage,
            "body_bytes": req.body.len(),
            "text_bytes": text.len(),
            "blocks": blocks,
            "keys": keys,
            "slot": slot,
            "worker": worker,
            "fallback": fallback,
        });
        if let Some(u) = req.body_field("user") {
            line["user"] = format!("{:016x}", fnv1a(FNV_BASIS, u.as_bytes())).into();
        }
        if self.raw_text {
            line["text"] = text.into();
        }
        let mut s = line.to_string();
        s.push('\n');
        if let Err(TrySendError::Full(_)) = self.tx.try_send(s) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Lines dropped because the writer fell behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_keys_share_a_prefix_exactly_when_the_text_does() {
        let a = "x".repeat(BLOCK_CHARS * 3);
        let mut b = "x".repeat(BLOCK_CHARS * 2);
        b.push_str(&"y".repeat(BLOCK_CHARS));
        let (ka, kb) = (block_keys(a.as_bytes()), block_keys(b.as_bytes()));
        assert_eq!(ka.len(), 3);
        assert_eq!(ka[..2], kb[..2]);
        assert_ne!(ka[2], kb[2]);
        // Partial trailing block: not a key (as vLLM caches only full blocks).
        assert_eq!(block_keys(&a.as_bytes()[..BLOCK_CHARS * 2 + 10]).len(), 2);
    }
}
