//! The client-facing response body: passes the worker's frames through as they arrive
//! (no buffering), records time to first byte, enforces the whole-exchange deadline, and
//! settles the request (breaker, feedback, in-flight, admission, metrics) exactly once:
//! when the worker's body ends, when it fails, or when the client goes away.

use super::attempt::{Outcome, strip_hop_by_hop};
use super::upstream::UpstreamBody;
use super::{Admitted, Forwarder, Sent, set_request_id};
use crate::metrics::route_label;
use crate::request::RequestInfo;
use axum::body::Body;
use bytes::Bytes;
use http::header;
use http::{Response, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Turn a worker response into the client response, settled when its body ends.
/// `pd_started`: for a PD decode response, when the prefill started (records the
/// PD TTFT and decode-stage histograms).
pub fn respond(
    fwd: Arc<Forwarder>,
    req: &RequestInfo,
    sent: Sent,
    admission: Admitted,
    started: Instant,
    pd_started: Option<Instant>,
) -> Response<Body> {
    let Sent {
        resp,
        attempt,
        request_id,
    } = sent;
    // The worker's head is edited in place (hop-by-hop fields out, our request id in):
    // no second header map per response.
    let (mut parts, body) = resp.into_parts();
    let sse = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    strip_hop_by_hop(&mut parts.headers, true);
    set_request_id(&mut parts.headers, &request_id);
    parts.extensions = http::Extensions::new();
    let deadline = started + fwd.request_timeout;
    let tracked = TrackedBody {
        inner: body,
        done: Some(Done {
            fwd,
            route: route_label(&req.path),
            status: parts.status,
            attempt: Some(attempt),
            _admission: admission,
            pd_started,
            started,
            first_byte: None,
            sse,
        }),
        deadline,
        timer: None,
    };
    Response::from_parts(parts, Body::new(tracked))
}

/// Bookkeeping finished when the response body ends (or the client goes away).
struct Done {
    fwd: Arc<Forwarder>,
    route: &'static str,
    status: StatusCode,
    attempt: Option<super::Attempt>,
    /// `--max-concurrent-requests` permit, released when the body ends.
    _admission: Admitted,
    pd_started: Option<Instant>,
    started: Instant,
    first_byte: Option<Duration>,
    sse: bool,
}

impl Done {
    fn finish(mut self, outcome: Outcome) {
        let Some(attempt) = self.attempt.take() else {
            return;
        };
        let m = &self.fwd.metrics;
        let slot = attempt
            .choice
            .slot
            .as_ref()
            .map(|s| s.name.as_str())
            .unwrap_or("none");
        m.requests
            .with_label_values(&[self.route, self.status.as_str(), slot])
            .inc();
        m.request_seconds
            .with_label_values(&[self.route, slot])
            .observe(self.started.elapsed().as_secs_f64());
        if let (true, Some(fb)) = (self.sse, self.first_byte) {
            m.ttfb_seconds
                .with_label_values(&[self.route, slot])
                .observe(fb.as_secs_f64());
        }
        if let Some(p) = self.pd_started {
            if let Some(fb) = self.first_byte {
                m.pd_ttft_seconds
                    .observe((attempt.sent - p + fb).as_secs_f64());
            }
            m.pd_stage_seconds
                .with_label_values(&["decode"])
                .observe(attempt.sent.elapsed().as_secs_f64());
        }
        let first_byte = self.first_byte;
        self.fwd.settle(attempt, outcome, first_byte, true);
    }
}

/// The body wrapper (see module docs).
struct TrackedBody {
    inner: UpstreamBody,
    done: Option<Done>,
    /// The whole-exchange deadline (`--request-timeout-secs` after the request came).
    deadline: Instant,
    /// Its timer, made the first time the worker's body makes us wait: a response whose
    /// body came with its head (most non-streaming ones) never touches the timer wheel.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl TrackedBody {
    fn fail(&mut self, why: &str) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let sse = self.done.as_ref().is_some_and(|d| d.sse);
        if let Some(d) = self.done.take() {
            if let Some(a) = &d.attempt {
                tracing::warn!(worker = %a.worker().name(), "response stream failed: {why}");
            }
            let status = d.status;
            d.finish(Outcome::StreamFailed(status));
        }
        if sse {
            // An SSE client gets a final error event rather than a bare truncation.
            let ev = serde_json::json!({"error": {"message": format!("upstream stream failed: {why}"), "type": "upstream_error", "code": "stream_interrupted"}});
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from(format!(
                "data: {ev}\n\n"
            ))))));
        }
        Poll::Ready(Some(Err(axum::Error::new(std::io::Error::other(
            why.to_string(),
        )))))
    }

    fn end(&mut self) {
        if let Some(d) = self.done.take() {
            let status = d.status;
            d.finish(Outcome::Answered(status));
        }
    }
}

impl HttpBody for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.done.is_none() {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Pending => {
                let deadline = self.deadline;
                let timer = self
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline.into())));
                if timer.as_mut().poll(cx).is_ready() {
                    return self.fail("request timeout reached while streaming");
                }
                Poll::Pending
            }
            Poll::Ready(None) => {
                self.end();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                // A worker that never makes us wait (frames always ready) still meets
                // the deadline (tokio's clock, as the timer's: paused in tests).
                if tokio::time::Instant::now() >= self.deadline.into() {
                    return self.fail("request timeout reached while streaming");
                }
                if let Some(d) = self.done.as_mut() {
                    if d.first_byte.is_none() {
                        if let Some(a) = &d.attempt {
                            d.first_byte = Some(a.sent.elapsed());
                        }
                    }
                }
                // The worker's body is complete (e.g. its Content-Length reached): settle
                // now, before the client can see the last byte and send its next request
                // (which would otherwise still see this one in flight).
                if self.inner.is_end_stream() {
                    self.end();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => self.fail(&e.to_string()),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done.is_none() || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        // The client went away before the end: release in-flight and record it; the
        // worker is not blamed.
        if let Some(d) = self.done.take() {
            let status = d.status;
            d.finish(Outcome::Abandoned(status));
        }
    }
}
