//! Builds the built-in policy crates (`policies/*`) to WebAssembly components with
//! `--target wasm32-wasip2 --profile policy`, into their own target directory
//! (`<target>/policy-wasm`; sharing the outer one would deadlock on cargo's lock), and
//! tells the host where they are so it can embed them with `include_bytes!`.

use std::path::PathBuf;
use std::process::Command;

/// (crate name, artifact stem) of each built-in policy.
const POLICIES: &[(&str, &str)] = &[
    ("policy-round-robin", "policy_round_robin"),
    ("policy-random", "policy_random"),
    ("policy-consistent-hash", "policy_consistent_hash"),
    ("policy-power-of-two", "policy_power_of_two"),
    ("policy-cache-aware", "policy_cache_aware"),
];

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let workspace = manifest.parent().unwrap().to_path_buf();
    for dir in ["sdk", "wit", "policies"] {
        println!("cargo:rerun-if-changed={}", workspace.join(dir).display());
    }
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");
    let target_root = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| {
            if p.is_absolute() {
                p
            } else {
                workspace.join(p)
            }
        })
        .unwrap_or_else(|| workspace.join("target"));
    let policy_target = target_root.join("policy-wasm");

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&workspace)
        .args([
            "build",
            "--locked",
            "--target",
            "wasm32-wasip2",
            "--profile",
            "policy",
            "--target-dir",
        ])
        .arg(&policy_target);
    for (krate, _) in POLICIES {
        cmd.args(["-p", krate]);
    }
    // The outer build's variables must not leak into the inner one.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().to_string();
        if (k.starts_with("CARGO_") && k != "CARGO_HOME")
            || matches!(
                k.as_str(),
                "RUSTFLAGS" | "RUSTC" | "RUSTDOC" | "RUSTC_WRAPPER" | "RUSTC_WORKSPACE_WRAPPER"
            )
        {
            cmd.env_remove(&k);
        }
    }
    let status = cmd
        .status()
        .expect("failed to run cargo for the built-in policies");
    if !status.success() {
        panic!(
            "building the built-in policies for wasm32-wasip2 failed (see above). \
             If the target is missing: rustup target add wasm32-wasip2"
        );
    }
    let out = policy_target.join("wasm32-wasip2").join("policy");
    for (_, stem) in POLICIES {
        let f = out.join(format!("{stem}.wasm"));
        assert!(
            f.exists(),
            "expected {} after the policy build",
            f.display()
        );
    }
    println!(
        "cargo:rustc-env=VLLM_ROUTER_POLICY_WASM_DIR={}",
        out.display()
    );
}
