//! The client listener: accepts connections (optionally TLS), serves HTTP/1.1 and h2
//! with hyper, and defends itself against clients that hold connections without using
//! them.
//!
//! - **Connection cap** (`--max-client-connections`): at the cap the router stops
//!   accepting (new connections wait in the kernel's backlog) until one closes; the
//!   timeouts below guarantee that idle and slow ones do close.
//! - **Header timeout** (`--client-header-timeout-secs`): the TLS handshake and the
//!   first request head must arrive within it after accept, and a later request head
//!   within it of its first byte. A slowloris client (one header byte every few seconds)
//!   is cut off after it. (hyper's own `header_read_timeout` also counts the idle time
//!   between keep-alive requests, which would force idle == header timeout; and it does
//!   not run during protocol detection.)
//! - **Idle timeout** (`--client-idle-timeout-secs`): a keep-alive connection with no
//!   request in progress is closed after it. A request is in progress from its head to
//!   the end of its response body, so long streams are never cut.
//!
//! Each connection has one watchdog task that sleeps until its next deadline (no
//! polling: an idle router with no connections has no timers). Closed connections are
//! counted in `vllm_router_client_connections_closed_total{reason}`.
//!
//! Graceful shutdown: stop accepting, ask every connection to finish (hyper's graceful
//! shutdown: in-flight requests and streams complete, idle connections close), return
//! when all are gone. The caller bounds that with the grace period.

use crate::metrics::Metrics;
use crate::tls::ReloadingCert;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Listener settings.
#[derive(Clone)]
pub struct ListenerConfig {
    /// Most client connections open at once (`--max-client-connections`).
    pub max_connections: usize,
    /// TLS handshake + request head deadline (`--client-header-timeout-secs`).
    pub header_timeout: Duration,
    /// Keep-alive idle deadline (`--client-idle-timeout-secs`).
    pub idle_timeout: Duration,
    /// TLS on the listener (`--tls-cert-file`/`--tls-key-file`).
    pub tls: Option<Arc<ReloadingCert>>,
}

const NONE: u64 = u64::MAX;

/// What the IO wrapper, the service and the watchdog of one connection share. Times
/// are milliseconds since `epoch` (the accept, or the end of the TLS handshake).
struct ConnState {
    epoch: Instant,
    /// Requests whose response body has not ended.
    busy: AtomicU32,
    /// When `busy` last became 0.
    idle_since: AtomicU64,
    /// First byte of the next request head while idle (`NONE`: none yet). Starts at 0:
    /// a fresh connection must send its first head within the header timeout.
    head_started: AtomicU64,
    /// The client spoke h2 (its idle pings are not a slow head).
    h2: AtomicBool,
    /// The watchdog should recompute its deadline (a head started that must time out
    /// before the deadline it sleeps to).
    wake: tokio::sync::Notify,
    /// The deadline the watchdog sleeps to (`NONE`: not sleeping yet). A head start only
    /// wakes it when the header deadline falls earlier: with keep-alive traffic the
    /// watchdog's short in-progress naps already cover it, so a request costs no
    /// wake-up and no timer (measured: one self-wake and a timer insert and removal per
    /// request before).
    armed: AtomicU64,
    /// `--client-header-timeout-secs`, milliseconds.
    header_ms: u64,
}

impl ConnState {
    fn new(header_timeout: Duration) -> Arc<Self> {
        Arc::new(ConnState {
            epoch: Instant::now(),
            busy: AtomicU32::new(0),
            idle_since: AtomicU64::new(0),
            head_started: AtomicU64::new(0),
            h2: AtomicBool::new(false),
            wake: tokio::sync::Notify::new(),
            armed: AtomicU64::new(NONE),
            header_ms: header_timeout.as_millis() as u64,
        })
    }

