//! Builds the built-in policy crates (`policies/*`) to WebAssembly components with
//! `--target wasm32-wasip2 --profile policy`, into their own target directory
//! (`<target>/policy-wasm`; sharing the outer one would deadlock on cargo's lock), and
//! tells the host where they are so it can embed them with `include_bytes!`.

use std::path::PathBuf;
use std::process::Command;

// The built-in list, shared with `policy::builtin` (one place to add a built-in).
include!("src/policy/builtin_list.rs");

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let workspace = manifest.parent().unwrap().to_path_buf();
    for dir in ["sdk", "wit", "policies"] {
        println!("cargo:rerun-if-changed={}", workspace.join(dir).display());
    }
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");
    println!(
        "cargo:rerun-if-changed={}",
        manifest.join("src/policy/builtin_list.rs").display()
    );
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
    for (_, krate, _, _) in BUILTIN_LIST {
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
    // The embedded bytes, in BUILTIN_LIST's order.
    let mut table = String::from(
        "/// Component bytes of each built-in, in `BUILTIN_LIST` order.\npub static BUILTIN_WASM: &[&[u8]] = &[\n",
    );
    for (_, _, stem, _) in BUILTIN_LIST {
        let f = out.join(format!("{stem}.wasm"));
        assert!(
            f.exists(),
            "expected {} after the policy build",
            f.display()
        );
        table.push_str(&format!(
            "    include_bytes!({:?}),\n",
            f.display().to_string()
        ));
    }
    table.push_str("];\n");
    let generated = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("builtin_wasm.rs");
    std::fs::write(&generated, table).expect("write builtin_wasm.rs");
}
