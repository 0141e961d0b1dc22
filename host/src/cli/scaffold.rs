//! `conflux new NAME`: the templates of a ready-to-build entity crate, the checks on its
//! name, and writing it into a fresh directory. [`Scaffold::files`] renders everything
//! without touching the disk; [`Scaffold::write`] puts it on disk; [`new_crate`]
//! is the command around them.

use anyhow::Context;
use std::path::{Path, PathBuf};

/// `conflux new`: writes the scaffold and says what to do next.
pub(super) fn new_crate(name: &str, dir: Option<PathBuf>, sdk_path: Option<PathBuf>, json: bool) -> anyhow::Result<()> {
    let dir = dir.unwrap_or_else(|| PathBuf::from(name));
    let sdk = match sdk_path {
        Some(p) => p,
        None => {
            let built_with = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-sdk/conflux-sdk");
            anyhow::ensure!(
                built_with.join("Cargo.toml").is_file(),
                "cannot find the conflux-sdk sources this conflux was built with ({}); pass --sdk-path DIR",
                built_with.display()
            );
            built_with
        }
    };
    let sdk_path = sdk.canonicalize().with_context(|| format!("--sdk-path {}", sdk.display()))?;
    let scaffold = Scaffold { name: name.to_owned(), sdk_path, sdk_version: env!("CARGO_PKG_VERSION").to_owned() };
    let files = scaffold.write(&dir)?;
    if json {
        let files: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        say!("{}", serde_json::json!({ "created": dir.display().to_string(), "files": files }));
    } else {
        let wasm = name.replace('-', "_");
        let ty = scaffold.entity_type();
        say!("created {} ({} files)", dir.display(), files.len());
        say!("next:");
        say!("  cd {}", dir.display());
        say!("  cargo test");
        say!("  cargo build --release --target wasm32-wasip2");
        say!("  conflux deploy {ty} target/wasm32-wasip2/release/{wasm}.wasm");
        say!("  conflux invoke {ty}/first add 5");
    }
    Ok(())
}

/// Longest crate name `conflux new` accepts, in bytes (also the host's type-name limit).
const MAX_NAME_LEN: usize = 64;

/// Names Rust or Cargo reserve, or the crate's own dependencies use (compared after `-` → `_`).
const RESERVED: &str = "abstract as async await become box break const continue crate do dyn else enum extern false \
    final fn for gen if impl in let loop macro match mod move mut override priv pub ref return self Self static \
    struct super trait true try type typeof unsafe unsized use virtual where while yield std core alloc test proc_macro \
    serde conflux_sdk";

/// Type names the generated `src/lib.rs` uses; an entity struct named so would shadow one.
const TAKEN_TYPE_NAMES: &str = "Error Result Ok Err Option Some None String Vec Box Default Debug Serialize \
    Deserialize EntityRef TimerId TestHarness";

/// Why a crate could not be scaffolded.
#[derive(Debug, thiserror::Error)]
pub enum ScaffoldError {
    /// The name cannot be a crate (and entity type) name.
    #[error("invalid name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },
    /// The target exists and is not an empty directory.
    #[error("{} already exists and is not an empty directory; pick another name or remove it", .0.display())]
    NotEmpty(PathBuf),
    /// Reading or writing a file or directory failed.
    #[error("cannot write {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
}

/// A new entity crate: its name and the `conflux-sdk` it depends on.
#[derive(Debug, Clone)]
pub struct Scaffold {
    /// Crate name, e.g. `my-shop` (struct `MyShop`, entity type `my_shop`).
    pub name: String,
    /// Path of the `conflux-sdk` crate, written verbatim into Cargo.toml (relative paths
    /// are relative to the new crate, so prefer an absolute one).
    pub sdk_path: PathBuf,
    /// The exact `conflux-sdk` version to pin, e.g. `0.1.0`.
    pub sdk_version: String,
}

impl Scaffold {
    /// The entity type to deploy it as: the name in snake_case (`MyShop` → `my_shop`).
    pub fn entity_type(&self) -> String {
        type_name(&self.name)
    }

    /// The entity struct's name: the name in UpperCamelCase (`my-shop` → `MyShop`).
    pub fn struct_name(&self) -> String {
        upper_camel_case(&self.name)
    }

