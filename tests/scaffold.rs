//! End to end, once per language: `conflux new hello-shop [--lang ts|python]` →
//! the project's own native tests (Rust: `cargo test` with the SDK's harness;
//! TypeScript: `npm test`; Python: pytest) → its build (`cargo build --release
//! --target wasm32-wasip2`, `npm run build`, `./build.sh`) → deploy → invoke
//! over gRPC and HTTP → what the entity printed, in `conflux logs`.
//!
//! The TypeScript and Python tests use what `scripts/build-ts.sh` and
//! `scripts/build-python.sh` (run by `scripts/test.sh`) set up: the repo's
//! root `node_modules` and the venv `target/py-venv`.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;
use support::*;

/// Runs `command` (described as `what` in failures), asserting it succeeded.
fn run(what: &str, command: &mut Command) -> Output {
    let started = Instant::now();
    let out = command.output().unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(out.status.success(), "{what} failed ({}):\n{}\n{}", out.status, stdout(&out), stderr(&out));
    eprintln!("{what}: {:.1} s", started.elapsed().as_secs_f64());
    out
}

/// `conflux new hello-shop --dir <tmp>/hello-shop` plus `lang_args`: checks it
/// succeeded, wrote `files` and printed `next_steps` (each a line of its
/// output), and that a second `new` into the same directory refuses rather
/// than overwriting. Returns the temporary directory (keep it alive) and the
/// project's directory in it.
fn new_project(lang_args: &[&str], files: &[&str], next_steps: &[&str]) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("hello-shop");
    let new = || {
        let mut c = Command::new(conflux_bin());
        c.args(["new", "hello-shop"]).args(lang_args).arg("--dir").arg(&dir);
        c
    };
    let out = run("conflux new", &mut new());
    let told = stdout(&out);
    for step in next_steps {
        assert!(told.lines().any(|l| l.trim() == *step), "`{step}` not among the next steps:\n{told}");
    }
    for f in files {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let again = new().output().unwrap();
    assert!(!again.status.success());
    assert!(stderr(&again).contains("not an empty directory"), "{}", stderr(&again));
    (tmp, dir)
}

/// Deploys `wasm` as `hello_shop` to a fresh daemon, then: `conflux invoke
/// hello_shop/first add 5` prints 5, `add 3` over HTTP replies 8, and the
/// entity's "added 5" and "added 3" are in `conflux logs`.
///
/// With tests/polyglot.rs's shared `runtime.compile_cache_dir`: its
/// whole-component cache never hits here (componentize-js and componentize-py
/// builds are not reproducible: the interpreter snapshot differs from build
/// to build), but its function cache does — the interpreter's functions are
/// the ones every TypeScript (or Python) component compiled before.
fn deploy_and_use(wasm: &Path) {
    assert!(wasm.is_file(), "{} missing", wasm.display());
    let data = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(data.path(), &["--set", &compile_cache_setting()]);
    let started = Instant::now();
    deploy(&d, "hello_shop", wasm);
    eprintln!("conflux deploy: {:.1} s", started.elapsed().as_secs_f64());
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

/// A prerequisite set up by one of the build scripts, or a failure saying which to run.
fn prerequisite(path: &str, script: &str) -> PathBuf {
    let path = workspace_root().join(path);
    assert!(path.exists(), "{} missing: run {script} first (scripts/test.sh does)", path.display());
    path
}

#[test]
fn a_new_crate_tests_builds_deploys_and_runs() {
    let (_tmp, crate_dir) = new_project(
        &[],
        &["Cargo.toml", "rust-toolchain.toml", "README.md", "src/lib.rs", ".gitignore"],
        &["cargo test", "conflux deploy hello_shop target/wasm32-wasip2/release/hello_shop.wasm"],
    );
    let manifest = std::fs::read_to_string(crate_dir.join("Cargo.toml")).unwrap();
    assert!(manifest.contains(&format!("version = \"={}\"", env!("CARGO_PKG_VERSION"))), "{manifest}");
    // Resolve to the versions this workspace already uses (cargo drops the rest).
    std::fs::copy(workspace_root().join("Cargo.lock"), crate_dir.join("Cargo.lock")).unwrap();

    // A target dir of its own, kept between runs so only the first one compiles
    // the dependencies.
    let cargo = |args: &[&str]| {
        let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()));
        c.current_dir(&crate_dir).env("CARGO_TARGET_DIR", workspace_root().join("target/scaffold")).args(args);
        run(&format!("cargo {}", args.join(" ")), &mut c)
    };
    let report = stdout(&cargo(&["test"]));
    assert!(report.contains("test result: ok. 2 passed"), "the sample entity's unit tests ran: {report}");
    cargo(&["build", "--release", "--target", "wasm32-wasip2"]);
    deploy_and_use(&workspace_root().join("target/scaffold/wasm32-wasip2/release/hello_shop.wasm"));
}

