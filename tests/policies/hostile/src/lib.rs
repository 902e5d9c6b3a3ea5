//! Test policy that misbehaves on purpose, chosen by its config `{"mode": ...}`:
//! `loop` (never returns), `alloc` (allocates without bound), `panic`, `trap`
//! (`unreachable`), `bad_id` (names a worker that is not a candidate), `decline`
//! (answers `none`), `slow_init` (loops in `init`). Without a mode, `init` refuses the
//! config (a component whose `init` fails). The router must serve every request anyway.

use vllm_router_sdk::prelude::*;

/// The misbehaviour.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    Loop,
    Alloc,
    Panic,
    Trap,
    BadId,
    Decline,
}

/// A policy that fails in `select` as configured.
pub struct Hostile {
    mode: Mode,
    hoard: Vec<Vec<u8>>,
}

impl Policy for Hostile {
    fn new(config: &str) -> Result<Self, String> {
        let mode = if config.contains("\"slow_init\"") {
            #[allow(clippy::empty_loop)]
            loop {
                std::hint::black_box(0);
            }
        } else if config.contains("\"loop\"") {
            Mode::Loop
        } else if config.contains("\"alloc\"") {
            Mode::Alloc
        } else if config.contains("\"panic\"") {
            Mode::Panic
        } else if config.contains("\"trap\"") {
            Mode::Trap
        } else if config.contains("\"bad_id\"") {
            Mode::BadId
        } else if config.contains("\"decline\"") {
            Mode::Decline
        } else {
            return Err(format!(
                "hostile test policy needs {{\"mode\": ...}}, got {config}"
            ));
        };
        Ok(Hostile {
            mode,
            hoard: Vec::new(),
        })
    }

    fn select(&mut self, req: &dyn Request, c: &[Candidate]) -> Decision {
        if req.request_id() == "smoke-test" {
            return Decision::Worker(c[0].id);
        }
        match self.mode {
            Mode::Loop => {
                let mut x = 0u64;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            Mode::Alloc => loop {
                // Grow memory fast without writing it all: 1 MiB reserved per step.
                let mut v = Vec::<u8>::with_capacity(1 << 20);
                v.push(1);
                self.hoard.push(v);
            },
            Mode::Panic => panic!("hostile policy panics on purpose"),
            Mode::Trap => {
                #[cfg(target_arch = "wasm32")]
                core::arch::wasm32::unreachable();
                #[cfg(not(target_arch = "wasm32"))]
                std::process::abort();
            }
            Mode::BadId => Decision::Worker(c.iter().map(|c| c.id).max().unwrap_or(0) + 1000),
            Mode::Decline => Decision::None("declines on purpose".into()),
        }
    }
}

vllm_router_sdk::export_policy!(Hostile);