    /// Every file of the crate as (path relative to the crate directory, contents). No I/O.
    pub fn files(&self) -> Result<Vec<(PathBuf, String)>, ScaffoldError> {
        validate_name(&self.name)?;
        let render = |template: &str| {
            template
                .replace("{{crate_name}}", &self.name)
                .replace("{{wasm_name}}", &self.name.replace('-', "_"))
                .replace("{{Entity}}", &self.struct_name())
                .replace("{{entity_type}}", &self.entity_type())
                .replace("{{sdk_version}}", &toml_escape(&self.sdk_version))
                .replace("{{sdk_path}}", &toml_escape(&self.sdk_path.to_string_lossy()))
        };
        Ok([
            ("Cargo.toml", CARGO_TOML),
            ("rust-toolchain.toml", RUST_TOOLCHAIN_TOML),
            (".gitignore", "/target\n"),
            ("src/lib.rs", LIB_RS),
            ("README.md", README_MD),
        ]
        .into_iter()
        .map(|(path, template)| (PathBuf::from(path), render(template)))
        .collect())
    }

    /// Writes the crate into `dir` (created if missing; refused unless empty) and returns
    /// the paths written.
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>, ScaffoldError> {
        let files = self.files()?;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ScaffoldError::Io { path, source }
        };
        if dir.exists() {
            let empty_dir = dir.is_dir() && dir.read_dir().map_err(io(dir))?.next().is_none();
            if !empty_dir {
                return Err(ScaffoldError::NotEmpty(dir.to_path_buf()));
            }
        }
        let mut written = Vec::with_capacity(files.len());
        for (relative, contents) in files {
            let path = dir.join(relative);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
            }
            std::fs::write(&path, contents).map_err(io(&path))?;
            written.push(path);
        }
        Ok(written)
    }
}

/// Checks that `name` works as a crate name, a Rust struct name and an entity type name.
pub fn validate_name(name: &str) -> Result<(), ScaffoldError> {
    let invalid = |reason: &str| Err(ScaffoldError::InvalidName { name: name.to_string(), reason: reason.to_string() });
    if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return invalid("a crate name must start with an ASCII letter");
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return invalid("a crate name may only contain ASCII letters, digits, '-' and '_'");
    }
    if name.len() > MAX_NAME_LEN || type_name(name).len() > MAX_NAME_LEN {
        return invalid(&format!("a crate name (and its snake_case entity type) must be at most {MAX_NAME_LEN} bytes"));
    }
    let snake = name.replace('-', "_");
    if RESERVED.split(' ').any(|k| k == snake) {
        return invalid("that is a Rust keyword, a built-in crate or a dependency of the new crate");
    }
    let struct_name = upper_camel_case(name);
    if TAKEN_TYPE_NAMES.split(' ').any(|t| t == struct_name) {
        return invalid(&format!("the entity struct `{struct_name}` would shadow a type the generated code uses"));
    }
    Ok(())
}

/// `my-shop` → `MyShop`, `order_book2` → `OrderBook2`: each `-`/`_`-separated part capitalised.
fn upper_camel_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for part in name.split(['-', '_']) {
        let mut chars = part.chars();
        if let Some(first) = chars.next() {
            out.push(first.to_ascii_uppercase());
            out.extend(chars);
        }
    }
    out
}

/// The entity type for crate `name`: its snake_case (`MyShop` → `my_shop`, `hello-shop` → `hello_shop`).
pub fn type_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    let mut prev_lower_or_digit = false;
    for c in name.chars() {
        if c.is_ascii_uppercase() && prev_lower_or_digit {
            out.push('_');
        }
        out.push(if c == '-' { '_' } else { c.to_ascii_lowercase() });
        prev_lower_or_digit = c.is_ascii_lowercase() || c.is_ascii_digit();
    }
    out
}

/// Escapes text for the inside of a TOML basic string.
fn toml_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

const CARGO_TOML: &str = r#"[package]
name = "{{crate_name}}"
version = "0.1.0"
edition = "2024"

[lib]
# cdylib: the WebAssembly component you deploy; rlib: lets `cargo test` run natively.
crate-type = ["cdylib", "rlib"]

[dependencies]
# Pinned to the exact SDK version this crate was generated for. The `path` lets it build
# before the SDK is published; once conflux-sdk comes from a registry, drop `path`.
conflux-sdk = { version = "={{sdk_version}}", path = "{{sdk_path}}" }
serde = { version = "1", features = ["derive"] }

