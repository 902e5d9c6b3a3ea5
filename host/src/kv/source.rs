//! One subscriber per (worker, data-parallel rank): a ZMQ SUB socket on the engine's
//! KV-event publisher, the sequence-number bookkeeping, and the replay of lost batches
//! from the engine's ROUTER socket.
//!
//! States ([`SourceState`]): *fallback* until the first batch; *exact* while every
//! sequence number follows the last; *degraded* while disconnected or while a gap is
//! being replayed. A gap with a replay socket is filled from it (vLLM keeps the last
//! `buffer_steps` batches); a gap the replay cannot fill, or any gap without a replay
//! socket, **resets** the source (its blocks are forgotten: what the router then
//! misses costs a cache hit, whereas a stale block — a lost `BlockRemoved` — would
//! send requests to a worker that no longer has the prefix). A sequence number that
//! goes backwards is an engine restart: the source is cleared (the engine's cache is
//! empty) and followed from there.

use super::events::{decode_batch, decode_seq};
use super::index::{KvIndex, SourceState};
use crate::metrics::Metrics;
use futures_util::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use zeromq::{Socket, SocketEvent, SocketRecv, SocketSend, ZmqMessage};

/// Where one worker's events come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceSpec {
    /// The worker's id in the registry.
    pub worker: u32,
    /// The worker's metric label (`url` or `url@rank`).
    pub name: String,
    /// The publisher, e.g. `tcp://10.0.1.2:5557`.
    pub endpoint: String,
    /// The replay ROUTER socket, if the engine has one (`replay_endpoint`).
    pub replay: Option<String>,
}

/// What a sequence number means after the previous one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqStep {
    /// The first batch seen from this publisher.
    First,
    /// The next one.
    Next,
    /// Already seen (a replayed batch delivered live too).
    Duplicate,
    /// Batches `from..seq` were lost.
    Gap {
        /// First missing sequence number.
        from: u64,
    },
    /// The number went backwards: the engine restarted.
    Restart,
}

/// The last sequence number of one publisher.
#[derive(Debug, Default, Clone, Copy)]
pub struct SeqTracker {
    last: Option<u64>,
}

impl SeqTracker {
    /// Classify `seq` and remember it (a duplicate is not remembered).
    pub fn observe(&mut self, seq: u64) -> SeqStep {
        let step = match self.last {
            None => SeqStep::First,
            Some(l) if seq == l.wrapping_add(1) => SeqStep::Next,
            Some(l) if seq == l => SeqStep::Duplicate,
            Some(l) if seq < l => SeqStep::Restart,
            Some(l) => SeqStep::Gap { from: l + 1 },
        };
        if step != SeqStep::Duplicate {
            self.last = Some(seq);
        }
        step
    }
}

