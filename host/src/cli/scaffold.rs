//! `conflux new NAME [--lang rust|ts|python]`: the templates of a ready-to-build entity
//! (a Cargo crate, an npm package or a Python project), the checks on its name, and writing
//! it into a fresh directory. [`Scaffold::files`] renders everything without touching the
//! disk; [`Scaffold::write`] puts it on disk; [`new_crate`] is the command around them.
//!
//! The Rust templates live here; the TypeScript and Python ones are the files under
//! `guest-sdk/typescript/template/` and `guest-sdk/python/template/`, embedded at build
//! time (one source of truth) and rendered the same way.

use anyhow::Context;
use std::path::{Path, PathBuf};

/// `conflux new`: writes the scaffold and says what to do next.
pub(super) fn new_crate(
    name: &str,
    lang: Lang,
    dir: Option<PathBuf>,
    sdk_path: Option<PathBuf>,
    json: bool,
) -> anyhow::Result<()> {
    let dir = dir.unwrap_or_else(|| PathBuf::from(name));
    let sdk = match sdk_path {
        Some(p) => p,
        None => {
            let built_with = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-sdk").join(lang.sdk_dir_name());
            anyhow::ensure!(
                built_with.join(lang.sdk_marker()).is_file(),
                "cannot find the {} SDK sources this conflux was built with ({}); pass --sdk-path DIR",
                lang.label(),
                built_with.display()
            );
            built_with
        }
    };
    let sdk_path = sdk.canonicalize().with_context(|| format!("--sdk-path {}", sdk.display()))?;
    // CONFLUX_SDK_PATH may name another language's SDK: say so now, not at build time.
    anyhow::ensure!(
        sdk_path.join(lang.sdk_marker()).is_file(),
        "--sdk-path {} is not the {} SDK (it has no {})",
        sdk_path.display(),
        lang.label(),
        lang.sdk_marker()
    );
    let scaffold =
        Scaffold { name: name.to_owned(), lang, sdk_path, sdk_version: env!("CARGO_PKG_VERSION").to_owned() };
    let files = scaffold.write(&dir)?;
    if json {
        let files: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        say!("{}", serde_json::json!({ "created": dir.display().to_string(), "files": files }));
    } else {
        say!("created {} ({} files)", dir.display(), files.len());
        say!("next:");
        for step in scaffold.next_steps(&dir) {
            say!("  {step}");
        }
    }
    if lang == Lang::TypeScript && !ts_build_tools_installed(&scaffold.sdk_path) {
        note!(
            "note: `npm run build` needs esbuild and componentize-js next to the SDK ({}): run `npm ci` at the \
             root of the Conflux checkout (or scripts/build-ts.sh) once",
            scaffold.sdk_path.display()
        );
    }
    Ok(())
}

/// Whether the TypeScript SDK's `conflux-build` can load its tools: it resolves them
/// from its own real path, i.e. from a `node_modules` in the SDK or one of its parents.
fn ts_build_tools_installed(sdk: &Path) -> bool {
    sdk.ancestors().any(|d| d.join("node_modules/@bytecodealliance/componentize-js").is_dir())
}

/// The language of the entity `conflux new` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Lang {
    /// A Cargo crate using the conflux-sdk crate.
    #[default]
    Rust,
    /// An npm package using @conflux/sdk (alias: typescript).
    #[value(name = "ts", alias = "typescript")]
    TypeScript,
    /// A Python project using the conflux-sdk package (alias: py).
    #[value(name = "python", alias = "py")]
    Python,
}

