//! Decoding vLLM's KV-cache events (`vllm/distributed/kv_events.py`).
//!
//! A ZMQ message is `[topic, seq (u64 big-endian), payload]`; the payload is a msgpack
//! `KVEventBatch` — `[ts, events, data_parallel_rank]` (msgspec `array_like`), a map
//! with those names accepted too. Each event is a msgspec struct tagged `type` with its
//! class name: a **map** (`{"type": "BlockStored", "block_hashes": …}`, newer vLLM) or
//! an **array** with the tag first (`["BlockStored", block_hashes, parent_block_hash,
//! token_ids, block_size, lora_id, medium, lora_name, …]`, older vLLM; trailing default
//! fields omitted). Both are decoded. Block hashes are msgpack bytes (the digest; its
//! low 64 bits, big-endian, are kept) or unsigned integers
//! (`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`, the same low 64 bits); a negative integer
//! is an error.

use rmpv::Value;

/// One decoded `KVEventBatch`.
#[derive(Debug, Clone, PartialEq)]
pub struct EventBatch {
    /// Engine timestamp, seconds since the epoch (informational).
    pub ts: f64,
    /// Events in engine order.
    pub events: Vec<KvEvent>,
    /// The publishing engine's data-parallel rank, when the batch carries one.
    pub dp_rank: Option<u32>,
}

/// One KV-cache event. Unknown event types decode to [`KvEvent::Other`] (ignored).
#[derive(Debug, Clone, PartialEq)]
pub enum KvEvent {
    /// Blocks entered the engine's prefix cache.
    BlockStored {
        /// Engine hashes of the stored blocks, in chain order (low 64 bits).
        block_hashes: Vec<u64>,
        /// Engine hash of the block before the first one; `None` = they start the prompt.
        parent: Option<u64>,
        /// Token ids of all stored blocks, `block_size` per block.
        token_ids: Vec<u32>,
        /// Tokens per block.
        block_size: u32,
        /// LoRA adapter the blocks belong to, if any.
        lora_name: Option<String>,
        /// Storage tier (`GPU`, `CPU`, …); `None` when the event has no medium (GPU).
        medium: Option<String>,
    },
    /// Blocks left the cache.
    BlockRemoved {
        /// Engine hashes of the removed blocks.
        block_hashes: Vec<u64>,
        /// Storage tier, as for `BlockStored`.
        medium: Option<String>,
    },
    /// The engine dropped its whole prefix cache (e.g. `reset_prefix_cache`).
    AllBlocksCleared,
    /// An event type this router does not use (its tag).
    Other(String),
}

/// The sequence number frame: 8 bytes big-endian. vLLM's replay end marker is −1
/// (all ones), returned as `None`.
pub fn decode_seq(frame: &[u8]) -> Result<Option<u64>, String> {
    let b: [u8; 8] = frame
        .try_into()
        .map_err(|_| format!("sequence frame has {} bytes, expected 8", frame.len()))?;
    let v = u64::from_be_bytes(b);
    Ok((v != u64::MAX).then_some(v))
}

/// Decode one msgpack `KVEventBatch` payload. Errors name what was wrong.
pub fn decode_batch(payload: &[u8]) -> Result<EventBatch, String> {
    let mut rd = payload;
    let v = rmpv::decode::read_value(&mut rd).map_err(|e| format!("not msgpack: {e}"))?;
    let (ts, events, rank) = match &v {
        Value::Array(a) => (a.first(), a.get(1), a.get(2)),
        Value::Map(_) => (
            field(&v, "ts"),
            field(&v, "events"),
            field(&v, "data_parallel_rank"),
        ),
        _ => return Err("batch is neither an array nor a map".into()),
    };
    let ts = ts.and_then(Value::as_f64).unwrap_or(0.0);
    let events = match events {
        Some(Value::Array(ev)) => ev.iter().map(decode_event).collect::<Result<Vec<_>, _>>()?,
        Some(Value::Nil) | None => Vec::new(),
        Some(_) => return Err("batch `events` is not an array".into()),
    };
    let dp_rank = match rank {
        Some(Value::Nil) | None => None,
        Some(r) => Some(
            r.as_u64()
                .and_then(|r| u32::try_from(r).ok())
                .ok_or("data_parallel_rank is not a small unsigned integer")?,
        ),
    };
    Ok(EventBatch {
        ts,
        events,
        dp_rank,
    })
}

fn field<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    v.as_map()?
        .iter()
        .find(|(k, _)| k.as_str() == Some(name))
        .map(|(_, v)| v)
}

