//! `floor-proxy`: the least an HTTP/1.1 reverse proxy built on our stack (Tokio's
//! multi-thread runtime, hyper's server and client connections, mimalloc) can do per
//! request. It is a benchmark reference, not a product: it reads the request body
//! whole (as the router must, for its policy), round-robins over the workers, keeps
//! idle upstream connections per worker, and streams the answer back. No policy, no
//! metrics, no request id, no timeouts, no retries.
//!
//! Measured beside the router and nginx by `tests/bench/pinned_profile.sh c64 none
//! floor`, it splits issue 16's gap in two: what the stack costs (floor vs nginx) and
//! what the router adds on top of it (router vs floor).
//!
//! Usage: `floor-proxy PORT WORKER_URL...` (workers as `http://host:port`).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Upstream {
    addr: String,
    authority: http::HeaderValue,
    idle: parking_lot::Mutex<Vec<SendRequest<Full<Bytes>>>>,
}

struct Floor {
    workers: Vec<Upstream>,
    next: AtomicUsize,
}

/// Hands the connection back to its worker's idle list when the response body ends.
struct Returning {
    body: Incoming,
    conn: Option<(SendRequest<Full<Bytes>>, Arc<Floor>, usize)>,
}

impl hyper::body::Body for Returning {
    type Data = Bytes;
    type Error = hyper::Error;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let r = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        if matches!(r, std::task::Poll::Ready(None)) || self.body.is_end_stream() {
            if let Some((c, f, i)) = self.conn.take() {
                f.workers[i].idle.lock().push(c);
            }
        }
        r
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
}

async fn proxy(
    f: Arc<Floor>,
    req: http::Request<Incoming>,
) -> Result<http::Response<Returning>, Box<dyn std::error::Error + Send + Sync>> {
    let (mut parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    let i = f.next.fetch_add(1, Ordering::Relaxed) % f.workers.len();
    let w = &f.workers[i];
    let idle = w.idle.lock().pop();
    let mut conn = match idle {
        Some(c) => c,
        None => {
            let tcp = tokio::net::TcpStream::connect(&w.addr).await?;
            tcp.set_nodelay(true)?;
            let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
            tokio::spawn(conn);
            send
        }
    };
    parts
        .headers
        .insert(http::header::HOST, w.authority.clone());
    parts.headers.remove(http::header::CONNECTION);
    let up = http::Request::from_parts(parts, Full::new(body));
    conn.ready().await?;
    let resp = conn.send_request(up).await?;
    Ok(resp.map(|body| Returning {
        body,
        conn: Some((conn, f.clone(), i)),
    }))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (port, urls) = args
        .split_first()
        .ok_or_else(|| anyhow::anyhow!("usage: floor-proxy PORT WORKER_URL..."))?;
    let workers = urls
        .iter()
        .map(|u| {
            let addr = u
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .to_string();
            Ok(Upstream {
                authority: http::HeaderValue::from_str(&addr)?,
                addr,
                idle: parking_lot::Mutex::new(Vec::new()),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    anyhow::ensure!(!workers.is_empty(), "usage: floor-proxy PORT WORKER_URL...");
    let floor = Arc::new(Floor {
        workers,
        next: AtomicUsize::new(0),
    });
    let port: u16 = port.parse()?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
            loop {
                let (tcp, _) = listener.accept().await?;
                tcp.set_nodelay(true)?;
                let f = floor.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| proxy(f.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        })
}
