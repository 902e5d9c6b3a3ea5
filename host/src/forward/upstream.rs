//! Plain-HTTP upstream connections **driven by the request's own task**.
//!
//! hyper-util's pooled client runs each upstream connection as a task of its own: a
//! request crosses to it through a channel, the response comes back through a oneshot,
//! and every body chunk through a one-slot channel, each crossing a task wake-up. A
//! streamed completion of N chunks then costs N wake-up pairs and N `writev`s to the
//! client, because the client-side writer sees one chunk, finds nothing more, and
//! flushes (measured: ~17 `writev` per 16-chunk stream against nginx's ~4, which reads
//! what the socket holds and writes it in one go).
//!
//! Here the connection's future (`hyper::client::conn::http1::Connection`, still hyper's
//! HTTP/1.1 code) is polled by whoever holds it: the attempt while it waits for the
//! response head, then the response body ([`UpstreamBody`]) while the client reads. The
//! body polls the connection and the body channel in turns until neither has more, and
//! hands the client writer **everything the socket held as one frame** (the way nginx
//! passes a stream through: read what is there, write it once; no added latency, since
//! nothing waits for more). A connection whose response ended cleanly goes back to its
//! worker's idle list ([`IdleConns`]); one whose response was cut is dropped (closed).
//!
//! `https://` workers keep hyper-util's client (TLS, see [`crate::tls`]); health probes,
//! metric scrapes and `/tokenize` calls use it too. Idle connections: at most
//! [`MAX_IDLE`] per worker, none older than [`IDLE_TIMEOUT`]; a connection is checked on
//! checkout (one poll: a worker that closed it is noticed then, without a background
//! task), so an idle router does nothing for them.

use bytes::{Bytes, BytesMut};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// Idle connections kept per worker, at most.
pub const MAX_IDLE: usize = 512;
/// An idle connection older than this is closed on the next checkout instead of used
/// (vLLM's own keep-alive timeout, uvicorn's default, is 5 s; a worker that closed it
/// earlier is noticed by the checkout poll).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(50);
/// Connect timeout, as for the pooled client.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keep-alive probes on upstream connections after this idle time (a silent peer on
/// a long stream is noticed).
const TCP_KEEPALIVE: Duration = Duration::from_secs(30);
/// Largest frame made by joining chunks that are already there, bytes.
const COALESCE_MAX: usize = 64 * 1024;

type Conn = http1::Connection<TokioIo<TcpStream>, Full<Bytes>>;

/// One upstream HTTP/1.1 connection: the handle requests are sent on and the future that
/// does its I/O (polled by the holder, never spawned).
pub struct Driver {
    send: http1::SendRequest<Full<Bytes>>,
    conn: Pin<Box<Conn>>,
    /// The connection future finished (closed or failed): never poll it again.
    done: bool,
}

impl Driver {
    /// Poll the connection's I/O once; `true` while it is still open.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.done && self.conn.as_mut().poll(cx).is_ready() {
            self.done = true;
        }
        !self.done
    }
}

/// A worker's idle connections, most recently used last.
#[derive(Default)]
pub struct IdleConns {
    list: parking_lot::Mutex<Vec<(Driver, Instant)>>,
}

impl std::fmt::Debug for IdleConns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IdleConns({})", self.len())
    }
}

impl IdleConns {
    /// A live idle connection ready for a request, if any: each candidate gets one poll
    /// (noticing a close by the worker and finishing the previous exchange's keep-alive
    /// transition); stale, closed or not-ready ones are dropped.
    fn checkout(&self) -> Option<Driver> {
        let mut cx = Context::from_waker(Waker::noop());
        loop {
            let (mut d, since) = self.list.lock().pop()?;
            if since.elapsed() > IDLE_TIMEOUT {
                continue;
            }
            if d.drive(&mut cx) && d.send.is_ready() {
                return Some(d);
            }
        }
    }

    fn put(&self, d: Driver) {
        let mut list = self.list.lock();
        if list.len() < MAX_IDLE {
            list.push((d, Instant::now()));
        }
    }

    /// Idle connections held now.
    pub fn len(&self) -> usize {
        self.list.lock().len()
    }
}

/// Why no response head arrived.
pub enum SendError {
    /// Connecting failed or timed out.
    Connect(String),
    /// hyper's error for the exchange (classified by the caller, as for the pooled client).
    Http(hyper::Error),
    /// The connection ended before a response head without an error from hyper.
    Closed,
}