# Small components: they are uploaded, stored and compiled by every node.
[profile.release]
opt-level = "s"
lto = true
strip = true
codegen-units = 1

# This crate is its own workspace, so it builds even when created inside another one.
[workspace]
"#;

const RUST_TOOLCHAIN_TOML: &str = r#"[toolchain]
channel = "stable"
targets = ["wasm32-wasip2"]
"#;

const LIB_RS: &str = r#"//! The `{{entity_type}}` entity, generated by `conflux new {{crate_name}}`.
//!
//! Every id (`{{entity_type}}/a`, `{{entity_type}}/b`, ...) is an instance with its own state.
//! Operations on one id run one at a time, and each is an atomic turn: if it returns `Err`
//! (or panics), nothing it changed is saved. Replace this sample with your own logic.

use conflux_sdk::prelude::*;

/// The most one `add` accepts.
pub const MAX_ADD: u64 = 1_000_000;

/// One `{{entity_type}}` entity. Its state is this struct, stored as JSON under the key
/// `$self`: loaded before every operation, saved after a `&mut self` one returns `Ok`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct {{Entity}} {
    /// The running total.
    total: u64,
    /// How many `add`s and `take`s succeeded.
    changes: u32,
}

/// Every `pub fn` with a `self` receiver is an operation, invoked by name with a JSON payload.
#[entity]
impl {{Entity}} {
    /// Adds `n` (at most `MAX_ADD`) and returns the new total.
    pub fn add(&mut self, n: u64) -> Result<u64, Error> {
        if n > MAX_ADD {
            return Err(Error::failed(format!("cannot add {n}: at most {MAX_ADD} at a time")));
        }
        self.total = self.total.checked_add(n).ok_or_else(|| Error::failed("the total would overflow"))?;
        self.changes += 1;
        // Guest stdout goes to the host's log, tagged with this entity (`conflux logs`).
        println!("{}: added {n}, total is now {}", context::self_ref(), self.total);
        Ok(self.total)
    }

    /// Takes `n` away and returns what is left; refused if there is not enough.
    pub fn take(&mut self, n: u64) -> Result<u64, Error> {
        if n > self.total {
            return Err(Error::failed(format!("cannot take {n}: only {} left", self.total)));
        }
        self.total -= n;
        self.changes += 1;
        Ok(self.total)
    }