    /// The first byte of a request head arrived on an idle connection: record it, and
    /// wake the watchdog only if its header deadline is earlier than the one it sleeps to.
    fn head_started_now(&self) {
        let now = self.now_ms();
        self.head_started.store(now, Ordering::SeqCst);
        if now + self.header_ms < self.armed.load(Ordering::SeqCst) {
            self.wake.notify_one();
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The next deadline and why, or `None` while a request is in progress.
    fn deadline(&self, cfg: &ListenerConfig) -> Option<(u64, &'static str)> {
        if self.busy.load(Ordering::Acquire) > 0 {
            return None;
        }
        let idle_since = self.idle_since.load(Ordering::Acquire);
        let head = self.head_started.load(Ordering::SeqCst);
        if !self.h2.load(Ordering::Relaxed) && head != NONE && head >= idle_since {
            return Some((
                head + cfg.header_timeout.as_millis() as u64,
                "header_timeout",
            ));
        }
        Some((
            idle_since + cfg.idle_timeout.as_millis() as u64,
            "idle_timeout",
        ))
    }
}

/// Sleeps until the connection's deadline passes; returns the reason to close it.
/// While a request is in progress it naps at most one header timeout at a time (a
/// stream may last hours; a wake-up per nap costs nothing), so that a kept-alive
/// connection's next head usually needs no wake-up (see [`ConnState::armed`]).
async fn watchdog(st: Arc<ConnState>, cfg: ListenerConfig) -> &'static str {
    let nap = cfg.header_timeout.min(cfg.idle_timeout).as_millis() as u64;
    loop {
        let notified = st.wake.notified();
        let now = st.now_ms();
        let at = match st.deadline(&cfg) {
            Some((at, reason)) => {
                if now >= at {
                    return reason;
                }
                at
            }
            None => now + nap,
        };
        st.armed.store(at, Ordering::SeqCst);
        // A head that started after `deadline` read the state but before `armed` was
        // stored may have skipped its wake-up: look once more (SeqCst on both sides).
        if st.deadline(&cfg).is_some_and(|(d, _)| d < at) {
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(at - now)) => {}
            _ = notified => {}
        }
    }
}

/// The connection's IO, noting when a request head starts while the connection is idle.
struct WatchedIo<S> {
    inner: S,
    st: Arc<ConnState>,
    first_read: bool,
}

impl<S: AsyncRead + Unpin> AsyncRead for WatchedIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            if self.first_read {
                self.first_read = false;
                if buf.filled()[before..].starts_with(b"PRI * HTTP/2") {
                    self.st.h2.store(true, Ordering::Relaxed);
                }
            }
            let st = &self.st;
            if st.busy.load(Ordering::Acquire) == 0
                && st.head_started.load(Ordering::Acquire) == NONE
            {
                st.head_started_now();
            }
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WatchedIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Marks one request in progress until dropped (with the response body).
struct Busy(Arc<ConnState>);

impl Busy {
    fn start(st: &Arc<ConnState>) -> Self {
        st.busy.fetch_add(1, Ordering::AcqRel);
        st.head_started.store(NONE, Ordering::Release);
        Busy(st.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if self.0.busy.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle_since.store(self.0.now_ms(), Ordering::Release);
        }
    }
}

/// A response body that keeps its request "in progress" until it ends or is dropped.
struct TrackedBody {
    inner: axum::body::Body,
    _busy: Busy,
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Open connections, for the gauge and for graceful shutdown.
struct Live {
    count: std::sync::atomic::AtomicUsize,
    all_closed: tokio::sync::Notify,
}

/// Serve `service` on `listener` until `shutdown` completes, then finish gracefully:
/// returns once every connection has closed (bound it with the grace period).
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: crate::server::ClientService,
    cfg: ListenerConfig,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(cfg.max_connections.max(1)));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let live = Arc::new(Live {
        count: std::sync::atomic::AtomicUsize::new(0),
        all_closed: tokio::sync::Notify::new(),
    });
    let mut at_cap_logged = false;
    tokio::pin!(shutdown);
    loop {
        let permit = if let Ok(p) = permits.clone().try_acquire_owned() {
            at_cap_logged = false;
            p
        } else {
            if !at_cap_logged {
                at_cap_logged = true;
                tracing::warn!(
                    "{} client connections open (--max-client-connections): not accepting until one closes",
                    cfg.max_connections
                );
            }
            tokio::select! {
                p = permits.clone().acquire_owned() => p.expect("never closed"),
                _ = &mut shutdown => break,
            }
        };
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = tcp.set_nodelay(true);
        live.count.fetch_add(1, Ordering::AcqRel);
        metrics.client_connections.inc();
        let acceptor = cfg.tls.as_ref().map(|t| t.acceptor());
        let (cfg, metrics, live, service, mut stop) = (
            cfg.clone(),
            metrics.clone(),
            live.clone(),
            service.clone(),
            stop_rx.clone(),
        );
        tokio::spawn(async move {
            let reason = match acceptor {
                None => serve_conn(tcp, service, &cfg, &mut stop).await,
                Some(acc) => {
                    match tokio::time::timeout(cfg.header_timeout, acc.accept(tcp)).await {
                        Ok(Ok(tls)) => serve_conn(tls, service, &cfg, &mut stop).await,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, "TLS handshake failed: {e}");
                            Some("tls_handshake_failed")
                        }
                        Err(_) => Some("tls_handshake_timeout"),
                    }
                }
            };
            if let Some(r) = reason {
                tracing::debug!(%peer, reason = r, "client connection closed by the router");
                metrics
                    .client_connections_closed
                    .with_label_values(&[r])
                    .inc();
            }
            metrics.client_connections.dec();
            drop(permit);
            if live.count.fetch_sub(1, Ordering::AcqRel) == 1 {
                live.all_closed.notify_waiters();
            }
        });
    }
    // Graceful: no new connections; every open one finishes its requests and closes.
    drop(listener);
    let _ = stop_tx.send(true);
    loop {
        let closed = live.all_closed.notified();
        if live.count.load(Ordering::Acquire) == 0 {
            break;
        }
        closed.await;
    }
}