impl Lang {
    /// The SDK's directory under `guest-sdk/` in the Conflux checkout.
    fn sdk_dir_name(self) -> &'static str {
        match self {
            Lang::Rust => "conflux-sdk",
            Lang::TypeScript => "typescript",
            Lang::Python => "python",
        }
    }

    /// A file every copy of the SDK has at its root.
    fn sdk_marker(self) -> &'static str {
        match self {
            Lang::Rust => "Cargo.toml",
            Lang::TypeScript => "package.json",
            Lang::Python => "pyproject.toml",
        }
    }

    /// The language's name in messages.
    pub fn label(self) -> &'static str {
        match self {
            Lang::Rust => "Rust",
            Lang::TypeScript => "TypeScript",
            Lang::Python => "Python",
        }
    }

    /// The files of a new project, before rendering.
    fn templates(self) -> &'static [Template] {
        match self {
            Lang::Rust => RUST_TEMPLATES,
            Lang::TypeScript => TS_TEMPLATES,
            Lang::Python => PYTHON_TEMPLATES,
        }
    }

    /// Names (compared after `-` → `_`) that this language's project cannot have, on top
    /// of [`RESERVED`]: for TypeScript, the package's own dependencies (npm refuses to
    /// install a package into one of the same name).
    fn reserved(self) -> &'static str {
        match self {
            Lang::Rust | Lang::Python => "",
            Lang::TypeScript => "typescript tsx",
        }
    }

    /// Entity class names the generated code of this language uses for something else,
    /// on top of [`TAKEN_TYPE_NAMES`]: `Number` in `src/entity.ts`; `BadRequest` and the
    /// keywords `True`/`False` in `entity.py`.
    fn taken_type_names(self) -> &'static str {
        match self {
            Lang::Rust => "",
            Lang::TypeScript => "Number",
            Lang::Python => "BadRequest True False",
        }
    }
}

/// One file of a template: where it goes, its text with `{{placeholders}}`, and how the
/// SDK path is quoted in it.
struct Template {
    path: &'static str,
    text: &'static str,
    /// Written with mode 0755 (on Unix).
    executable: bool,
    quote: Quote,
}

/// How a value is written into a file: as is, or escaped for the syntax around it.
#[derive(Clone, Copy)]
enum Quote {
    /// Prose (README) and code that never holds a path.
    Verbatim,
    /// Inside a TOML basic string.
    Toml,
    /// Inside a JSON string.
    Json,
    /// A pip requirements option (`-e PATH`): pip splits it like a POSIX shell.
    Shell,
}

impl Quote {
    fn apply(self, s: &str) -> String {
        match self {
            Quote::Verbatim => s.to_owned(),
            Quote::Toml => toml_escape(s),
            Quote::Json => {
                let quoted = serde_json::Value::from(s).to_string();
                quoted[1..quoted.len() - 1].to_owned()
            }
            Quote::Shell
                if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "/._-+:,=@%".contains(c)) =>
            {
                s.to_owned()
            }
            Quote::Shell => format!("'{}'", s.replace('\'', r"'\''")),
        }
    }
}

const fn template(path: &'static str, text: &'static str, quote: Quote) -> Template {
    Template { path, text, executable: false, quote }
}

const RUST_TEMPLATES: &[Template] = &[
    template("Cargo.toml", CARGO_TOML, Quote::Toml),
    template("rust-toolchain.toml", RUST_TOOLCHAIN_TOML, Quote::Toml),
    template(".gitignore", "/target\n", Quote::Verbatim),
    template("src/lib.rs", LIB_RS, Quote::Verbatim),
    template("README.md", README_MD, Quote::Verbatim),
];

/// `guest-sdk/typescript/template/`, file by file.
const TS_TEMPLATES: &[Template] = &[
    template("package.json", include_str!("../../../guest-sdk/typescript/template/package.json"), Quote::Json),
    template("tsconfig.json", include_str!("../../../guest-sdk/typescript/template/tsconfig.json"), Quote::Json),
    template("src/entity.ts", include_str!("../../../guest-sdk/typescript/template/src/entity.ts"), Quote::Verbatim),
    template(
        "test/entity.test.ts",
        include_str!("../../../guest-sdk/typescript/template/test/entity.test.ts"),
        Quote::Verbatim,
    ),
    template("README.md", include_str!("../../../guest-sdk/typescript/template/README.md"), Quote::Verbatim),
    template(".gitignore", include_str!("../../../guest-sdk/typescript/template/.gitignore"), Quote::Verbatim),
];

