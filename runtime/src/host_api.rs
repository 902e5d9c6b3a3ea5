//! What a policy may import from the host: the `request` resource's accessors (reading
//! the current request through [`crate::RequestView`]) and `host.log`/`now-ms`/`random`.

use crate::{LOG_LINES_PER_SEC, ReqHandle, RequestView, Stage, clock, host, prefix_cache, types};
use std::sync::Arc;
use std::time::Instant;
use wasmtime::component::Resource;
use wasmtime::{ResourceLimiter, StoreLimits};

/// Per-Store state: the current request, the log limiter and the memory limits.
pub struct PolicyState {
    pub(crate) current: Option<(Arc<dyn RequestView>, Stage)>,
    /// Engine words of the current `select`'s candidates (empty when none has a sample),
    /// for contract 0.2's on-demand `request.engine-load`.
    pub(crate) engine_words: Vec<u64>,
    /// Worker ids of the current `select`'s candidates, in order; filled only for a
    /// version that imports `prefix-cache` (the only reader).
    pub(crate) candidate_ids: Vec<u32>,
    pub(crate) label: Arc<str>,
    pub(crate) limits: StoreLimits,
    /// Largest linear memory this instance asked for, bytes (what `policy check` reports).
    pub(crate) peak_memory: usize,
    pub(crate) started: Instant,
    pub(crate) log_window: (u64, u32),
    /// Partial stdout / stderr lines of the guest (WASI `output-stream`), each at most
    /// [`crate::wasi::STDIO_LINE_MAX`] bytes before it is emitted anyway.
    pub(crate) stdio: [Vec<u8>; 2],
}

impl PolicyState {
    fn req(&self) -> wasmtime::Result<&dyn RequestView> {
        match &self.current {
            Some((r, _)) => Ok(&**r),
            None => Err(wasmtime::Error::msg("request accessed outside select")),
        }
    }
}

impl PolicyState {
    /// Write one line from the policy (its `host.log` or a stdout/stderr line) to the
    /// router's log, tagged with the slot and version; at most [`LOG_LINES_PER_SEC`]
    /// lines per second per instance, each cut at 1,024 characters, newlines as spaces.
    pub(crate) fn emit(&mut self, level: types::Level, message: &str) {
        let sec = self.started.elapsed().as_secs();
        if self.log_window.0 != sec {
            self.log_window = (sec, 0);
        }
        self.log_window.1 += 1;
        if self.log_window.1 > LOG_LINES_PER_SEC {
            return;
        }
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
    }
}

impl types::Host for PolicyState {}

/// The sandbox limits, plus a record of the largest memory the guest grew to.
impl ResourceLimiter for PolicyState {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let ok = self.limits.memory_growing(current, desired, maximum)?;
        if ok {
            self.peak_memory = self.peak_memory.max(desired);
        }
        Ok(ok)
    }
    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.limits.memory_grow_failed(error)
    }
    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }
    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.limits.table_grow_failed(error)
    }
    fn instances(&self) -> usize {
        self.limits.instances()
    }
    fn tables(&self) -> usize {
        self.limits.tables()
    }
    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

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
        self.emit(level, &message);
        Ok(())
    }
    fn now_ms(&mut self) -> wasmtime::Result<u64> {
        Ok(clock::uptime_ms())
    }
    fn random(&mut self) -> wasmtime::Result<u64> {
        Ok(rand::random())
    }
}

impl prefix_cache::Host for PolicyState {
    fn cached_prefix(
        &mut self,
        _: Resource<ReqHandle>,
    ) -> wasmtime::Result<prefix_cache::PrefixMatch> {
        let Some((req, _)) = &self.current else {
            return Ok(prefix_cache::PrefixMatch {
                total_blocks: 0,
                candidates: Vec::new(),
            });
        };
        let mut words = Vec::with_capacity(self.candidate_ids.len());
        let total_blocks = req.prefix_match(&self.candidate_ids, &mut words);
        // A host bug must not desynchronise the guest's indexing.
        words.resize(self.candidate_ids.len(), 0);
        Ok(prefix_cache::PrefixMatch {
            total_blocks,
            candidates: words,
        })
    }
}