/// Serve one connection; returns why the router closed it (`None`: the client did, or
/// it ended normally).
async fn serve_conn<S>(
    io: S,
    service: crate::server::ClientService,
    cfg: &ListenerConfig,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Option<&'static str>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let st = ConnState::new(cfg.header_timeout);
    let io = WatchedIo {
        inner: io,
        st: st.clone(),
        first_read: true,
    };
    let svc = {
        let st = st.clone();
        hyper::service::service_fn(move |req: http::Request<Incoming>| {
            let busy = Busy::start(&st);
            let fut = service.call(req);
            async move {
                let resp = fut.await;
                Ok::<_, std::convert::Infallible>(
                    resp.map(|inner| TrackedBody { inner, _busy: busy }),
                )
            }
        })
    };
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    // The watchdog and the shutdown signal share this task with the connection, which
    // wakes several times per request: gated, they are polled only when their own timer
    // or signal fired (`biased`: no random branch order either).
    let mut dog = WakeGated::new(Box::pin(watchdog(st, cfg.clone())));
    if *stop.borrow() {
        conn.as_mut().graceful_shutdown();
    } else {
        let mut changed = WakeGated::new(Box::pin(stop.changed()));
        tokio::select! {
            biased;
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!("client connection error: {e}");
                }
                return None;
            }
            reason = &mut dog => return Some(reason),
            changed = &mut changed => {
                if changed.is_ok() {
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
    tokio::select! {
        biased;
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!("client connection error: {e}");
            }
            None
        }
        reason = &mut dog => Some(reason),
    }
}

/// A future polled only when its own waker has fired since its last poll (and on the
/// first poll): for futures that share a task with a busy one and rarely have news (the
/// connection's watchdog and shutdown signal), so the task's frequent wake-ups for I/O
/// do not poll them too. The gate is one atomic flag; the task's waker is kept in an
/// `AtomicWaker` (`futures-util`). Measured with `tests/bench/instructions.sh`: see
/// docs/performance.md.
struct WakeGated<F> {
    inner: F,
    gate: Arc<Gate>,
}

struct Gate {
    woken: AtomicBool,
    task: futures_util::task::AtomicWaker,
}

impl std::task::Wake for Gate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F> WakeGated<F> {
    fn new(inner: F) -> Self {
        WakeGated {
            inner,
            gate: Arc::new(Gate {
                woken: AtomicBool::new(true),
                task: futures_util::task::AtomicWaker::new(),
            }),
        }
    }
}