    /// The current total. `&self` operations never write state.
    pub fn get(&self) -> u64 {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conflux_sdk::testing::TestHarness;

    #[test]
    fn add_take_and_get() {
        let mut h = TestHarness::new("{{entity_type}}", "a");
        assert_eq!(h.call::<{{Entity}}, _, u64>("add", &5).unwrap(), 5);
        assert_eq!(h.call::<{{Entity}}, _, u64>("add", &3).unwrap(), 8);
        assert_eq!(h.call::<{{Entity}}, _, u64>("take", &2).unwrap(), 6);
        assert_eq!(h.call::<{{Entity}}, _, u64>("get", &()).unwrap(), 6);
        // Payloads and replies are JSON; an empty payload counts as `null`.
        assert_eq!(h.invoke::<{{Entity}}>("get", b"").unwrap(), b"6");
        assert_eq!(h.entity::<{{Entity}}>().changes, 3);
    }

    #[test]
    fn refused_operations_change_nothing() {
        let mut h = TestHarness::new("{{entity_type}}", "a");
        h.call::<{{Entity}}, _, u64>("add", &5).unwrap();
        match h.call::<{{Entity}}, _, u64>("take", &6) {
            Err(Error::Failed(m)) => assert_eq!(m, "cannot take 6: only 5 left"),
            other => panic!("expected Failed, got {other:?}"),
        }
        assert!(matches!(h.call::<{{Entity}}, _, u64>("add", &(MAX_ADD + 1)), Err(Error::Failed(_))));
        assert!(matches!(h.invoke::<{{Entity}}>("add", b"\"five\""), Err(Error::BadRequest(_))));
        assert_eq!(h.entity::<{{Entity}}>().total, 5);
        assert_eq!(h.entity::<{{Entity}}>().changes, 1);
    }
}
"#;

const README_MD: &str = r#"# {{crate_name}}

A [Conflux](https://example.invalid/conflux) entity, generated by `conflux new {{crate_name}}`.
Each `{{entity_type}}/<id>` keeps a running total; the code is in `src/lib.rs`. Payloads and
replies are JSON; a payload of the wrong shape is a `bad-request`.

| operation | payload (JSON)  | reply (JSON)  | errors |
|-----------|-----------------|---------------|--------|
| `add`     | an integer `n`  | the new total | `failed` if `n` > 1000000 or the total would overflow |
| `take`    | an integer `n`  | what is left  | `failed` if fewer than `n` are left |
| `get`     | empty / `null`  | the total     | — |

## Test and build

```sh
cargo test                                     # natively with conflux_sdk::testing::TestHarness, no host
cargo build --release --target wasm32-wasip2   # → target/wasm32-wasip2/release/{{wasm_name}}.wasm
```

## Deploy and invoke

```sh
conflux deploy {{entity_type}} target/wasm32-wasip2/release/{{wasm_name}}.wasm
conflux invoke {{entity_type}}/a1 add 5      # → 5
conflux invoke {{entity_type}}/a1 get        # → 5
curl --json 5 localhost:7070/v1/entities/{{entity_type}}/a1/add      # → 10, over HTTP
conflux logs {{entity_type}}                 # what the entity printed
```
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn scaffold(name: &str) -> Scaffold {
        Scaffold { name: name.into(), sdk_path: PathBuf::from("/opt/conflux/sdk"), sdk_version: "1.2.3".into() }
    }

    #[test]
    fn names_are_validated() {
        for good in ["hello", "my-shop", "order_book2", "MyShop", "a", "selfie", "test-shop", &"a".repeat(64)] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in ["", "2shop", "-shop", "_shop", "my shop", "shop!", "café", "self", "crate", "Self", "r#fn"] {
            assert!(matches!(validate_name(bad), Err(ScaffoldError::InvalidName { .. })), "{bad}");
        }
        for bad in [&"a".repeat(65), "test", "serde", "conflux-sdk", "error", "result", "test-harness"] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
        assert!(scaffold("self").files().is_err());
    }

    #[test]
    fn case_conversions() {
        assert_eq!(upper_camel_case("my-shop"), "MyShop");
        assert_eq!(upper_camel_case("order_book2"), "OrderBook2");
        assert_eq!(upper_camel_case("a--b"), "AB");
        assert_eq!(type_name("MyShop"), "my_shop");
        assert_eq!(type_name("hello-shop"), "hello_shop");
        assert_eq!(scaffold("order_book2").entity_type(), "order_book2");
    }

    #[test]
    fn cargo_toml_parses_and_pins_the_sdk() {
        let mut s = scaffold("my-shop");
        s.sdk_path = PathBuf::from(r#"C:\odd "dir"\sdk"#);
        let files = s.files().unwrap();
        let toml_text = &files.iter().find(|(p, _)| p == Path::new("Cargo.toml")).unwrap().1;
        let v = toml::from_str::<toml::Value>(toml_text).unwrap();
        assert_eq!(v["package"]["name"].as_str(), Some("my-shop"));
        assert_eq!(v["package"]["edition"].as_str(), Some("2024"));
        let sdk = &v["dependencies"]["conflux-sdk"];
        assert_eq!(sdk["version"].as_str(), Some("=1.2.3"));
        assert_eq!(sdk["path"].as_str(), Some(r#"C:\odd "dir"\sdk"#));
        assert!(v["workspace"].as_table().unwrap().is_empty());
        let lib = &files.iter().find(|(p, _)| p == Path::new("src/lib.rs")).unwrap().1;
        assert!(lib.contains("pub struct MyShop {") && lib.contains(r#"TestHarness::new("my_shop", "a")"#));
        assert!(files.iter().all(|(_, text)| !text.contains("{{")), "unreplaced placeholder");
    }

    #[test]
    fn write_creates_files_and_refuses_a_non_empty_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("my-shop");
        let written = scaffold("my-shop").write(&dir).unwrap();
        assert_eq!(written.len(), 5);
        assert!(dir.join("src/lib.rs").is_file() && dir.join(".gitignore").is_file());
        assert!(matches!(scaffold("my-shop").write(&dir), Err(ScaffoldError::NotEmpty(_))));
        // An existing empty directory is fine.
        let empty = tmp.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        assert!(scaffold("my-shop").write(&empty).is_ok());
    }
}
