//! The released WIT contracts are frozen (`wit/RELEASES`): a component built against a
//! released version must keep linking, so a definition may never change in place. A
//! change is a new version beside the old one, and this runtime links every released
//! `vllm:router-policy` version.

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

fn wit_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../wit")
}

/// SHA-256 (hex) of a WIT file's definitions: comment and blank lines removed, lines
/// trimmed.
fn definitions_hash(text: &str) -> String {
    let defs: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("//"))
        .collect();
    Sha256::digest(defs.join("\n").as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `(package, file, hash)` rows of `wit/RELEASES`.
fn releases() -> Vec<(String, String, String)> {
    let text = std::fs::read_to_string(wit_dir().join("RELEASES")).expect("wit/RELEASES");
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 3, "bad line in wit/RELEASES: {l:?}");
            (f[0].to_string(), f[1].to_string(), f[2].to_string())
        })
        .collect()
}

#[test]
fn released_contracts_are_frozen() {
    let mut problems = Vec::new();
    for (package, file, want) in releases() {
        let text = std::fs::read_to_string(wit_dir().join(&file))
            .unwrap_or_else(|e| panic!("wit/{file} (released as {package}): {e}"));
        let declared = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("package "))
            .map(|p| p.trim_end_matches(';').trim().to_string());
        if declared.as_deref() != Some(package.as_str()) {
            problems.push(format!(
                "wit/{file} declares package {declared:?}, released as {package}"
            ));
        }
        let got = definitions_hash(&text);
        if got != want {
            problems.push(format!(
                "wit/{file} ({package}) changed a definition (hash {got}, released {want}). \
                 Released contracts are frozen: put the change in a new version (new file, \
                 new line in wit/RELEASES, linked beside the old one by the runtime)"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_wit_file_is_a_released_contract_and_the_runtime_links_each_policy_version() {
    let listed: Vec<String> = releases().into_iter().map(|r| r.1).collect();
    let mut files = Vec::new();
    let mut dirs = vec![wit_dir()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "wit") {
                let rel = p.strip_prefix(wit_dir()).unwrap();
                files.push(rel.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    for f in &files {
        assert!(
            listed.contains(f),
            "wit/{f} is not in wit/RELEASES; add it with the hash \
             released_contracts_are_frozen reports once its definitions are final"
        );
    }
    let policy_versions: Vec<String> = releases()
        .into_iter()
        .filter_map(|(p, _, _)| p.strip_prefix("vllm:router-policy@").map(str::to_string))
        .collect();
    let linked: Vec<String> = vllm_router_runtime::CONTRACTS
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(
        policy_versions, linked,
        "released vs linked contract versions"
    );
}

#[test]
fn the_hash_ignores_comments_but_not_definitions() {
    let a = "package a:b@0.1.0;\n/// doc\ninterface x {\n    f: func();\n}\n";
    let b = "package a:b@0.1.0;\n\n/// better doc\n  interface x {\n  f: func();\n}\n";
    let c = "package a:b@0.1.0;\ninterface x {\n    f: func(a: u32);\n}\n";
    assert_eq!(definitions_hash(a), definitions_hash(b));
    assert_ne!(definitions_hash(a), definitions_hash(c));
}