async fn connect(authority: &http::uri::Authority) -> Result<Driver, SendError> {
    let addr = format!(
        "{}:{}",
        authority.host(),
        authority.port_u16().unwrap_or(80)
    );
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr)).await {
        Err(_) => return Err(SendError::Connect(format!("connect to {addr} timed out"))),
        Ok(Err(e)) => return Err(SendError::Connect(format!("{addr}: {e}"))),
        Ok(Ok(s)) => s,
    };
    // Streamed chunks otherwise stall ~40 ms on Nagle + delayed ACK.
    let _ = stream.set_nodelay(true);
    let _ = socket2::SockRef::from(&stream)
        .set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE));
    let (send, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| SendError::Connect(format!("{addr}: {e}")))?;
    Ok(Driver {
        send,
        conn: Box::pin(conn),
        done: false,
    })
}

/// Send `req` to `worker` on an idle or new connection and wait for the response head,
/// driving the connection from this task. The returned body keeps driving it. `reused`
/// in the error tells a failure on a pooled connection (the worker may have closed it
/// first: retryable, nothing was processed) from one on a fresh connection.
pub async fn send(
    worker: &Arc<crate::workers::Worker>,
    req: http::Request<Full<Bytes>>,
) -> Result<http::Response<UpstreamBody>, (SendError, bool)> {
    let (mut driver, reused) = match worker.conns.checkout() {
        Some(d) => (d, true),
        None => (
            connect(&worker.authority).await.map_err(|e| (e, false))?,
            false,
        ),
    };
    let mut pending = std::pin::pin!(driver.send.send_request(req));
    let head = std::future::poll_fn(|cx| {
        driver.drive(cx);
        match pending.as_mut().poll(cx) {
            Poll::Ready(r) => Poll::Ready(r.map_err(SendError::Http)),
            // hyper fails the request future when the connection ends; this is a guard.
            Poll::Pending if driver.done => Poll::Ready(Err(SendError::Closed)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
    .map_err(|e| (e, reused))?;
    let (parts, body) = head.into_parts();
    Ok(http::Response::from_parts(
        parts,
        UpstreamBody {
            inner: body,
            driver: Some(driver),
            home: Some(worker.clone()),
            stash: None,
            ended: false,
        },
    ))
}

/// A worker's response body. For a connection driven here (see module docs) it polls
/// the connection too and joins chunks that are already there into one frame; for the
/// pooled client's responses it is a plain pass-through.
pub struct UpstreamBody {
    inner: Incoming,
    driver: Option<Driver>,
    /// Whose idle list the connection returns to when the body ended cleanly.
    home: Option<Arc<crate::workers::Worker>>,
    /// A non-data result read while joining, returned on the next poll.
    stash: Option<Option<Result<Frame<Bytes>, hyper::Error>>>,
    /// The inner body returned its end (hyper's `is_end_stream` stays false for a
    /// chunked body even then).
    ended: bool,
}

impl UpstreamBody {
    /// Wrap a body from hyper-util's pooled client (TLS workers).
    pub fn pooled(inner: Incoming) -> Self {
        UpstreamBody {
            inner,
            driver: None,
            home: None,
            stash: None,
            ended: false,
        }
    }

    fn poll_inner(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(d) = self.driver.as_mut() {
            d.drive(cx);
        }
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = r {
            self.ended = true;
        }
        r
    }

    fn at_end(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    /// Everything was read and nothing but the end is left to hand out.
    fn clean_end(&self) -> bool {
        match &self.stash {
            None | Some(None) => self.at_end(),
            Some(Some(_)) => false,
        }
    }
}

impl HttpBody for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(s) = this.stash.take() {
            return Poll::Ready(s);
        }
        let first = match this.poll_inner(cx) {
            Poll::Ready(Some(Ok(f))) => f,
            other => return other,
        };
        let first = match first.into_data() {
            Ok(d) => d,
            // Trailers pass through.
            Err(f) => return Poll::Ready(Some(Ok(f))),
        };
        if this.driver.is_none() || this.at_end() {
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        // Join what is already there: the connection may hold more chunks.
        let mut joined: Option<BytesMut> = None;
        loop {
            let len = joined.as_ref().map_or(first.len(), |b| b.len());
            if len >= COALESCE_MAX || this.at_end() {
                break;
            }
            match this.poll_inner(cx) {
                Poll::Pending => break,
                Poll::Ready(Some(Ok(f))) => match f.into_data() {
                    Ok(more) => joined
                        .get_or_insert_with(|| {
                            let mut b = BytesMut::with_capacity(first.len() + more.len() * 4);
                            b.extend_from_slice(&first);
                            b
                        })
                        .extend_from_slice(&more),
                    Err(trailers) => {
                        this.stash = Some(Some(Ok(trailers)));
                        break;
                    }
                },
                Poll::Ready(other) => {
                    this.stash = Some(other);
                    break;
                }
            }
        }
        Poll::Ready(Some(Ok(Frame::data(match joined {
            Some(b) => b.freeze(),
            None => first,
        }))))
    }

    fn is_end_stream(&self) -> bool {
        self.clean_end()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // Back to the idle list only after a clean, complete exchange; a response cut
        // short (client gone, error) leaves bytes on the wire: close it.
        if let (Some(d), Some(home)) = (self.driver.take(), self.home.take()) {
            if !d.done && self.clean_end() {
                home.conns.put(d);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A worker that answers each request on a connection with `chunks` chunked-encoded
    /// chunks written in one go, and counts connections.
    async fn chunky_worker(
        chunks: usize,
    ) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let conns = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let n = conns.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    loop {
                        let mut got = Vec::new();
                        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                            let k = s.read(&mut buf).await.unwrap_or(0);
                            if k == 0 {
                                return;
                            }
                            got.extend_from_slice(&buf[..k]);
                        }
                        let mut out = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
                        for i in 0..chunks {
                            let ev = format!("data: {i}\n\n");
                            out.extend_from_slice(format!("{:x}\r\n{ev}\r\n", ev.len()).as_bytes());
                        }
                        out.extend_from_slice(b"0\r\n\r\n");
                        if s.write_all(&out).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, conns)
    }

    fn worker(addr: std::net::SocketAddr) -> Arc<crate::workers::Worker> {
        Arc::new(
            crate::workers::Worker::new(
                0,
                &format!("http://{addr}"),
                vllm_router_sdk::Role::Regular,
                None,
            )
            .unwrap(),
        )
    }

    fn get(addr: std::net::SocketAddr) -> http::Request<Full<Bytes>> {
        http::Request::builder()
            .uri(format!("http://{addr}/v1/chat/completions"))
            .header("host", addr.to_string())
            .body(Full::new(Bytes::new()))
            .unwrap()
    }

    #[tokio::test]
    async fn chunks_already_there_arrive_as_one_frame_and_the_connection_is_reused() {
        let (addr, conns) = chunky_worker(16).await;
        let w = worker(addr);
        for round in 0..3 {
            let resp = send(&w, get(addr)).await.ok().expect("response");
            assert_eq!(resp.status(), 200);
            let mut body = resp.into_body();
            let mut frames = Vec::new();
            while let Some(f) = body.frame().await {
                frames.push(f.unwrap().into_data().unwrap());
            }
            let all: Vec<u8> = frames.concat();
            let want: String = (0..16).map(|i| format!("data: {i}\n\n")).collect();
            assert_eq!(String::from_utf8(all).unwrap(), want, "round {round}");
            // 16 chunks written at once: far fewer frames than chunks.
            assert!(frames.len() <= 3, "round {round}: {} frames", frames.len());
            drop(body);
            assert_eq!(w.conns.len(), 1, "a clean exchange returns its connection");
        }
        assert_eq!(
            conns.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "one connection for 3 requests"
        );
    }

    #[tokio::test]
    async fn a_body_dropped_early_closes_its_connection() {
        let (addr, conns) = chunky_worker(4).await;
        let w = worker(addr);
        let resp = send(&w, get(addr)).await.ok().expect("response");
        drop(resp);
        assert_eq!(w.conns.len(), 0);
        let resp = send(&w, get(addr)).await.ok().expect("response");
        let _ = resp.into_body().collect().await.unwrap();
        assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        match send(&worker(addr), get(addr)).await {
            Err((SendError::Connect(_), false)) => {}
            _ => panic!("expected a connect error"),
        }
    }

    #[tokio::test]
    async fn a_fresh_connection_closed_without_an_answer_is_not_reported_as_reused() {
        // The worker reads the request and hangs up: on a new connection that is the
        // worker failing (not a stale keep-alive connection), so `reused` is false.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let _ = s.read(&mut buf).await;
        });
        match send(&worker(addr), get(addr)).await {
            Err((SendError::Http(_) | SendError::Closed, reused)) => assert!(!reused),
            Err((SendError::Connect(m), _)) => panic!("connected, yet a connect error: {m}"),
            Ok(r) => panic!("no answer was sent, yet got {}", r.status()),
        }
    }

    #[tokio::test]
    async fn a_connection_the_worker_closed_while_idle_is_not_reused() {
        // One response, then the worker closes the connection.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                let _ = s.shutdown().await;
            }
        });
        let w = worker(addr);
        // The second request finds the idle connection closed by the worker: checkout
        // notices and connects anew (a reused dead connection would fail the request).
        for _ in 0..2 {
            let resp = send(&w, get(addr)).await.ok().expect("response");
            let b = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&b[..], b"ok");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
