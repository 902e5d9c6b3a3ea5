//! What a policy may import from the host: the `request` resource's accessors (reading
//! the current request through [`crate::RequestView`]) and `host.log`/`now-ms`/`random`.

use crate::{LOG_LINES_PER_SEC, ReqHandle, RequestView, Stage, clock, host, types};
use std::sync::Arc;
use std::time::Instant;
use wasmtime::StoreLimits;
use wasmtime::component::Resource;

/// Per-Store state: the current request, the log limiter and the memory limits.
pub struct PolicyState {
    pub(crate) current: Option<(Arc<dyn RequestView>, Stage)>,
    pub(crate) label: Arc<str>,
    pub(crate) limits: StoreLimits,
    pub(crate) started: Instant,
    pub(crate) log_window: (u64, u32),
}

impl PolicyState {
    fn req(&self) -> wasmtime::Result<&dyn RequestView> {
        match &self.current {
            Some((r, _)) => Ok(&**r),
            None => Err(wasmtime::Error::msg("request accessed outside select")),
        }
    }
}

impl types::Host for PolicyState {}

impl types::HostRequest for PolicyState {
    fn path(&mut self, _: Resource<ReqHandle>) -> wasmtime::Result<String> {
        Ok(self.req()?.path().to_owned())
    }
    fn model(&mut self, _: Resource<ReqHandle>) -> wasmtime::Result<Option<String>> {
        Ok(self.req()?.model().map(str::to_owned))
    }
    fn header(&mut self, _: Resource<ReqHandle>, name: String) -> wasmtime::Result<Option<String>> {
        let r = self.req()?;
        // A request id the router generated is not a client header.
        Ok(r.header(&name).map(str::to_owned))
    }
    fn body_field(
        &mut self,
        _: Resource<ReqHandle>,
        path: String,
    ) -> wasmtime::Result<Option<String>> {
        Ok(self.req()?.body_field(&path))
    }
    fn routing_text(&mut self, _: Resource<ReqHandle>) -> wasmtime::Result<String> {
        Ok(self.req()?.routing_text().to_owned())
    }
    fn body_length(&mut self, _: Resource<ReqHandle>) -> wasmtime::Result<u64> {
        Ok(self.req()?.body_length())
    }
    fn request_id(&mut self, _: Resource<ReqHandle>) -> wasmtime::Result<String> {
        Ok(self.req()?.request_id().to_owned())
    }
    fn stage(&mut self, _: Resource<ReqHandle>) -> wasmtime::Result<Stage> {
        match &self.current {
            Some((_, s)) => Ok(*s),
            None => Err(wasmtime::Error::msg("request accessed outside select")),
        }
    }
    fn drop(&mut self, _: Resource<ReqHandle>) -> wasmtime::Result<()> {
        Ok(())
    }
}

impl host::Host for PolicyState {
    fn log(&mut self, level: types::Level, message: String) -> wasmtime::Result<()> {
        let sec = self.started.elapsed().as_secs();
        if self.log_window.0 != sec {
            self.log_window = (sec, 0);
        }
        self.log_window.1 += 1;
        if self.log_window.1 > LOG_LINES_PER_SEC {
            return Ok(());
        }
        // One log line per message: newlines (a panic's location line) become spaces.
        let msg: String = message
            .chars()
            .take(1024)
            .map(|c| if c == '\n' { ' ' } else { c })
            .collect();
        let policy = &*self.label;
        match level {
            types::Level::Debug => tracing::debug!(policy, "{msg}"),
            types::Level::Info => tracing::info!(policy, "{msg}"),
            types::Level::Warn => tracing::warn!(policy, "{msg}"),
            types::Level::Error => tracing::error!(policy, "{msg}"),
        }
        Ok(())
    }
    fn now_ms(&mut self) -> wasmtime::Result<u64> {
        Ok(clock::uptime_ms())
    }
    fn random(&mut self) -> wasmtime::Result<u64> {
        Ok(rand::random())
    }
}