/// `guest-sdk/python/template/`, file by file.
const PYTHON_TEMPLATES: &[Template] = &[
    template("entity.py", include_str!("../../../guest-sdk/python/template/entity.py"), Quote::Verbatim),
    template("test_entity.py", include_str!("../../../guest-sdk/python/template/test_entity.py"), Quote::Verbatim),
    template("requirements.txt", include_str!("../../../guest-sdk/python/template/requirements.txt"), Quote::Shell),
    Template {
        executable: true,
        ..template("build.sh", include_str!("../../../guest-sdk/python/template/build.sh"), Quote::Shell)
    },
    template("README.md", include_str!("../../../guest-sdk/python/template/README.md"), Quote::Verbatim),
    template(".gitignore", include_str!("../../../guest-sdk/python/template/.gitignore"), Quote::Verbatim),
];

/// Longest name `conflux new` accepts, in bytes (also the host's type-name limit).
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

/// A new entity project: its name, language and the SDK it depends on.
#[derive(Debug, Clone)]
pub struct Scaffold {
    /// Project (crate, npm package) name, e.g. `my-shop` (struct or class `MyShop`, entity
    /// type `my_shop`).
    pub name: String,
    /// The language, i.e. which templates are rendered.
    pub lang: Lang,
    /// Path of the SDK: the `conflux-sdk` crate (written into Cargo.toml), or
    /// `guest-sdk/typescript` (a `file:` dependency in package.json), or `guest-sdk/python`
    /// (`-e` in requirements.txt). Relative paths are relative to the new project, so
    /// prefer an absolute one.
    pub sdk_path: PathBuf,
    /// The exact `conflux-sdk` version to pin, e.g. `0.1.0` (Rust only).
    pub sdk_version: String,
}

impl Scaffold {
    /// The entity type to deploy it as: the name in snake_case (`MyShop` → `my_shop`).
    pub fn entity_type(&self) -> String {
        type_name(&self.name)
    }

    /// The entity struct's (or class's) name: the name in UpperCamelCase (`my-shop` → `MyShop`).
    pub fn struct_name(&self) -> String {
        upper_camel_case(&self.name)
    }

    /// Every file of the project as (path relative to its directory, contents). No I/O.
    pub fn files(&self) -> Result<Vec<(PathBuf, String)>, ScaffoldError> {
        validate_name_for(&self.name, self.lang)?;
        let render = |t: &Template| {
            t.text
                .replace("{{crate_name}}", &self.name)
                .replace("{{name}}", &self.name)
                .replace("{{wasm_name}}", &self.name.replace('-', "_"))
                .replace("{{Entity}}", &self.struct_name())
                .replace("{{entity_type}}", &self.entity_type())
                .replace("{{sdk_version}}", &t.quote.apply(&self.sdk_version))
                .replace("{{sdk_path}}", &t.quote.apply(&self.sdk_path.to_string_lossy()))
        };
        Ok(self.lang.templates().iter().map(|t| (PathBuf::from(t.path), render(t))).collect())
    }

    /// The commands to run next, from the directory the project was written into as `dir`.
    pub fn next_steps(&self, dir: &Path) -> Vec<String> {
        let ty = self.entity_type();
        let mut steps = vec![format!("cd {}", dir.display())];
        match self.lang {
            Lang::Rust => {
                let wasm = self.name.replace('-', "_");
                steps.push("cargo test".into());
                steps.push("cargo build --release --target wasm32-wasip2".into());
                steps.push(format!("conflux deploy {ty} target/wasm32-wasip2/release/{wasm}.wasm"));
            }
            Lang::TypeScript => {
                steps.push("npm install".into());
                steps.push("npm test".into());
                steps.push("npm run build".into());
                steps.push(format!("conflux deploy {ty} entity.wasm"));
            }
            Lang::Python => {
                steps.push("./build.sh    # creates .venv, runs the tests (pytest), builds entity.wasm".into());
                steps.push(format!("conflux deploy {ty} entity.wasm"));
            }
        }
        steps.push(format!("conflux invoke {ty}/first add 5"));
        steps
    }