#[test]
fn a_new_ts_entity_tests_builds_deploys_and_runs() {
    let (_tmp, dir) = new_project(
        &["--lang", "ts"],
        &["package.json", "tsconfig.json", "src/entity.ts", "test/entity.test.ts", "README.md", ".gitignore"],
        &["npm install", "npm test", "npm run build", "conflux deploy hello_shop entity.wasm"],
    );
    let sdk = workspace_root().join("guest-sdk/typescript").canonicalize().unwrap();
    let package = std::fs::read_to_string(dir.join("package.json")).unwrap();
    assert!(package.contains(&format!("\"@conflux/sdk\": \"file:{}\"", sdk.display())), "{package}");
    // conflux-build loads esbuild and componentize-js from the SDK's real
    // path, i.e. from the repo's root node_modules.
    prerequisite("node_modules/@bytecodealliance/componentize-js", "scripts/build-ts.sh");

    // The README's commands, as written. `npm install` links the SDK and
    // installs the project's dev tools (typescript, tsx, @types/node: the
    // versions the repo's package-lock.json pins, so the root `npm ci` has
    // them in npm's cache already); --prefer-offline takes them from there
    // rather than asking the registry again.
    let npm = |args: &[&str]| {
        let mut c = Command::new("npm");
        c.current_dir(&dir).args(args);
        run(&format!("npm {}", args.join(" ")), &mut c)
    };
    npm(&["install", "--prefer-offline", "--no-audit", "--no-fund"]);
    let report = stdout(&npm(&["test"]));
    assert!(report.contains("\n# pass 2\n") && report.contains("\n# fail 0\n"), "the sample's tests ran: {report}");
    npm(&["run", "build"]);
    deploy_and_use(&dir.join("entity.wasm"));
}

/// Unix only: build.sh is a bash script, and .venv a symlink.
#[cfg(unix)]
#[test]
fn a_new_python_entity_tests_builds_deploys_and_runs() {
    use std::os::unix::fs::PermissionsExt as _;

    let (_tmp, dir) = new_project(
        &["--lang", "python"],
        &["entity.py", "test_entity.py", "requirements.txt", "build.sh", "README.md", ".gitignore"],
        &["conflux deploy hello_shop entity.wasm", "conflux invoke hello_shop/first add 5"],
    );
    let mode = std::fs::metadata(dir.join("build.sh")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o755, "build.sh is executable");
    let sdk = workspace_root().join("guest-sdk/python").canonicalize().unwrap();
    let requirements = std::fs::read_to_string(dir.join("requirements.txt")).unwrap();
    assert!(requirements.lines().any(|l| l == format!("-e {}", sdk.display())), "{requirements}");

    // build.sh is the README's way to test and build: it creates .venv and
    // pip-installs requirements.txt only if .venv/bin/conflux-build is
    // missing, then runs pytest and conflux-build from .venv. Rather than a
    // fresh venv (network installs of a ~40 MB componentize-py, a minute),
    // .venv is the repo's target/py-venv, which scripts/build-python.sh filled
    // with the same requirements: the SDK, editable from guest-sdk/python, and
    // the pinned componentize-py and pytest (checked below). So the scaffold's
    // own build.sh runs unchanged, only its one-time setup is skipped.
    let venv = prerequisite("target/py-venv/bin/conflux-build", "scripts/build-python.sh");
    let venv = venv.parent().unwrap().parent().unwrap();
    std::os::unix::fs::symlink(venv, dir.join(".venv")).unwrap();
    let pins = run(
        "the venv's versions",
        Command::new(dir.join(".venv/bin/python")).args([
            "-c",
            "from importlib.metadata import version as v; print(f\"componentize-py=={v('componentize-py')}\"); \
             print(f\"pytest=={v('pytest')}\")",
        ]),
    );
    for pin in stdout(&pins).lines() {
        assert!(requirements.lines().any(|l| l == pin), "target/py-venv has {pin}, requirements.txt:\n{requirements}");
    }

    // PYTHONDONTWRITEBYTECODE: importing the editable SDK would otherwise
    // leave __pycache__ in guest-sdk/python (as scripts/build-python.sh avoids).
    let built =
        run("./build.sh", Command::new(dir.join("build.sh")).current_dir(&dir).env("PYTHONDONTWRITEBYTECODE", "1"));
    let report = stdout(&built);
    assert!(report.lines().any(|l| l.starts_with("2 passed")), "the sample's tests ran: {report}");
    deploy_and_use(&dir.join("entity.wasm"));
}
