//! The WASI a policy sees: a context that **grants nothing**, implemented synchronously by
//! the host for the interfaces real guests touch while they start and run.
//!
//! | interface | what the policy gets |
//! |---|---|
//! | `wasi:random/*` | the host's generator (Rust's `HashMap` seeds itself from it) |
//! | `wasi:clocks/*` | real monotonic and wall clocks; `subscribe-*` pollables are ready at once |
//! | `wasi:cli/environment` | no arguments, no environment, no working directory |
//! | `wasi:cli/stdin` | a stream that is closed |
//! | `wasi:cli/stdout`, `stderr` | line-buffered into the router's log (info / warn), tagged with slot and version, rate-limited with `host.log` |
//! | `wasi:cli/terminal-*` | not a terminal |
//! | `wasi:cli/exit` | a trap (`policy called exit`) |
//! | `wasi:io/poll`, `error`, `streams` | what the above need; every pollable is ready |
//! | `wasi:filesystem/preopens` | no directories, so no file can be opened |
//! | anything else (sockets, filesystem calls, HTTP, ...) | a trap if called |
//!
//! Every import is linked under the exact name (and WASI minor version) the component
//! asks for, so components built against 0.2.0 to 0.2.12 (Rust, Go's adapter, TinyGo,
//! componentize-py, jco) all link.
//!
//! Why not wasmtime-wasi: its synchronous bindings run async host code with
//! `Handle::block_on`, which panics on a Tokio worker thread, where policies run (a policy
//! printing to stderr took down the request's task before). The async bindings would need
//! wasmtime's `async` feature and an async call path for every decision (a boxed future
//! per call on the hot path) and a second build of cranelift (~10 min here). The handful
//! of functions a policy may use are a few dozen lines each; everything that could reach
//! outside the sandbox is simply not there.

use crate::PolicyState;
use crate::clock;
use crate::types::Level;
use std::time::SystemTime;
use wasmtime::component::types::ComponentItem;
use wasmtime::component::{
    Component, ComponentType, Lift, Linker, LinkerInstance, Lower, Resource, ResourceType,
};
use wasmtime::{Engine, StoreContextMut};

/// A stdout / stderr line longer than this (bytes) is emitted in pieces.
pub(crate) const STDIO_LINE_MAX: usize = 1024;

/// Bytes `check-write` grants per call: writes are buffered into the log, never block.
const WRITE_BUDGET: u64 = 64 * 1024;

/// `wasi:io/streams` `output-stream`; rep 1 = stdout, 2 = stderr.
struct OutputStream;
/// `wasi:io/streams` `input-stream` (only stdin exists: closed).
struct InputStream;
/// `wasi:io/poll` `pollable`: always ready.
struct Pollable;
/// `wasi:io/error` `error`: never created (no operation fails with one).
struct IoError;

/// `wasi:io/streams` `stream-error`.
#[derive(ComponentType, Lower, Lift)]
#[component(variant)]
enum StreamError {
    #[component(name = "last-operation-failed")]
    LastOperationFailed(Resource<IoError>),
    #[component(name = "closed")]
    Closed,
}

/// `wasi:clocks/wall-clock` datetime.
#[derive(ComponentType, Lower, Clone, Copy)]
#[component(record)]
struct Datetime {
    seconds: u64,
    nanoseconds: u32,
}

fn random_bytes(n: u64) -> Vec<u8> {
    (0..n.min(1 << 20)).map(|_| rand::random::<u8>()).collect()
}

/// Append `bytes` written to stdout (`fd` 1) or stderr (2) and emit every complete line.
fn capture(state: &mut PolicyState, fd: u32, bytes: &[u8]) {
    let i = if fd == 2 { 1 } else { 0 };
    let level = if fd == 2 { Level::Warn } else { Level::Info };
    for &b in bytes {
        if b == b'\n' || state.stdio[i].len() >= STDIO_LINE_MAX {
            let line = std::mem::take(&mut state.stdio[i]);
            state.emit(level, String::from_utf8_lossy(&line).trim_end_matches('\r'));
            if b == b'\n' {
                continue;
            }
        }
        state.stdio[i].push(b);
    }
}