    /// Writes the project into `dir` (created if missing; refused unless empty) and returns
    /// the paths written. Scripts (`build.sh`) are made executable.
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
        for ((relative, contents), template) in files.into_iter().zip(self.lang.templates()) {
            let path = dir.join(relative);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
            }
            std::fs::write(&path, contents).map_err(io(&path))?;
            #[cfg(unix)]
            if template.executable {
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).map_err(io(&path))?;
            }
            #[cfg(not(unix))]
            let _ = template;
            written.push(path);
        }
        Ok(written)
    }
}

/// Checks that `name` works as a crate name, a Rust struct name and an entity type name.
/// Every language gets these rules, so an entity type's name never depends on its SDK.
pub fn validate_name(name: &str) -> Result<(), ScaffoldError> {
    let invalid = |reason: &str| Err(ScaffoldError::InvalidName { name: name.to_string(), reason: reason.to_string() });
    if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return invalid("a name must start with an ASCII letter");
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return invalid("a name may only contain ASCII letters, digits, '-' and '_'");
    }
    if name.len() > MAX_NAME_LEN || type_name(name).len() > MAX_NAME_LEN {
        return invalid(&format!("a name (and its snake_case entity type) must be at most {MAX_NAME_LEN} bytes"));
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

/// [`validate_name`], plus what `lang`'s templates need on top (see [`Lang::reserved`] and
/// [`Lang::taken_type_names`]).
pub fn validate_name_for(name: &str, lang: Lang) -> Result<(), ScaffoldError> {
    validate_name(name)?;
    let invalid = |reason: String| Err(ScaffoldError::InvalidName { name: name.to_string(), reason });
    let snake = name.replace('-', "_");
    if lang.reserved().split(' ').any(|k| k == snake) {
        return invalid(format!("that is a dependency of the new {} package", lang.label()));
    }
    let class = upper_camel_case(name);
    if lang.taken_type_names().split(' ').any(|t| t == class) {
        return invalid(format!(
            "the entity class `{class}` would shadow a name the generated {} code uses",
            lang.label()
        ));
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
        scaffold_in(Lang::Rust, name)
    }

    fn scaffold_in(lang: Lang, name: &str) -> Scaffold {
        Scaffold { name: name.into(), lang, sdk_path: PathBuf::from("/opt/conflux/sdk"), sdk_version: "1.2.3".into() }
    }

    /// The rendered text of `path` in `files`.
    fn file<'a>(files: &'a [(PathBuf, String)], path: &str) -> &'a str {
        &files.iter().find(|(p, _)| p == Path::new(path)).unwrap_or_else(|| panic!("no {path}")).1
    }

    fn paths(files: &[(PathBuf, String)]) -> Vec<&str> {
        files.iter().map(|(p, _)| p.to_str().unwrap()).collect()
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
    fn typescript_renders_the_template_dir() {
        let mut s = scaffold_in(Lang::TypeScript, "my-shop");
        s.sdk_path = PathBuf::from(r#"/odd "dir"\sdk"#);
        let files = s.files().unwrap();
        assert_eq!(
            paths(&files),
            ["package.json", "tsconfig.json", "src/entity.ts", "test/entity.test.ts", "README.md", ".gitignore"]
        );
        let package: serde_json::Value = serde_json::from_str(file(&files, "package.json")).unwrap();
        assert_eq!(package["name"], "my-shop");
        assert_eq!(package["dependencies"]["@conflux/sdk"], r#"file:/odd "dir"\sdk"#);
        assert_eq!(package["scripts"]["build"], "conflux-build src/entity.ts -o entity.wasm");
        serde_json::from_str::<serde_json::Value>(file(&files, "tsconfig.json")).unwrap();
        assert!(file(&files, "src/entity.ts").contains("export default class MyShop {"));
        let test = file(&files, "test/entity.test.ts");
        assert!(test.contains(r#"import MyShop from "../src/entity";"#), "{test}");
        assert!(test.contains(r#"new TestHarness(MyShop, "my_shop", "t1")"#), "{test}");
        let readme = file(&files, "README.md");
        assert!(readme.starts_with("# my-shop\n") && readme.contains("conflux deploy my_shop entity.wasm"), "{readme}");
        assert!(files.iter().all(|(_, text)| !text.contains("{{")), "unreplaced placeholder");
        assert!(!s.lang.templates().iter().any(|t| t.executable));
    }

    #[test]
    fn python_renders_the_template_dir() {
        let mut s = scaffold_in(Lang::Python, "order_book2");
        s.sdk_path = PathBuf::from("/opt/my sdk's/python");
        let files = s.files().unwrap();
        assert_eq!(
            paths(&files),
            ["entity.py", "test_entity.py", "requirements.txt", "build.sh", "README.md", ".gitignore"]
        );
        assert!(file(&files, "entity.py").contains("class OrderBook2:"));
        let test = file(&files, "test_entity.py");
        assert!(test.contains("from entity import OrderBook2\n"), "{test}");
        assert!(test.contains(r#"TestHarness(OrderBook2, "order_book2", "t1")"#), "{test}");
        // pip splits a requirements option line like a POSIX shell.
        let requirements = file(&files, "requirements.txt");
        assert!(requirements.contains("\n-e '/opt/my sdk'\\''s/python'\n"), "{requirements}");
        s.sdk_path = PathBuf::from("/opt/conflux/guest-sdk/python");
        assert!(file(&s.files().unwrap(), "requirements.txt").contains("\n-e /opt/conflux/guest-sdk/python\n"));
        let build = file(&files, "build.sh");
        assert!(build.starts_with("#!/usr/bin/env bash\n") && build.contains("conflux-build entity.py -o entity.wasm"));
        let executable: Vec<&str> = s.lang.templates().iter().filter(|t| t.executable).map(|t| t.path).collect();
        assert_eq!(executable, ["build.sh"]);
        let readme = file(&files, "README.md");
        assert!(readme.contains("conflux deploy order_book2 entity.wasm") && readme.contains("`OrderBook2`"));
        assert!(files.iter().all(|(_, text)| !text.contains("{{")), "unreplaced placeholder");
    }

    #[test]
    fn every_language_keeps_the_name_rules_and_adds_its_own() {
        for lang in [Lang::Rust, Lang::TypeScript, Lang::Python] {
            for bad in ["", "2shop", "my shop", "self", "crate", "test", "serde", "error", "test-harness"] {
                assert!(validate_name_for(bad, lang).is_err(), "{bad} in {lang:?}");
                assert!(scaffold_in(lang, bad).files().is_err(), "{bad} in {lang:?}");
            }
            assert!(validate_name_for("hello-shop", lang).is_ok());
        }
        // `Number` is used by src/entity.ts; `BadRequest`, `True` and `False` by entity.py.
        for (name, rust, ts, python) in [
            ("number", true, false, true),
            ("typescript", true, false, true),
            ("tsx", true, false, true),
            ("bad-request", true, true, false),
            ("True", true, true, false),
            ("false_", true, true, false),
        ] {
            assert_eq!(validate_name_for(name, Lang::Rust).is_ok(), rust, "{name}");
            assert_eq!(validate_name_for(name, Lang::TypeScript).is_ok(), ts, "{name}");
            assert_eq!(validate_name_for(name, Lang::Python).is_ok(), python, "{name}");
        }
    }

    #[test]
    fn next_steps_per_language() {
        let dir = Path::new("shops/hello-shop");
        let steps = |lang| scaffold_in(lang, "hello-shop").next_steps(dir);
        assert_eq!(
            steps(Lang::Rust),
            [
                "cd shops/hello-shop",
                "cargo test",
                "cargo build --release --target wasm32-wasip2",
                "conflux deploy hello_shop target/wasm32-wasip2/release/hello_shop.wasm",
                "conflux invoke hello_shop/first add 5",
            ]
        );
        assert_eq!(
            steps(Lang::TypeScript),
            [
                "cd shops/hello-shop",
                "npm install",
                "npm test",
                "npm run build",
                "conflux deploy hello_shop entity.wasm",
                "conflux invoke hello_shop/first add 5",
            ]
        );
        let python = steps(Lang::Python);
        assert_eq!(python.len(), 4, "{python:?}");
        assert!(python[1].starts_with("./build.sh "), "{python:?}");
        assert_eq!(python[2..], ["conflux deploy hello_shop entity.wasm", "conflux invoke hello_shop/first add 5"]);
    }

    #[test]
    fn quoting() {
        assert_eq!(Quote::Json.apply(r#"C:\a "b""#), r#"C:\\a \"b\""#);
        assert_eq!(Quote::Toml.apply(r#"C:\a "b""#), r#"C:\\a \"b\""#);
        assert_eq!(Quote::Shell.apply("/srv/conflux-1.0/guest-sdk/python"), "/srv/conflux-1.0/guest-sdk/python");
        assert_eq!(Quote::Shell.apply("/a b/it's"), r"'/a b/it'\''s'");
        assert_eq!(Quote::Shell.apply("$HOME"), "'$HOME'");
        assert_eq!(Quote::Verbatim.apply("/a b"), "/a b");
    }

    /// Every `conflux …` command a generated README or the next steps show is one this
    /// `conflux` accepts.
    #[test]
    fn documented_conflux_commands_parse() {
        use clap::Parser as _;
        for lang in [Lang::Rust, Lang::TypeScript, Lang::Python] {
            let s = scaffold_in(lang, "my-shop");
            let files = s.files().unwrap();
            let readme = file(&files, "README.md");
            let steps = s.next_steps(Path::new("my-shop"));
            let commands: Vec<&str> = readme
                .lines()
                .chain(steps.iter().map(String::as_str))
                .filter(|l| l.starts_with("conflux "))
                .map(|l| l.split(" #").next().unwrap())
                .collect();
            assert!(commands.len() >= 3, "{lang:?}: {commands:?}");
            for c in commands {
                if let Err(e) = super::super::Cli::try_parse_from(c.split_whitespace()) {
                    panic!("{lang:?}: `{c}` does not parse: {e}");
                }
            }
        }
    }

    /// The embedded list is the template directory: a file added there is not left out.
    #[test]
    fn embedded_templates_are_the_template_dirs() {
        fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(&path, base, out);
                } else {
                    out.push(path.strip_prefix(base).unwrap().to_str().unwrap().to_owned());
                }
            }
        }
        for lang in [Lang::TypeScript, Lang::Python] {
            let dir =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-sdk").join(lang.sdk_dir_name()).join("template");
            let mut on_disk = Vec::new();
            walk(&dir, &dir, &mut on_disk);
            on_disk.sort();
            let mut embedded: Vec<&str> = lang.templates().iter().map(|t| t.path).collect();
            embedded.sort();
            assert_eq!(on_disk, embedded, "{}", dir.display());
            for t in lang.templates() {
                assert_eq!(std::fs::read_to_string(dir.join(t.path)).unwrap(), t.text, "{}", t.path);
            }
        }
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
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&dir.join("src/lib.rs")) & 0o111, 0, "not executable");
            let py = tmp.path().join("py");
            let written = scaffold_in(Lang::Python, "my-shop").write(&py).unwrap();
            assert_eq!(written.len(), 6);
            assert_eq!(mode(&py.join("build.sh")), 0o755);
            assert_eq!(mode(&py.join("entity.py")) & 0o111, 0, "not executable");
            let ts = tmp.path().join("ts");
            scaffold_in(Lang::TypeScript, "my-shop").write(&ts).unwrap();
            assert!(ts.join("src/entity.ts").is_file() && ts.join("test/entity.test.ts").is_file());
        }
    }
}
