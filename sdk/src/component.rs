//! The component side (wasm32 only): wit-bindgen bindings for `wit/0.2/policy.wit` (world
//! `policy-full`) and the adapter that turns a [`Policy`] into the exported `balancer`,
//! `feedback` and `state-transfer` interfaces.

use crate::{Candidate, Completion, Decision, Policy, Request, Role, Stage, Worker};
use std::cell::RefCell;
use std::marker::PhantomData;

#[allow(missing_docs, clippy::all)]
#[cfg(feature = "feedback")]
pub mod bindings {
    wit_bindgen::generate!({
        // A policy that never calls `kv::cached_prefix` does not import `prefix-cache`
        // (unused imports are dropped at link).
        path: "../wit/0.2",
        world: "vllm:router-policy/policy-full",
        generate_all,
        pub_export_macro: true,
        export_macro_name: "export",
        default_bindings_module: "vllm_router_sdk::component::bindings",
    });
}

/// Without the `feedback` feature: `policy-full` minus the `feedback` export, so the
/// router (which probes for it) never sends this policy a completion.
#[allow(missing_docs, clippy::all)]
#[cfg(not(feature = "feedback"))]
pub mod bindings {
    wit_bindgen::generate!({
        inline: "
            package vllm:router-sdk;
            world policy-no-feedback {
                include vllm:router-policy/policy@0.2.0;
                import vllm:router-policy/prefix-cache@0.2.0;
                export vllm:router-policy/state-transfer@0.2.0;
            }
        ",
        path: "../wit/0.2",
        world: "vllm:router-sdk/policy-no-feedback",
        generate_all,
        pub_export_macro: true,
        export_macro_name: "export",
        default_bindings_module: "vllm_router_sdk::component::bindings",
    });
}

#[cfg(feature = "feedback")]
use bindings::exports::vllm::router_policy::feedback;
use bindings::exports::vllm::router_policy::{balancer as wit, state_transfer};
use bindings::vllm::router_policy::types as t;

/// Object-safe view of the policy so it can sit in one non-generic static.
trait DynPolicy {
    fn workers_changed(&mut self, workers: &[Worker]);
    fn select(&mut self, req: &dyn Request, candidates: &[Candidate]) -> Decision;
    #[cfg_attr(not(feature = "feedback"), allow(dead_code))]
    fn on_complete(&mut self, done: &Completion);
    fn export_state(&self) -> Vec<u8>;
    fn import_state(&mut self, state: &[u8]) -> Result<(), String>;
}

impl<P: Policy> DynPolicy for P {
    fn workers_changed(&mut self, workers: &[Worker]) {
        Policy::workers_changed(self, workers)
    }
    fn select(&mut self, req: &dyn Request, candidates: &[Candidate]) -> Decision {
        Policy::select(self, req, candidates)
    }
    fn on_complete(&mut self, done: &Completion) {
        Policy::on_complete(self, done)
    }
    fn export_state(&self) -> Vec<u8> {
        Policy::export_state(self)
    }
    fn import_state(&mut self, state: &[u8]) -> Result<(), String> {
        Policy::import_state(self, state)
    }
}

thread_local! {
    /// The borrowed request of the `select` call in progress (null outside one), for
    /// [`cached_prefix_words`].
    static CURRENT_REQUEST: std::cell::Cell<*const t::Request> = const { std::cell::Cell::new(std::ptr::null()) };
    static INSTANCE: RefCell<Option<Box<dyn DynPolicy>>> = const { RefCell::new(None) };
    static CANDIDATES: RefCell<Vec<Candidate>> = const { RefCell::new(Vec::new()) };
}

/// Implements the exported interface for any [`Policy`]; used by [`crate::export_policy!`].
pub struct Adapter<P>(PhantomData<P>);

struct ReqView<'a>(&'a t::Request);

impl Request for ReqView<'_> {
    fn path(&self) -> String {
        self.0.path()
    }
    fn model(&self) -> Option<String> {
        self.0.model()
    }
    fn header(&self, name: &str) -> Option<String> {
        self.0.header(name)
    }
    fn body_field(&self, path: &str) -> Option<String> {
        self.0.body_field(path)
    }
    fn body_pointer(&self, pointer: &str) -> Option<String> {
        self.0.body_pointer(pointer)
    }
    fn routing_text(&self) -> String {
        self.0.routing_text()
    }
    fn body_length(&self) -> u64 {
        self.0.body_length()
    }
    fn request_id(&self) -> String {
        self.0.request_id()
    }
    fn stage(&self) -> Stage {
        stage_from(self.0.stage())
    }
}

