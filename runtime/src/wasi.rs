//! The WASI a policy may use, implemented synchronously by the host: randomness and
//! clocks. Every other WASI import of the component is defined as a trap.
//!
//! Why not wasmtime-wasi's implementation: its synchronous bindings run async host code
//! with `Handle::block_on`, which panics on a Tokio worker thread, where policies run. A
//! policy printing to stderr (every Rust panic message does) would then take down the
//! request's task. As a trap it is an ordinary policy fault, answered by the fallback.
//! (Guests that need more WASI to start, such as mainline Go, are issue #12's work.)

use crate::PolicyState;
use crate::clock;
use std::time::SystemTime;
use wasmtime::Engine;
use wasmtime::component::{Component, Linker};

/// `wasi:clocks/wall-clock` datetime.
#[derive(wasmtime::component::ComponentType, wasmtime::component::Lower, Clone, Copy)]
#[component(record)]
struct Datetime {
    seconds: u64,
    nanoseconds: u32,
}

fn random_bytes(n: u64) -> Vec<u8> {
    (0..n.min(1 << 20)).map(|_| rand::random::<u8>()).collect()
}

/// Give a policy the only WASI it may use, synchronously: randomness (Rust's `HashMap`
/// seeds itself from `wasi:random/insecure-seed`) and clocks. Every other import of the
/// component (stdio, environment, exit, filesystem, sockets, ...) is defined as a trap.
///
/// Why not wasmtime-wasi's implementation: its synchronous bindings run async host
/// code with `Handle::block_on`, which panics on a Tokio worker thread, where policies
/// run. A policy printing to stderr (every Rust panic message and allocation failure
/// does) would then take down the request's task. As a trap it is an ordinary policy
/// fault, answered by the fallback.
pub(crate) fn link_wasi(
    linker: &mut Linker<PolicyState>,
    engine: &Engine,
    component: &Component,
) -> anyhow::Result<()> {
    let ty = component.component_type();
    let names: Vec<String> = ty.imports(engine).map(|(n, _)| n.to_string()).collect();
    for name in names {
        let base = name.split('@').next().unwrap_or(&name);
        match base {
            "wasi:random/insecure-seed" => {
                linker
                    .instance(&name)?
                    .func_wrap("insecure-seed", |_, (): ()| {
                        Ok(((rand::random::<u64>(), rand::random::<u64>()),))
                    })?;
            }
            "wasi:random/random" => {
                let mut i = linker.instance(&name)?;
                i.func_wrap("get-random-bytes", |_, (n,): (u64,)| Ok((random_bytes(n),)))?;
                i.func_wrap("get-random-u64", |_, (): ()| Ok((rand::random::<u64>(),)))?;
            }
            "wasi:random/insecure" => {
                let mut i = linker.instance(&name)?;
                i.func_wrap("get-insecure-random-bytes", |_, (n,): (u64,)| {
                    Ok((random_bytes(n),))
                })?;
                i.func_wrap("get-insecure-random-u64", |_, (): ()| {
                    Ok((rand::random::<u64>(),))
                })?;
            }
            "wasi:clocks/monotonic-clock" => {
                let mut i = linker.instance(&name)?;
                i.func_wrap("now", |_, (): ()| Ok((clock::uptime_ns(),)))?;
                i.func_wrap("resolution", |_, (): ()| Ok((1u64,)))?;
            }
            "wasi:clocks/wall-clock" => {
                let mut i = linker.instance(&name)?;
                i.func_wrap("now", |_, (): ()| {
                    let d = SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .unwrap_or_default();
                    Ok((Datetime {
                        seconds: d.as_secs(),
                        nanoseconds: d.subsec_nanos(),
                    },))
                })?;
                i.func_wrap("resolution", |_, (): ()| {
                    Ok((Datetime {
                        seconds: 0,
                        nanoseconds: 1,
                    },))
                })?;
            }
            _ => {}
        }
    }
    linker.define_unknown_imports_as_traps(component)?;
    Ok(())
}