/// Which host type a WASI resource name gets, so every interface that `use`s it
/// (e.g. `wasi:cli/stdout`'s `output-stream`) agrees with the one that defines it.
/// Resources not listed here are the trap stubs' `()` type, consistently.
fn define_resource(inst: &mut LinkerInstance<'_, PolicyState>, name: &str) -> anyhow::Result<()> {
    match name {
        "output-stream" => inst.resource(
            "output-stream",
            ResourceType::host::<OutputStream>(),
            |_, _| Ok(()),
        )?,
        "input-stream" => inst.resource(
            "input-stream",
            ResourceType::host::<InputStream>(),
            |_, _| Ok(()),
        )?,
        "pollable" => inst.resource("pollable", ResourceType::host::<Pollable>(), |_, _| Ok(()))?,
        "error" => inst.resource("error", ResourceType::host::<IoError>(), |_, _| Ok(()))?,
        _ => {}
    }
    Ok(())
}

/// Link the grant-nothing WASI for the imports `component` actually has (see the module
/// docs for what each gives), then define every other import as a trap.
///
/// Errors: a WASI function whose signature differs from the one implemented here (a
/// future WASI major version) fails the load with wasmtime's type error.
pub(crate) fn link_wasi(
    linker: &mut Linker<PolicyState>,
    engine: &Engine,
    component: &Component,
) -> anyhow::Result<()> {
    let ty = component.component_type();
    let imports: Vec<(String, Vec<(String, bool)>)> = ty
        .imports(engine)
        .map(|(n, item)| {
            let exports = match item.ty {
                ComponentItem::ComponentInstance(i) => i
                    .exports(engine)
                    .map(|(e, it)| (e.to_string(), matches!(it.ty, ComponentItem::Resource(_))))
                    .collect(),
                _ => Vec::new(),
            };
            (n.to_string(), exports)
        })
        .collect();
    for (name, exports) in imports {
        if !name.starts_with("wasi:") {
            continue;
        }
        let base = name.split('@').next().unwrap_or(&name).to_string();
        let mut i = linker.instance(&name)?;
        for (export, is_resource) in &exports {
            if *is_resource {
                define_resource(&mut i, export)?;
            }
        }
        let has = |f: &str| exports.iter().any(|(e, _)| e == f);
        match base.as_str() {
            "wasi:random/insecure-seed" => {
                i.func_wrap("insecure-seed", |_, (): ()| {
                    Ok(((rand::random::<u64>(), rand::random::<u64>()),))
                })?;
            }
            "wasi:random/random" => {
                i.func_wrap("get-random-bytes", |_, (n,): (u64,)| Ok((random_bytes(n),)))?;
                i.func_wrap("get-random-u64", |_, (): ()| Ok((rand::random::<u64>(),)))?;
            }
            "wasi:random/insecure" => {
                i.func_wrap("get-insecure-random-bytes", |_, (n,): (u64,)| {
                    Ok((random_bytes(n),))
                })?;
                i.func_wrap("get-insecure-random-u64", |_, (): ()| {
                    Ok((rand::random::<u64>(),))
                })?;
            }
            "wasi:clocks/monotonic-clock" => {
                i.func_wrap("now", |_, (): ()| Ok((clock::uptime_ns(),)))?;
                i.func_wrap("resolution", |_, (): ()| Ok((1u64,)))?;
                // A policy may not wait: a timer is ready at once.
                for f in ["subscribe-duration", "subscribe-instant"] {
                    if has(f) {
                        i.func_wrap(f, |_, (_,): (u64,)| Ok((Resource::<Pollable>::new_own(0),)))?;
                    }
                }
            }
            "wasi:clocks/wall-clock" => {
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
            "wasi:cli/environment" => {
                i.func_wrap("get-environment", |_, (): ()| {
                    Ok((Vec::<(String, String)>::new(),))
                })?;
                i.func_wrap("get-arguments", |_, (): ()| Ok((Vec::<String>::new(),)))?;
                i.func_wrap("initial-cwd", |_, (): ()| Ok((None::<String>,)))?;
            }
            "wasi:cli/exit" => {
                i.func_wrap(
                    "exit",
                    |_, (_,): (Result<(), ()>,)| -> wasmtime::Result<()> {
                        Err(wasmtime::Error::msg("policy called exit"))
                    },
                )?;
            }
            "wasi:cli/stdin" => {
                i.func_wrap("get-stdin", |_, (): ()| {
                    Ok((Resource::<InputStream>::new_own(0),))
                })?;
            }
            "wasi:cli/stdout" => {
                i.func_wrap("get-stdout", |_, (): ()| {
                    Ok((Resource::<OutputStream>::new_own(1),))
                })?;
            }
            "wasi:cli/stderr" => {
                i.func_wrap("get-stderr", |_, (): ()| {
                    Ok((Resource::<OutputStream>::new_own(2),))
                })?;
            }
            "wasi:cli/terminal-stdin" | "wasi:cli/terminal-stdout" | "wasi:cli/terminal-stderr" => {
                // The terminal resources stay the stubs' `()` type; none is ever created.
                for f in [
                    "get-terminal-stdin",
                    "get-terminal-stdout",
                    "get-terminal-stderr",
                ] {
                    if has(f) {
                        i.func_wrap(f, |_, (): ()| Ok((None::<Resource<()>>,)))?;
                    }
                }
            }
            "wasi:filesystem/preopens" => {
                i.func_wrap("get-directories", |_, (): ()| {
                    Ok((Vec::<(Resource<()>, String)>::new(),))
                })?;
            }
            "wasi:io/error" => {
                i.func_wrap(
                    "[method]error.to-debug-string",
                    |_, (_,): (Resource<IoError>,)| Ok(("error".to_string(),)),
                )?;
            }
            "wasi:io/poll" => {
                i.func_wrap(
                    "[method]pollable.ready",
                    |_, (_,): (Resource<Pollable>,)| Ok((true,)),
                )?;
                i.func_wrap(
                    "[method]pollable.block",
                    |_, (_,): (Resource<Pollable>,)| Ok(()),
                )?;
                i.func_wrap("poll", |_, (list,): (Vec<Resource<Pollable>>,)| {
                    Ok(((0..list.len() as u32).collect::<Vec<u32>>(),))
                })?;
            }
            "wasi:io/streams" => link_streams(&mut i, &has)?,
            _ => {}
        }
    }
    linker.define_unknown_imports_as_traps(component)?;
    Ok(())
}

/// `wasi:io/streams`: stdout/stderr writes go to the log; stdin reads find it closed.
fn link_streams(
    i: &mut LinkerInstance<'_, PolicyState>,
    has: &dyn Fn(&str) -> bool,
) -> anyhow::Result<()> {
    type Out = Resource<OutputStream>;
    type In = Resource<InputStream>;
    let write = |mut store: StoreContextMut<'_, PolicyState>,
                 (s, bytes): (Out, Vec<u8>)|
     -> wasmtime::Result<(Result<(), StreamError>,)> {
        capture(store.data_mut(), s.rep(), &bytes);
        Ok((Ok(()),))
    };
    for f in ["write", "blocking-write-and-flush"] {
        let name = format!("[method]output-stream.{f}");
        if has(&name) {
            i.func_wrap(&name, write)?;
        }
    }
    let ok = |_: StoreContextMut<'_, PolicyState>,
              (_,): (Out,)|
     -> wasmtime::Result<(Result<(), StreamError>,)> { Ok((Ok(()),)) };
    for f in ["flush", "blocking-flush"] {
        let name = format!("[method]output-stream.{f}");
        if has(&name) {
            i.func_wrap(&name, ok)?;
        }
    }
    if has("[method]output-stream.check-write") {
        i.func_wrap("[method]output-stream.check-write", |_, (_,): (Out,)| {
            Ok((Ok::<u64, StreamError>(WRITE_BUDGET),))
        })?;
    }
    for f in ["write-zeroes", "blocking-write-zeroes-and-flush"] {
        let name = format!("[method]output-stream.{f}");
        if has(&name) {
            i.func_wrap(&name, |_, (_, _): (Out, u64)| {
                Ok((Ok::<(), StreamError>(()),))
            })?;
        }
    }
    if has("[method]output-stream.subscribe") {
        i.func_wrap("[method]output-stream.subscribe", |_, (_,): (Out,)| {
            Ok((Resource::<Pollable>::new_own(0),))
        })?;
    }
    if has("[method]input-stream.subscribe") {
        i.func_wrap("[method]input-stream.subscribe", |_, (_,): (In,)| {
            Ok((Resource::<Pollable>::new_own(0),))
        })?;
    }
    for f in ["read", "blocking-read"] {
        let name = format!("[method]input-stream.{f}");
        if has(&name) {
            i.func_wrap(&name, |_, (_, _): (In, u64)| {
                Ok((Err::<Vec<u8>, StreamError>(StreamError::Closed),))
            })?;
        }
    }
    for f in ["skip", "blocking-skip"] {
        let name = format!("[method]input-stream.{f}");
        if has(&name) {
            i.func_wrap(&name, |_, (_, _): (In, u64)| {
                Ok((Err::<u64, StreamError>(StreamError::Closed),))
            })?;
        }
    }
    Ok(())
}