/// Field `name` of a map-form event, or position `pos` of an array-form one (position 0
/// is the tag).
fn get<'a>(v: &'a Value, name: &str, pos: usize) -> Option<&'a Value> {
    match v {
        Value::Map(_) => field(v, name),
        Value::Array(a) => a.get(pos),
        _ => None,
    }
    .filter(|v| !v.is_nil())
}

fn decode_event(v: &Value) -> Result<KvEvent, String> {
    let tag = match v {
        Value::Map(_) => field(v, "type").and_then(Value::as_str),
        Value::Array(a) => a.first().and_then(Value::as_str),
        _ => None,
    }
    .ok_or("event has no `type` tag")?;
    let opt_str = |name, pos| get(v, name, pos).and_then(Value::as_str).map(str::to_owned);
    Ok(match tag {
        "BlockStored" => {
            let block_hashes = hashes(get(v, "block_hashes", 1))?;
            let parent = get(v, "parent_block_hash", 2).map(hash).transpose()?;
            let token_ids = match get(v, "token_ids", 3) {
                Some(Value::Array(t)) => t
                    .iter()
                    .map(|t| {
                        t.as_u64()
                            .and_then(|t| u32::try_from(t).ok())
                            .ok_or("token id is not an unsigned 32-bit integer")
                    })
                    .collect::<Result<Vec<_>, _>>()?,
                _ => return Err("BlockStored without token_ids".into()),
            };
            let block_size = get(v, "block_size", 4)
                .and_then(Value::as_u64)
                .and_then(|b| u32::try_from(b).ok())
                .filter(|b| *b > 0)
                .ok_or("BlockStored without a positive block_size")?;
            KvEvent::BlockStored {
                block_hashes,
                parent,
                token_ids,
                block_size,
                medium: opt_str("medium", 6),
                lora_name: opt_str("lora_name", 7),
            }
        }
        "BlockRemoved" => KvEvent::BlockRemoved {
            block_hashes: hashes(get(v, "block_hashes", 1))?,
            medium: opt_str("medium", 2),
        },
        "AllBlocksCleared" => KvEvent::AllBlocksCleared,
        other => KvEvent::Other(other.to_string()),
    })
}

fn hashes(v: Option<&Value>) -> Result<Vec<u64>, String> {
    match v {
        Some(Value::Array(a)) => a.iter().map(hash).collect(),
        _ => Err("block_hashes is not an array".into()),
    }
}

/// A block hash: bytes (low 64 bits, big-endian) or a non-negative integer.
fn hash(v: &Value) -> Result<u64, String> {
    match v {
        Value::Binary(b) => {
            let mut w = [0u8; 8];
            let tail = &b[b.len().saturating_sub(8)..];
            w[8 - tail.len()..].copy_from_slice(tail);
            Ok(u64::from_be_bytes(w))
        }
        Value::Integer(i) => i.as_u64().ok_or_else(|| format!("negative block hash {i}")),
        _ => Err("block hash is neither bytes nor an integer".into()),
    }
}

/// Encoders for the simulator and tests: the two payload forms vLLM publishes.
pub mod encode {
    use super::KvEvent;
    use rmpv::Value;

