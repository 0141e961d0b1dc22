//! The `conflux` command line: `serve` runs a node, `new` scaffolds an entity
//! (Rust, TypeScript or Python); every other command is a gRPC client of a node (`--addr` /
//! `CONFLUX_ADDR`) through conflux-client. Output for humans on stdout (or,
//! with `--json`, JSON: one document per command, one object per line for
//! streams), one-line reasons on stderr, non-zero exit on failure. Client
//! commands send `--token` as a bearer token and speak TLS to `https://`
//! addresses.
//!
//! This file holds the clap definitions and the dispatch; [`serve`] starts
//! the daemon, [`commands`] makes the client calls, [`render`] prints their
//! replies, [`scaffold`] writes `conflux new`'s project.

/// `println!` for results. Unlike it, a closed stdout (`conflux status | head
/// -1`) is an error, which `main` turns into a quiet exit instead of a panic.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($arg)*)?
    }};
}

/// `eprintln!` for remarks and the final error: nothing is left to tell if
/// stderr is closed too, so that is not an error.
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// The exit status of a command whose reader went away (`| head`): that of
/// a Unix tool killed by SIGPIPE (128 + 13), without a word.
const CLOSED_PIPE_EXIT: u8 = 141;

/// Whether `e` is a write to a pipe nobody reads any more.
fn is_closed_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}

mod commands;
mod render;
pub mod scaffold;
mod serve;

pub use serve::ServeArgs;

