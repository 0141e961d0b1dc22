//! End to end: `conflux new` → `cargo test` (the SDK's native harness) →
//! `cargo build --release --target wasm32-wasip2` → deploy → invoke over
//! gRPC and HTTP → the entity's `println!` in `conflux logs`.

mod support;

use std::path::Path;
use std::process::Command;
use support::*;

/// Runs cargo in the scaffolded crate with a target dir of its own, kept
/// between runs so only the first one compiles its dependencies.
fn cargo(crate_dir: &Path, args: &[&str]) -> std::process::Output {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let out = Command::new(cargo)
        .current_dir(crate_dir)
        .env("CARGO_TARGET_DIR", workspace_root().join("target").join("scaffold"))
        .args(args)
        .output()
        .expect("run cargo");
    assert!(
        out.status.success(),
        "cargo {args:?} in the scaffold failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn a_new_crate_tests_builds_deploys_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let crate_dir = dir.path().join("hello-shop");
    let out = Command::new(conflux_bin()).args(["new", "hello-shop", "--dir"]).arg(&crate_dir).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let told = stdout(&out);
    assert!(told.contains("conflux deploy hello_shop target/wasm32-wasip2/release/hello_shop.wasm"), "{told}");
    for f in ["Cargo.toml", "rust-toolchain.toml", "README.md", "src/lib.rs", ".gitignore"] {
        assert!(crate_dir.join(f).is_file(), "{f} missing");
    }
    let manifest = std::fs::read_to_string(crate_dir.join("Cargo.toml")).unwrap();
    assert!(manifest.contains(&format!("version = \"={}\"", env!("CARGO_PKG_VERSION"))), "{manifest}");
    // A second `new` into the same directory refuses rather than overwriting.
    let again = Command::new(conflux_bin()).args(["new", "hello-shop", "--dir"]).arg(&crate_dir).output().unwrap();
    assert!(!again.status.success());
    assert!(stderr(&again).contains("not an empty directory"), "{}", stderr(&again));
    // Resolve to the versions this workspace already uses (cargo drops the rest).
    std::fs::copy(workspace_root().join("Cargo.lock"), crate_dir.join("Cargo.lock")).unwrap();

    let tested = cargo(&crate_dir, &["test"]);
    let report = String::from_utf8_lossy(&tested.stdout);
    assert!(report.contains("test result: ok. 2 passed"), "the sample entity's unit tests ran: {report}");
    cargo(&crate_dir, &["build", "--release", "--target", "wasm32-wasip2"]);
    let wasm = workspace_root().join("target/scaffold/wasm32-wasip2/release/hello_shop.wasm");
    assert!(wasm.is_file(), "{} missing", wasm.display());

    let data = tempfile::tempdir().unwrap();
    let d = Daemon::start(data.path());
    deploy(&d, "hello_shop", &wasm);
    let out = d.cli(&["invoke", "hello_shop/first", "add", "5"]);
    assert_eq!(stdout(&out).trim(), "5", "{}", stderr(&out));
    let r = ureq::post(format!("{}/v1/entities/hello_shop/first/add", d.url()))
        .header("Content-Type", "application/json")
        .send("3")
        .unwrap();
    assert_eq!(r.into_body().read_to_string().unwrap(), "8");
    let logs = stdout(&d.cli(&["logs", "hello_shop/first"]));
    assert!(logs.contains("added 5") && logs.contains("added 3"), "{logs}");
}