/// How long a connect or a replay may take before it counts as failed.
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// Follow one source until the task is aborted (the worker left).
pub async fn run(spec: SourceSpec, index: Arc<KvIndex>, metrics: Arc<Metrics>) {
    let mut seq = SeqTracker::default();
    let mut backoff = Duration::from_millis(200);
    let mut warned = false;
    loop {
        let mut sub = zeromq::SubSocket::new();
        let mut monitor = sub.monitor();
        let connected = tokio::time::timeout(IO_TIMEOUT, sub.connect(&spec.endpoint)).await;
        match connected {
            Ok(Ok(())) => {}
            other => {
                if !warned {
                    warned = true;
                    let why = match other {
                        Ok(Err(e)) => e.to_string(),
                        _ => "timed out".into(),
                    };
                    tracing::warn!(worker = %spec.name, endpoint = %spec.endpoint,
                        "cannot subscribe to KV events ({why}); retrying, routing without them for this worker meanwhile");
                }
                degrade(&index, &metrics, &spec);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        }
        if sub.subscribe("").await.is_err() {
            tokio::time::sleep(backoff).await;
            continue;
        }
        backoff = Duration::from_millis(200);
        warned = false;
        tracing::info!(worker = %spec.name, endpoint = %spec.endpoint, replay = ?spec.replay, "subscribed to KV events");
        loop {
            tokio::select! {
                m = sub.recv() => match m {
                    Ok(msg) => on_message(&spec, &index, &metrics, &mut seq, msg).await,
                    Err(e) => {
                        tracing::warn!(worker = %spec.name, "KV event socket failed: {e}; reconnecting");
                        break;
                    }
                },
                ev = monitor.next() => match ev {
                    Some(SocketEvent::Disconnected(_)) | None => {
                        tracing::warn!(worker = %spec.name, endpoint = %spec.endpoint, "KV event publisher disconnected; reconnecting (source degraded meanwhile)");
                        break;
                    }
                    Some(_) => {}
                },
            }
        }
        degrade(&index, &metrics, &spec);
        tokio::time::sleep(backoff).await;
    }
}

/// An exact source that lost its publisher becomes degraded (fallback stays fallback).
fn degrade(index: &KvIndex, metrics: &Metrics, spec: &SourceSpec) {
    if index.state(spec.worker) == SourceState::Exact {
        set_state(index, metrics, spec, SourceState::Degraded);
    }
}

fn set_state(index: &KvIndex, metrics: &Metrics, spec: &SourceSpec, s: SourceState) {
    index.set_state(spec.worker, s);
    metrics.kv_state(&spec.name, s);
}

/// Decode and apply one batch payload; false when it could not be decoded.
fn apply(spec: &SourceSpec, index: &KvIndex, metrics: &Metrics, payload: &[u8]) -> bool {
    match decode_batch(payload) {
        Ok(b) => {
            let a = index.apply(spec.worker, &b.events);
            metrics.kv_applied(&a);
            metrics
                .kv_index_blocks
                .with_label_values(&[&spec.name])
                .set(index.source_blocks(spec.worker) as i64);
            true
        }
        Err(why) => {
            metrics.kv_decode_errors.inc();
            tracing::debug!(worker = %spec.name, "undecodable KV event batch ({} bytes): {why}", payload.len());
            false
        }
    }
}

async fn on_message(
    spec: &SourceSpec,
    index: &KvIndex,
    metrics: &Metrics,
    seq: &mut SeqTracker,
    msg: ZmqMessage,
) {
    let frames = msg.into_vec();
    // [topic, seq, payload]; a publisher without a topic frame sends [seq, payload].
    if frames.len() < 2 {
        metrics.kv_decode_errors.inc();
        return;
    }
    let (seq_frame, payload) = (&frames[frames.len() - 2], &frames[frames.len() - 1]);
    let Ok(Some(n)) = decode_seq(seq_frame) else {
        metrics.kv_decode_errors.inc();
        return;
    };
    match seq.observe(n) {
        SeqStep::Next => {}
        SeqStep::Duplicate => return,
        SeqStep::First => {
            // Batches published before we connected are in the replay buffer.
            if let Some(r) = &spec.replay {
                if n > 0 {
                    let _ = replay_into(spec, index, metrics, r, 0, n).await;
                }
            }
        }
        SeqStep::Restart => {
            tracing::info!(worker = %spec.name, seq = n, "KV event sequence went backwards: engine restarted; its index entries are cleared");
            index.clear_source(spec.worker);
            metrics.kv_resync("restart");
            metrics
                .kv_index_blocks
                .with_label_values(&[&spec.name])
                .set(0);
        }
        SeqStep::Gap { from } => {
            set_state(index, metrics, spec, SourceState::Degraded);
            let filled = match &spec.replay {
                Some(r) => replay_into(spec, index, metrics, r, from, n).await,
                None => false,
            };
            if filled {
                metrics.kv_resync("replayed");
                tracing::debug!(worker = %spec.name, "KV event gap {from}..{n} filled by replay");
            } else {
                index.clear_source(spec.worker);
                metrics.kv_resync("reset");
                tracing::info!(worker = %spec.name, "KV event batches {from}..{n} lost{}; the worker's index entries were reset",
                    if spec.replay.is_some() { " and not replayable" } else { " (no replay endpoint)" });
            }
        }
    }
    if apply(spec, index, metrics, payload) && index.state(spec.worker) != SourceState::Exact {
        set_state(index, metrics, spec, SourceState::Exact);
    }
}

/// Ask the replay socket for batches `from..until` and apply them in order. True when
/// every one arrived.
async fn replay_into(
    spec: &SourceSpec,
    index: &KvIndex,
    metrics: &Metrics,
    endpoint: &str,
    from: u64,
    until: u64,
) -> bool {
    let got = tokio::time::timeout(IO_TIMEOUT, fetch_replay(endpoint, from)).await;
    let batches = match got {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            tracing::warn!(worker = %spec.name, endpoint, "KV event replay failed: {e}");
            return false;
        }
        Err(_) => {
            tracing::warn!(worker = %spec.name, endpoint, "KV event replay timed out");
            return false;
        }
    };
    let mut next = from;
    for (s, payload) in batches {
        if s < next || s >= until {
            continue;
        }
        if s != next {
            return false;
        }
        apply(spec, index, metrics, &payload);
        next += 1;
    }
    next == until
}

/// vLLM's replay protocol: a DEALER sends `["", start_seq (8 bytes BE)]`; the engine's
/// ROUTER answers `["", seq, payload]` per buffered batch from `start_seq`, then
/// `["", -1, ""]`.
async fn fetch_replay(endpoint: &str, from: u64) -> Result<Vec<(u64, bytes::Bytes)>, String> {
    let mut d = zeromq::DealerSocket::new();
    d.connect(endpoint).await.map_err(|e| e.to_string())?;
    let req = ZmqMessage::try_from(vec![
        bytes::Bytes::new(),
        bytes::Bytes::copy_from_slice(&from.to_be_bytes()),
    ])
    .map_err(|e| format!("{e:?}"))?;
    d.send(req).await.map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    loop {
        let frames = d.recv().await.map_err(|e| e.to_string())?.into_vec();
        let frames: Vec<_> = frames.into_iter().skip_while(|f| f.is_empty()).collect();
        let Some(seq) = frames.first() else {
            continue;
        };
        match decode_seq(seq)? {
            None => return Ok(out),
            Some(s) => out.push((s, frames.get(1).cloned().unwrap_or_default())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_steps() {
        let mut t = SeqTracker::default();
        assert_eq!(t.observe(5), SeqStep::First);
        assert_eq!(t.observe(6), SeqStep::Next);
        assert_eq!(t.observe(6), SeqStep::Duplicate);
        assert_eq!(t.observe(9), SeqStep::Gap { from: 7 });
        assert_eq!(t.observe(10), SeqStep::Next);
        assert_eq!(t.observe(0), SeqStep::Restart);
        assert_eq!(t.observe(1), SeqStep::Next);
    }
}