use crate::config::Secret;
use clap::{Parser, Subcommand};
use conflux_client::ClientOptions;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(name = "conflux", version, about = "Conflux: durable WebAssembly entities")]
pub struct Cli {
    /// Address of the node to talk to (client commands).
    #[arg(long, global = true, env = "CONFLUX_ADDR", default_value = "http://127.0.0.1:7070")]
    addr: String,
    /// Bearer token sent with every call (client commands).
    #[arg(long, global = true, env = "CONFLUX_TOKEN", hide_env_values = true, value_name = "TOKEN")]
    token: Option<Secret>,
    /// PEM CA certificate to trust for an `https://` address, e.g. a node's
    /// self-signed certificate (client commands) [default: the webpki roots].
    #[arg(long, global = true, env = "CONFLUX_CA_CERT", value_name = "PEM")]
    ca_cert: Option<PathBuf>,
    /// Print machine-readable JSON instead of text (errors stay on stderr).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
#[expect(clippy::large_enum_variant, reason = "parsed once per process; boxing `serve`'s flags buys nothing")]
enum Command {
    /// Run a node.
    Serve {
        #[command(flatten)]
        args: ServeArgs,
    },
    /// Upload a component (.wasm) as the new version of an entity type.
    Deploy {
        entity_type: String,
        file: PathBuf,
        /// Only validate, compile and run the migration against existing entities;
        /// commit nothing and report how many migrated and failed.
        #[arg(long)]
        dry_run: bool,
        /// How many existing entities a dry run tries (at most 10000).
        #[arg(long, value_name = "N", default_value_t = 100, requires = "dry_run")]
        sample: u32,
        /// Activate the new version only for these entity ids until `conflux promote`.
        #[arg(long, value_name = "ID[,ID…]", value_delimiter = ',', conflicts_with = "dry_run")]
        canary: Vec<String>,
    },
    /// List the versions of an entity type: digest, size, deploy time, which is active.
    Versions { entity_type: String },
    /// Make an earlier version active for every entity again (ends any canary).
    Rollback { entity_type: String, version: u32 },
    /// Make a version (e.g. a canary) active for every entity (ends any canary).
    Promote { entity_type: String, version: u32 },
    /// Call an operation: `conflux invoke counter/c1 add 5`.
    Invoke {
        /// TYPE/ID of the entity.
        entity: String,
        operation: String,
        /// JSON payload [default: null].
        payload: Option<String>,
        /// Retrying with the same key returns the first successful reply instead
        /// of running the operation again (for 24 h by default).
        #[arg(long, value_name = "KEY")]
        idempotency_key: Option<String>,
    },
    /// List entity types and their versions.
    Types,
    /// Show node status.
    Status,
    /// Move every replica off a cluster member, then report it safe to stop.
    Drain {
        /// The member's node id.
        node_id: u64,
        /// Return once the drain is recorded instead of waiting for it.
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting after this many seconds.
        #[arg(long, value_name = "SECS", default_value_t = 600)]
        timeout_secs: u64,
    },
    /// Show the committed state keys of one entity (TYPE/ID).
    State { entity: String },
    /// List messages that could not be delivered, oldest first, with the reason.
    DeadLetters {
        /// Show at most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// List the ids of the entities of a type that have state (without activating them).
    Entities {
        entity_type: String,
        /// Only ids starting with this.
        #[arg(long, default_value = "")]
        prefix: String,
        /// Show at most this many.
        #[arg(long, default_value_t = 1000)]
        limit: u32,
        /// Start after this id (the last id of a previous listing).
        #[arg(long, value_name = "ID")]
        start_after: Option<String>,
    },
    /// Show what entities printed: `conflux logs counter` or `conflux logs counter/c1 --follow`.
    Logs {
        /// TYPE or TYPE/ID [default: every entity].
        entity: Option<String>,
        /// Keep streaming new lines until interrupted.
        #[arg(long, short = 'f')]
        follow: bool,
        /// How many recent lines to show first.
        #[arg(long, default_value_t = 100)]
        tail: u32,
    },
    /// Create a new entity project: `conflux new my-entity [--lang rust|ts|python]`.
    New {
        /// Project name (letters, digits, `-`, `_`); the entity type is its snake_case form.
        name: String,
        /// The language to write the entity in.
        #[arg(long, value_enum, default_value_t = scaffold::Lang::Rust)]
        lang: scaffold::Lang,
        /// Directory to create [default: ./NAME].
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The SDK to build against: the conflux-sdk crate, guest-sdk/typescript or
        /// guest-sdk/python [default: the SDK for --lang this conflux was built with].
        #[arg(long, env = "CONFLUX_SDK_PATH", value_name = "DIR")]
        sdk_path: Option<PathBuf>,
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            note!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_closed_pipe(&e) => ExitCode::from(CLOSED_PIPE_EXIT),
        Err(e) => {
            note!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, skipping a cause whose text an outer
/// message already includes (many errors embed their source in their message).
fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out.replace('\n', " ")
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { args } => serve::serve(args, cli.json).await,
        Command::New { name, lang, dir, sdk_path } => scaffold::new_crate(&name, lang, dir, sdk_path, cli.json),
        command => {
            let opts = ClientOptions { token: cli.token, ca_cert: cli.ca_cert };
            let out = render::Output { json: cli.json };
            commands::client_command(&cli.addr, &opts, command, out).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn tokens_are_redacted_in_parsed_flags() {
        let cli = Cli::try_parse_from(["conflux", "--token", "tok-client-xyz", "status"]).unwrap();
        assert_eq!(cli.token.as_ref().unwrap().expose(), "tok-client-xyz");
        let serve = Cli::try_parse_from(["conflux", "serve", "--admin-token", "tok-admin-xyz"]).unwrap();
        let dbg = format!("{cli:?} {serve:?}");
        assert!(!dbg.contains("tok-"), "{dbg}");
    }

    #[test]
    fn error_chains_print_once_on_one_line() {
        let io = std::io::Error::other("disk on fire");
        let e = anyhow::Error::new(crate::log::LogError::from(io)).context("opening\nthe log");
        assert_eq!(one_line(&e), "opening the log: commit log I/O failed: disk on fire");
    }

    #[test]
    fn new_takes_a_language() {
        use scaffold::Lang;
        let lang = |args: &[&str]| match Cli::try_parse_from([&["conflux", "new", "shop"], args].concat()) {
            Ok(Cli { command: Command::New { lang, .. }, .. }) => Ok(lang),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e.to_string()),
        };
        assert_eq!(lang(&[]), Ok(Lang::Rust));
        assert_eq!(lang(&["--lang", "rust"]), Ok(Lang::Rust));
        assert_eq!(lang(&["--lang", "ts"]), Ok(Lang::TypeScript));
        assert_eq!(lang(&["--lang", "typescript"]), Ok(Lang::TypeScript));
        assert_eq!(lang(&["--lang", "python"]), Ok(Lang::Python));
        assert_eq!(lang(&["--lang=py"]), Ok(Lang::Python));
        let e = lang(&["--lang", "go"]).unwrap_err();
        assert!(e.contains("invalid value 'go'") && e.contains("[possible values: rust, ts, python]"), "{e}");
    }

    #[test]
    fn deploy_flags_are_checked_locally() {
        assert!(
            Cli::try_parse_from(["conflux", "deploy", "t", "f.wasm", "--sample", "5"]).is_err(),
            "--sample needs --dry-run"
        );
        assert!(Cli::try_parse_from(["conflux", "deploy", "t", "f.wasm", "--dry-run", "--canary", "a"]).is_err());
        let cli = Cli::try_parse_from(["conflux", "deploy", "t", "f.wasm", "--canary", "a,b"]).unwrap();
        assert!(matches!(cli.command, Command::Deploy { canary, .. } if canary == ["a", "b"]));
    }
}