    /// How events are laid out (vLLM changed it between versions).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Form {
        /// `{"type": "BlockStored", "block_hashes": …}` (newer vLLM).
        Map,
        /// `["BlockStored", block_hashes, …]` (older vLLM).
        Array,
    }

    /// How block hashes are sent.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum HashKind {
        /// 32 bytes, the 64-bit value in the last 8 (big-endian), as a digest would be.
        Bytes,
        /// An unsigned integer (`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`).
        Int,
    }

    fn h(v: u64, kind: HashKind) -> Value {
        match kind {
            HashKind::Int => Value::from(v),
            HashKind::Bytes => {
                let mut b = vec![0xA5u8; 24];
                b.extend_from_slice(&v.to_be_bytes());
                Value::Binary(b)
            }
        }
    }

    fn event(e: &KvEvent, form: Form, kind: HashKind) -> Value {
        let (tag, fields): (&str, Vec<(&str, Value)>) = match e {
            KvEvent::BlockStored {
                block_hashes,
                parent,
                token_ids,
                block_size,
                lora_name,
                medium,
            } => (
                "BlockStored",
                vec![
                    (
                        "block_hashes",
                        Value::Array(block_hashes.iter().map(|x| h(*x, kind)).collect()),
                    ),
                    (
                        "parent_block_hash",
                        parent.map(|p| h(p, kind)).unwrap_or(Value::Nil),
                    ),
                    (
                        "token_ids",
                        Value::Array(token_ids.iter().map(|t| Value::from(*t)).collect()),
                    ),
                    ("block_size", Value::from(*block_size)),
                    ("lora_id", Value::Nil),
                    (
                        "medium",
                        medium.clone().map(Value::from).unwrap_or(Value::Nil),
                    ),
                    (
                        "lora_name",
                        lora_name.clone().map(Value::from).unwrap_or(Value::Nil),
                    ),
                ],
            ),
            KvEvent::BlockRemoved {
                block_hashes,
                medium,
            } => (
                "BlockRemoved",
                vec![
                    (
                        "block_hashes",
                        Value::Array(block_hashes.iter().map(|x| h(*x, kind)).collect()),
                    ),
                    (
                        "medium",
                        medium.clone().map(Value::from).unwrap_or(Value::Nil),
                    ),
                ],
            ),
            KvEvent::AllBlocksCleared => ("AllBlocksCleared", vec![]),
            KvEvent::Other(t) => (t.as_str(), vec![]),
        };
        match form {
            Form::Array => {
                let mut a = vec![Value::from(tag)];
                a.extend(fields.into_iter().map(|(_, v)| v));
                Value::Array(a)
            }
            Form::Map => {
                let mut m = vec![(Value::from("type"), Value::from(tag))];
                m.extend(fields.into_iter().map(|(k, v)| (Value::from(k), v)));
                Value::Map(m)
            }
        }
    }

    /// A msgpack `KVEventBatch` payload (`[ts, events, data_parallel_rank]`).
    pub fn batch(ts: f64, events: &[KvEvent], dp_rank: u32, form: Form, kind: HashKind) -> Vec<u8> {
        let v = Value::Array(vec![
            Value::from(ts),
            Value::Array(events.iter().map(|e| event(e, form, kind)).collect()),
            Value::from(dp_rank),
        ]);
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, &v).expect("writing to a Vec cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::encode::{Form, HashKind, batch};
    use super::*;

    fn sample() -> Vec<KvEvent> {
        vec![
            KvEvent::BlockStored {
                block_hashes: vec![11, u64::MAX - 1],
                parent: Some(7),
                token_ids: (0..32).collect(),
                block_size: 16,
                lora_name: None,
                medium: Some("GPU".into()),
            },
            KvEvent::BlockRemoved {
                block_hashes: vec![11],
                medium: None,
            },
            KvEvent::AllBlocksCleared,
        ]
    }

    #[test]
    fn both_forms_and_both_hash_kinds_decode_to_the_same_events() {
        for form in [Form::Map, Form::Array] {
            for kind in [HashKind::Bytes, HashKind::Int] {
                let b = decode_batch(&batch(1.5, &sample(), 3, form, kind)).unwrap();
                assert_eq!(b.events, sample(), "{form:?} {kind:?}");
                assert_eq!(b.dp_rank, Some(3));
                assert_eq!(b.ts, 1.5);
            }
        }
    }

    #[test]
    fn bad_payloads_are_errors_not_panics() {
        assert!(decode_batch(b"").is_err());
        assert!(decode_batch(&[0xc1]).is_err());
        // An event without its tag.
        let mut out = Vec::new();
        rmpv::encode::write_value(
            &mut out,
            &Value::Array(vec![
                Value::from(0.0),
                Value::Array(vec![Value::Array(vec![Value::from(1)])]),
            ]),
        )
        .unwrap();
        assert!(decode_batch(&out).unwrap_err().contains("tag"));
        // A negative integer hash.
        let mut out = Vec::new();
        rmpv::encode::write_value(
            &mut out,
            &Value::Array(vec![
                Value::from(0.0),
                Value::Array(vec![Value::Array(vec![
                    Value::from("BlockRemoved"),
                    Value::Array(vec![Value::from(-5)]),
                ])]),
            ]),
        )
        .unwrap();
        assert!(decode_batch(&out).unwrap_err().contains("negative"));
        // Unknown event types are kept as such (and ignored by the index).
        let b = decode_batch(&batch(
            0.0,
            &[KvEvent::Other("Future".into())],
            0,
            Form::Map,
            HashKind::Int,
        ))
        .unwrap();
        assert_eq!(b.events, vec![KvEvent::Other("Future".into())]);
    }

    #[test]
    fn seq_frames() {
        assert_eq!(decode_seq(&5u64.to_be_bytes()).unwrap(), Some(5));
        assert_eq!(decode_seq(&(-1i64).to_be_bytes()).unwrap(), None);
        assert!(decode_seq(b"abc").is_err());
    }
}