impl<F: std::future::Future + Unpin> std::future::Future for WakeGated<F> {
    type Output = F::Output;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // Register first, then test the flag: a wake between the two is seen now, a
        // wake after it wakes the task we just registered.
        self.gate.task.register(cx.waker());
        if !self.gate.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let waker = std::task::Waker::from(self.gate.clone());
        Pin::new(&mut self.inner).poll(&mut Context::from_waker(&waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ListenerConfig {
        ListenerConfig {
            max_connections: 10,
            header_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(10),
            tls: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_gated_future_is_polled_only_after_its_own_wake() {
        use std::sync::atomic::AtomicUsize;
        // Counts its polls; ready once its timer has fired.
        struct Counted {
            polls: Arc<AtomicUsize>,
            timer: Pin<Box<tokio::time::Sleep>>,
        }
        impl std::future::Future for Counted {
            type Output = ();
            fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
                self.polls.fetch_add(1, Ordering::Relaxed);
                self.timer.as_mut().poll(cx)
            }
        }
        let polls = Arc::new(AtomicUsize::new(0));
        let mut gated = WakeGated::new(Counted {
            polls: polls.clone(),
            timer: Box::pin(tokio::time::sleep(Duration::from_secs(5))),
        });
        let noop = std::task::Waker::noop();
        let mut cx = Context::from_waker(noop);
        // First poll goes through (and arms the timer); later task wakes do not.
        assert!(Pin::new(&mut gated).poll(&mut cx).is_pending());
        for _ in 0..10 {
            assert!(Pin::new(&mut gated).poll(&mut cx).is_pending());
        }
        assert_eq!(
            polls.load(Ordering::Relaxed),
            1,
            "polled only on its first poll"
        );
        // Its own timer fires: the next poll reaches it and it completes.
        tokio::time::advance(Duration::from_secs(5)).await;
        tokio::task::yield_now().await;
        assert!(Pin::new(&mut gated).poll(&mut cx).is_ready());
        assert_eq!(polls.load(Ordering::Relaxed), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn fresh_connection_must_send_a_head_within_the_header_timeout() {
        let st = ConnState::new(cfg().header_timeout);
        let t0 = Instant::now();
        assert_eq!(watchdog(st, cfg()).await, "header_timeout");
        assert_eq!(t0.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_keep_alive_closes_after_the_idle_timeout_and_streams_are_never_cut() {
        let st = ConnState::new(cfg().header_timeout);
        // A request arrives at once and streams for 60 s (longer than both timeouts).
        let busy = Busy::start(&st);
        let dog = tokio::spawn(watchdog(st.clone(), cfg()));
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(
            !dog.is_finished(),
            "a request in progress is never timed out"
        );
        let ended = Instant::now();
        drop(busy);
        let reason = dog.await.unwrap();
        assert_eq!(reason, "idle_timeout");
        // Closed no earlier than the idle timeout after the stream ended, and no later
        // than one more idle period (the watchdog looks again once per idle timeout).
        let e = ended.elapsed();
        assert!(
            e >= Duration::from_secs(10) && e <= Duration::from_secs(20),
            "{e:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_head_on_a_kept_alive_connection_gets_the_header_timeout() {
        let st = ConnState::new(cfg().header_timeout);
        drop(Busy::start(&st)); // one request served; idle from now
        let dog = tokio::spawn(watchdog(st.clone(), cfg()));
        tokio::time::sleep(Duration::from_secs(5)).await;
        // The first byte of the next head (what WatchedIo records), then nothing more.
        st.head_started.store(st.now_ms(), Ordering::Release);
        st.wake.notify_one();
        let t = Instant::now();
        assert_eq!(dog.await.unwrap(), "header_timeout");
        assert_eq!(t.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_during_a_nap_needs_no_wake_up_and_still_times_out() {
        let st = ConnState::new(cfg().header_timeout);
        let busy = Busy::start(&st);
        let dog = tokio::spawn(watchdog(st.clone(), cfg()));
        tokio::time::sleep(Duration::from_millis(1000)).await;
        // The watchdog naps to t=2 s (one header timeout) while the request runs.
        assert_eq!(st.armed.load(Ordering::SeqCst), 2000);
        drop(busy);
        tokio::time::sleep(Duration::from_millis(500)).await;
        // The next head starts at t=1.5 s and stalls: its deadline (3.5 s) is after
        // the nap's end, so no wake-up is sent...
        st.head_started_now();
        tokio::task::yield_now().await;
        assert_eq!(
            st.armed.load(Ordering::SeqCst),
            2000,
            "no wake-up for this head"
        );
        // ...and the watchdog still closes it on time.
        let t = Instant::now();
        assert_eq!(dog.await.unwrap(), "header_timeout");
        assert_eq!(t.elapsed(), Duration::from_millis(2000));
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_earlier_than_the_idle_deadline_wakes_the_watchdog() {
        let st = ConnState::new(cfg().header_timeout);
        drop(Busy::start(&st)); // idle from t=0: the watchdog sleeps to the idle deadline
        let dog = tokio::spawn(watchdog(st.clone(), cfg()));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(st.armed.load(Ordering::SeqCst), 10_000);
        st.head_started_now();
        let t = Instant::now();
        assert_eq!(dog.await.unwrap(), "header_timeout");
        assert_eq!(t.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn h2_connections_only_get_the_idle_timeout() {
        let st = ConnState::new(cfg().header_timeout);
        st.h2.store(true, Ordering::Relaxed);
        let t = Instant::now();
        assert_eq!(watchdog(st, cfg()).await, "idle_timeout");
        assert_eq!(t.elapsed(), Duration::from_secs(10));
    }
}