fn stage_from(s: t::Stage) -> Stage {
    match s {
        t::Stage::Regular => Stage::Regular,
        t::Stage::Prefill => Stage::Prefill,
        t::Stage::Decode => Stage::Decode,
    }
}

fn with_policy<R>(f: impl FnOnce(&mut dyn DynPolicy) -> R) -> Option<R> {
    INSTANCE.with(|cell| {
        let mut guard = cell.borrow_mut();
        match guard.as_mut() {
            Some(p) => Some(f(p.as_mut())),
            None => None,
        }
    })
}

impl<P: Policy> wit::Guest for Adapter<P> {
    fn init(config: String) -> Result<(), String> {
        // A panic's message goes to the router's log (stderr is not granted to policies,
        // so without this the log would only show the trap, not why it panicked).
        std::panic::set_hook(Box::new(|info| {
            crate::host::log(crate::Level::Error, &format!("policy panicked: {info}"));
        }));
        let p = P::new(&config)?;
        INSTANCE.with(|cell| *cell.borrow_mut() = Some(Box::new(p)));
        Ok(())
    }

    fn workers_changed(workers: Vec<t::Worker>) {
        let workers: Vec<Worker> = workers
            .into_iter()
            .map(|w| Worker {
                id: w.id,
                url: w.url,
                role: match w.role {
                    t::Role::Regular => Role::Regular,
                    t::Role::Prefill => Role::Prefill,
                    t::Role::Decode => Role::Decode,
                },
                dp_rank: w.dp_rank,
                labels: w.labels,
            })
            .collect();
        with_policy(|p| p.workers_changed(&workers));
    }

    fn select(req: &t::Request, candidates: Vec<u64>) -> t::Decision {
        // Engine load only for a policy that reads it (contract 0.2: on demand).
        let engine = if P::USES_ENGINE_LOAD {
            req.engine_load()
        } else {
            Vec::new()
        };
        // Reuse one buffer across calls: no allocation per decision.
        let d = CANDIDATES.with(|buf| {
            let mut buf = buf.borrow_mut();
            buf.clear();
            buf.extend(candidates.iter().enumerate().map(|(i, &w)| {
                crate::wire::unpack_candidate(w, engine.get(i).copied().unwrap_or(0))
            }));
            CURRENT_REQUEST.with(|c| c.set(req as *const t::Request));
            let d = with_policy(|p| p.select(&ReqView(req), &buf));
            CURRENT_REQUEST.with(|c| c.set(std::ptr::null()));
            d
        });
        match d {
            Some(Decision::Worker(id)) => t::Decision::Worker(id),
            Some(Decision::None(why)) => t::Decision::None(why),
            None => t::Decision::None("policy not initialised".to_string()),
        }
    }
}

#[cfg(feature = "feedback")]
impl<P: Policy> feedback::Guest for Adapter<P> {
    fn on_complete(done: t::Completion) {
        let c = Completion {
            worker: done.worker,
            status: done.status,
            latency_ms: done.latency_ms,
            first_byte_ms: done.first_byte_ms,
            stage: stage_from(done.stage),
        };
        with_policy(|p| p.on_complete(&c));
    }
}

impl<P: Policy> state_transfer::Guest for Adapter<P> {
    fn export_state() -> Vec<u8> {
        with_policy(|p| p.export_state()).unwrap_or_default()
    }

    fn import_state(state: Vec<u8>) -> Result<(), String> {
        with_policy(|p| p.import_state(&state))
            .unwrap_or_else(|| Err("policy not initialised".to_string()))
    }
}

/// `prefix-cache.cached-prefix` for the request of the `select` in progress: total blocks
/// and one packed word per candidate; `(0, [])` outside `select`.
pub(crate) fn cached_prefix_words() -> (u32, Vec<u64>) {
    let p = CURRENT_REQUEST.with(|c| c.get());
    if p.is_null() {
        return (0, Vec::new());
    }
    // SAFETY: `CURRENT_REQUEST` is non-null only while `select` runs on this (single)
    // thread, and it points at that call's borrowed `req`, which outlives the call.
    let req = unsafe { &*p };
    let m = bindings::vllm::router_policy::prefix_cache::cached_prefix(req);
    (m.total_blocks, m.candidates)
}
