//! ZMQ service discovery for vLLM P2P NCCL deployments (`--vllm-discovery-address`):
//! a ROUTER socket that vLLM instances' DEALER sockets send msgpack heartbeats to,
//! `{"type": "P"|"D", "http_address": "ip:port", "zmq_address": "ip:port"}`, every few
//! seconds (the protocol of vLLM's `disagg_proxy_p2p_nccl_xpyd.py`).
//!
//! An instance is registered on its first heartbeat (keyed by HTTP address; DP ranks
//! per `--intra-node-data-parallel-size`), refreshed by later ones (the same `Worker`
//! objects, so in-flight counts, breaker state and policy membership survive; its ZMQ
//! address goes into the PD request id), and removed after [`EXPIRY`] of silence.
//! Malformed messages are logged (rate-limited) and dropped.

use crate::pd::Pd;
use crate::workers::Registry;
use parking_lot::Mutex;
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vllm_router_sdk::Role;
use zeromq::{RouterSocket, Socket, SocketRecv};

/// Silence after which an instance is dropped.
pub const EXPIRY: Duration = Duration::from_secs(5);

/// One heartbeat.
#[derive(Debug, Deserialize)]
pub struct Heartbeat {
    /// `P` (prefill) or `D` (decode).
    #[serde(rename = "type")]
    pub kind: String,
    /// `ip:port` of the instance's OpenAI server.
    pub http_address: String,
    /// `ip:port` of its P2P NCCL ZMQ endpoint.
    pub zmq_address: String,
}

/// Parse a heartbeat payload; the error says what is wrong.
pub fn parse(payload: &[u8]) -> Result<(Role, Heartbeat), String> {
    let hb: Heartbeat =
        rmp_serde::from_slice(payload).map_err(|e| format!("not a msgpack heartbeat map: {e}"))?;
    let role = match hb.kind.as_str() {
        "P" => Role::Prefill,
        "D" => Role::Decode,
        other => return Err(format!("type must be \"P\" or \"D\", got {other:?}")),
    };
    let ok_addr = |a: &str| {
        a.rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
    };
    if !ok_addr(&hb.http_address) || !ok_addr(&hb.zmq_address) {
        return Err(format!(
            "http_address / zmq_address must be host:port, got {:?} / {:?}",
            hb.http_address, hb.zmq_address
        ));
    }
    Ok((role, hb))
}

/// Bind the ROUTER socket (errors name the address) and serve it until the task ends.
pub async fn start(
    addr: &str,
    registry: Arc<Registry>,
    pd: Arc<Pd>,
    dp_size: u32,
) -> anyhow::Result<()> {
    let mut sock = RouterSocket::new();
    let endpoint = format!("tcp://{addr}");
    sock.bind(&endpoint)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind --vllm-discovery-address {addr}: {e}"))?;
    tracing::info!("ZMQ discovery listening on {endpoint}");
    let seen: Arc<Mutex<HashMap<String, (Instant, Role)>>> = Arc::default();
    {
        let (seen, registry, pd) = (seen.clone(), registry.clone(), pd.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                let expired: Vec<String> = {
                    let mut s = seen.lock();
                    let gone: Vec<String> = s
                        .iter()
                        .filter(|(_, (t, _))| t.elapsed() > EXPIRY)
                        .map(|(u, _)| u.clone())
                        .collect();
                    for u in &gone {
                        s.remove(u);
                    }
                    gone
                };
                for url in expired {
                    registry.remove(&url);
                    pd.zmq_addresses.write().remove(&url);
                    tracing::warn!(worker = %url, "discovered instance silent for {EXPIRY:?}; removed");
                }
            }
        });
    }
    tokio::spawn(async move {
        let mut last_warn: Option<Instant> = None;
        loop {
            let msg = match sock.recv().await {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!("ZMQ discovery receive error: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let frames = msg.into_vec();
            let Some(payload) = frames.last() else {
                continue;
            };
            let (role, hb) = match parse(payload) {
                Ok(x) => x,
                Err(why) => {
                    if last_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                        last_warn = Some(Instant::now());
                        tracing::warn!(
                            "ignored a malformed discovery message ({} bytes): {why}",
                            payload.len()
                        );
                    }
                    continue;
                }
            };
            let url = format!("http://{}", hb.http_address);
            let prev = seen.lock().insert(url.clone(), (Instant::now(), role));
            pd.zmq_addresses
                .write()
                .insert(url.clone(), hb.zmq_address.clone());
            match prev {
                Some((_, r)) if r == role => {}
                other => {
                    if other.is_some() {
                        registry.remove(&url);
                    }
                    match registry.add(&url, role, dp_size) {
                        Ok(_) => {
                            tracing::info!(worker = %url, zmq = %hb.zmq_address, role = ?role, "instance registered by discovery")
                        }
                        Err(e) => tracing::warn!("discovery: cannot register {url}: {e}"),
                    }
                }
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vllm_heartbeats_and_rejects_garbage() {
        #[derive(serde::Serialize)]
        struct Hb<'a> {
            #[serde(rename = "type")]
            kind: &'a str,
            http_address: &'a str,
            zmq_address: &'a str,
        }
        let ok = rmp_serde::to_vec_named(&Hb {
            kind: "P",
            http_address: "10.0.0.1:8100",
            zmq_address: "10.0.0.1:21001",
        })
        .unwrap();
        let (role, hb) = parse(&ok).unwrap();
        assert_eq!(role, Role::Prefill);
        assert_eq!(hb.zmq_address, "10.0.0.1:21001");
        assert!(parse(b"not msgpack").is_err());
        let bad = rmp_serde::to_vec_named(&Hb {
            kind: "X",
            http_address: "a:1",
            zmq_address: "b:2",
        })
        .unwrap();
        assert!(parse(&bad).unwrap_err().contains("type"));
        let bad = rmp_serde::to_vec_named(&Hb {
            kind: "D",
            http_address: "nope",
            zmq_address: "b:2",
        })
        .unwrap();
        assert!(parse(&bad).is_err());
    }
}
