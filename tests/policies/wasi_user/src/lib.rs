//! Test policy that uses the WASI a std Rust program reaches for: it prints to stdout and
//! stderr, reads its arguments and environment, tries to read a file and to sleep. The
//! router's grant-nothing WASI must let all of that run (no trap) while granting nothing:
//! no arguments, no environment, no file. `init` prints what it saw; the e2e test reads
//! it back from the router's log. `select` picks the lowest id and prints the first
//! decision's request id.

use std::io::Write;
use vllm_router_sdk::prelude::*;

/// Lowest id, after exercising WASI.
pub struct WasiUser {
    printed: bool,
}

impl Policy for WasiUser {
    fn new(_: &str) -> Result<Self, String> {
        let args = std::env::args().count();
        let env = std::env::vars().count();
        let file = match std::fs::read_to_string("/etc/hostname") {
            Ok(_) => "readable",
            Err(_) => "denied",
        };
        let t0 = std::time::Instant::now();
        std::thread::sleep(std::time::Duration::from_millis(1));
        let _ = t0.elapsed();
        let _ = std::time::SystemTime::now();
        println!("wasi-user init: args={args} env={env} file={file}");
        eprintln!("wasi-user stderr line");
        let _ = std::io::stdout().flush();
        let mut line = String::new();
        let stdin = std::io::stdin().read_line(&mut line).unwrap_or(0);
        println!("wasi-user stdin bytes={stdin}");
        Ok(WasiUser { printed: false })
    }
    fn select(&mut self, req: &dyn Request, c: &[Candidate]) -> Decision {
        if !self.printed && req.request_id() != "smoke-test" {
            self.printed = true;
            println!("wasi-user first request {}", req.request_id());
        }
        Decision::Worker(c[0].id)
    }
}

vllm_router_sdk::export_policy!(WasiUser);