/// Contract 0.2's imports: the same request and host functions (shared bodies with 0.1),
/// plus `body-pointer`, `engine-load` and `hash64`.
mod v2 {
    use super::PolicyState;
    use crate::bindings_v2::vllm::router_policy::{host, prefix_cache, types};
    use crate::{ReqHandle, Stage};
    use wasmtime::component::Resource;

    fn level(l: types::Level) -> crate::types::Level {
        match l {
            types::Level::Debug => crate::types::Level::Debug,
            types::Level::Info => crate::types::Level::Info,
            types::Level::Warn => crate::types::Level::Warn,
            types::Level::Error => crate::types::Level::Error,
        }
    }

    /// The 0.2 form of the host's stage.
    pub(crate) fn stage(s: Stage) -> types::Stage {
        match s {
            Stage::Regular => types::Stage::Regular,
            Stage::Prefill => types::Stage::Prefill,
            Stage::Decode => types::Stage::Decode,
        }
    }

    impl types::Host for PolicyState {}

    impl types::HostRequest for PolicyState {
        fn path(&mut self, r: Resource<ReqHandle>) -> wasmtime::Result<String> {
            crate::types::HostRequest::path(self, r)
        }
        fn model(&mut self, r: Resource<ReqHandle>) -> wasmtime::Result<Option<String>> {
            crate::types::HostRequest::model(self, r)
        }
        fn header(
            &mut self,
            r: Resource<ReqHandle>,
            name: String,
        ) -> wasmtime::Result<Option<String>> {
            crate::types::HostRequest::header(self, r, name)
        }
        fn body_field(
            &mut self,
            r: Resource<ReqHandle>,
            path: String,
        ) -> wasmtime::Result<Option<String>> {
            crate::types::HostRequest::body_field(self, r, path)
        }
        fn body_pointer(
            &mut self,
            _: Resource<ReqHandle>,
            pointer: String,
        ) -> wasmtime::Result<Option<String>> {
            Ok(self.req()?.body_pointer(&pointer))
        }
        fn routing_text(&mut self, r: Resource<ReqHandle>) -> wasmtime::Result<String> {
            crate::types::HostRequest::routing_text(self, r)
        }
        fn body_length(&mut self, r: Resource<ReqHandle>) -> wasmtime::Result<u64> {
            crate::types::HostRequest::body_length(self, r)
        }
        fn request_id(&mut self, r: Resource<ReqHandle>) -> wasmtime::Result<String> {
            crate::types::HostRequest::request_id(self, r)
        }
        fn stage(&mut self, r: Resource<ReqHandle>) -> wasmtime::Result<types::Stage> {
            crate::types::HostRequest::stage(self, r).map(stage)
        }
        fn engine_load(&mut self, _: Resource<ReqHandle>) -> wasmtime::Result<Vec<u64>> {
            Ok(if self.current.is_some() {
                self.engine_words.clone()
            } else {
                Vec::new()
            })
        }
        fn drop(&mut self, _: Resource<ReqHandle>) -> wasmtime::Result<()> {
            Ok(())
        }
    }

    impl host::Host for PolicyState {
        fn log(&mut self, l: types::Level, message: String) -> wasmtime::Result<()> {
            self.emit(level(l), &message);
            Ok(())
        }
        fn now_ms(&mut self) -> wasmtime::Result<u64> {
            crate::host::Host::now_ms(self)
        }
        fn random(&mut self) -> wasmtime::Result<u64> {
            crate::host::Host::random(self)
        }
        fn hash64(&mut self, data: Vec<u8>) -> wasmtime::Result<u64> {
            Ok(xxhash_rust::xxh3::xxh3_64(&data))
        }
    }

    impl prefix_cache::Host for PolicyState {
        fn cached_prefix(
            &mut self,
            r: Resource<ReqHandle>,
        ) -> wasmtime::Result<prefix_cache::PrefixMatch> {
            let m = crate::prefix_cache::Host::cached_prefix(self, r)?;
            Ok(prefix_cache::PrefixMatch {
                total_blocks: m.total_blocks,
                candidates: m.candidates,
            })
        }
    }
}
pub(crate) use v2::stage as stage_v2;
