//! The `conflux` command line: `serve` runs a node, `new` scaffolds an entity
//! crate; every other command is a gRPC client of a node (`--addr` /
//! `CONFLUX_ADDR`). Output for humans on stdout (or, with `--json`, JSON:
//! one document per command, one object per line for streams), one-line
//! reasons on stderr, non-zero exit on failure. Client commands send
//! `--token` as a bearer token and speak TLS to `https://` addresses.

pub mod scaffold;

use crate::api::ERROR_KIND_HEADER;
use crate::api::pb::{self, conflux_client::ConfluxClient};
use crate::config::{Config, Secret};
use crate::model::EntityRef;
use crate::node::Node;
use anyhow::Context;
use clap::{Parser, Subcommand};
use futures::StreamExt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

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
        /// TOML configuration file (see README.md); flags override it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Directory for state, log and components [default: ./conflux-data].
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Address to listen on [default: 127.0.0.1:7070].
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Override any configuration field: `--set runtime.turn_timeout_ms=250`
        /// (repeatable; see README.md for the fields).
        #[arg(long = "set", value_name = "SECTION.FIELD=VALUE")]
        overrides: Vec<String>,
        /// Require this bearer token for Deploy, Rollback, Promote, GetState and Status (`api.admin_token`).
        #[arg(long, env = "CONFLUX_ADMIN_TOKEN", hide_env_values = true, value_name = "TOKEN")]
        admin_token: Option<Secret>,
        /// Require this bearer token (or the admin token) for Invoke and
        /// ListTypes (`api.invoke_token`).
        #[arg(long, env = "CONFLUX_INVOKE_TOKEN", hide_env_values = true, value_name = "TOKEN")]
        invoke_token: Option<Secret>,
        /// Serve TLS with this PEM certificate chain (`api.tls_cert_path`; needs --tls-key).
        #[arg(long, value_name = "PEM")]
        tls_cert: Option<PathBuf>,
        /// PEM private key for --tls-cert (`api.tls_key_path`).
        #[arg(long, value_name = "PEM")]
        tls_key: Option<PathBuf>,
        /// This node's id in its cluster (`cluster.node_id`; needs --peer or --join).
        #[arg(long, value_name = "ID")]
        node_id: Option<u64>,
        /// Join the existing cluster that the member at HOST:PORT belongs to
        /// (`cluster.join`; first start only, later starts find it joined).
        #[arg(long, value_name = "HOST:PORT", conflicts_with = "peers")]
        join: Option<String>,
        /// A member of the cluster, this node included, as ID=HOST:PORT
        /// (repeatable or comma-separated; `cluster.nodes`).
        #[arg(long = "peer", value_name = "ID=HOST:PORT", value_delimiter = ',')]
        peers: Vec<String>,
        /// The secret all members of the cluster share (`cluster.secret`).
        #[arg(long, env = "CONFLUX_CLUSTER_SECRET", hide_env_values = true, value_name = "SECRET")]
        cluster_secret: Option<Secret>,
        /// Mutual TLS between members: the PEM CA certificate that signs every
        /// member's --tls-cert (`cluster.tls_ca_path`; needs --tls-cert).
        #[arg(long, value_name = "PEM")]
        cluster_ca: Option<PathBuf>,
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
    /// Create a new entity crate: `conflux new my-entity`.
    New {
        /// Crate name (letters, digits, `-`, `_`); the entity type is its snake_case form.
        name: String,
        /// Directory to create [default: ./NAME].
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The conflux-sdk crate to build against [default: the SDK this conflux was built with].
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
        Command::Serve {
            config,
            data_dir,
            listen,
            overrides,
            admin_token,
            invoke_token,
            tls_cert,
            tls_key,
            node_id,
            join,
            peers,
            cluster_secret,
            cluster_ca,
        } => {
            let flags = ServeFlags {
                data_dir,
                listen,
                admin_token,
                invoke_token,
                tls_cert,
                tls_key,
                node_id,
                join,
                peers,
                cluster_secret,
                cluster_ca,
            };
            serve(config, overrides, flags, cli.json).await
        }
        Command::New { name, dir, sdk_path } => new_crate(&name, dir, sdk_path, cli.json),
        command => {
            let opts = ClientOptions { token: cli.token, ca_cert: cli.ca_cert };
            let out = Output { json: cli.json };
            client_command(&cli.addr, &opts, command, out).await
        }
    }
}

/// `serve` flags that override configuration fields.
struct ServeFlags {
    data_dir: Option<PathBuf>,
    listen: Option<SocketAddr>,
    admin_token: Option<Secret>,
    invoke_token: Option<Secret>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    node_id: Option<u64>,
    join: Option<String>,
    peers: Vec<String>,
    cluster_secret: Option<Secret>,
    cluster_ca: Option<PathBuf>,
}

/// Parses `--peer ID=HOST:PORT`.
fn parse_peer(raw: &str) -> anyhow::Result<crate::config::ClusterMember> {
    let (id, addr) = raw.split_once('=').ok_or_else(|| anyhow::anyhow!("--peer {raw:?}: expected ID=HOST:PORT"))?;
    let id = id.trim().parse().map_err(|_| anyhow::anyhow!("--peer {raw:?}: the id must be a number"))?;
    Ok(crate::config::ClusterMember { id, addr: addr.trim().to_owned() })
}

async fn serve(config: Option<PathBuf>, overrides: Vec<String>, flags: ServeFlags, json: bool) -> anyhow::Result<()> {
    let mut cfg = match config {
        Some(path) => Config::from_file(&path)?,
        None => Config::default(),
    }
    .with_overrides(&overrides)?;
    let ServeFlags {
        data_dir,
        listen,
        admin_token,
        invoke_token,
        tls_cert,
        tls_key,
        node_id,
        join,
        peers,
        cluster_secret,
        cluster_ca,
    } = flags;
    cfg.cluster.join = join.or(cfg.cluster.join);
    if !peers.is_empty() {
        cfg.cluster.nodes = peers.iter().map(|p| parse_peer(p)).collect::<anyhow::Result<_>>()?;
    }
    if let Some(id) = node_id {
        cfg.cluster.node_id = id;
    }
    cfg.cluster.secret = cluster_secret.or(cfg.cluster.secret);
    cfg.cluster.tls_ca_path = cluster_ca.or(cfg.cluster.tls_ca_path);
    if let Some(d) = data_dir {
        cfg.storage.data_dir = d;
    }
    if let Some(l) = listen {
        cfg.api.listen = l;
    }
    cfg.api.admin_token = admin_token.or(cfg.api.admin_token);
    cfg.api.invoke_token = invoke_token.or(cfg.api.invoke_token);
    cfg.api.tls_cert_path = tls_cert.or(cfg.api.tls_cert_path);
    cfg.api.tls_key_path = tls_key.or(cfg.api.tls_key_path);
    cfg.validate()?;
    // Held until the node has stopped: dropping it flushes the spans not yet exported.
    let _tracing = crate::telemetry::init_tracing(&cfg.telemetry)?;
    let tls = cfg.api.tls_cert_path.is_some();
    let data_dir = cfg.storage.data_dir.clone();
    let shutdown = shutdown_signal();
    let node = Node::open(cfg).await?;
    node.serve(shutdown, |addr| {
        // Scripts and tests read this line to find the port; a daemon whose
        // stdout nobody reads goes on serving.
        use std::io::Write as _;
        let _ = if json {
            writeln!(std::io::stdout(), "{}", serde_json::json!({ "listening": addr.to_string() }))
        } else {
            writeln!(std::io::stdout(), "conflux listening on {addr}")
        };
        tracing::info!(%addr, data_dir = %data_dir.display(), tls, "conflux listening");
    })
    .await?;
    Ok(())
}

/// Installs the SIGTERM and SIGINT handlers now, before the node announces
/// that it listens (a signal arriving earlier would otherwise kill the process
/// without a drain), and returns a future that resolves on the first of them.
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let handlers = signal(SignalKind::terminate()).and_then(|t| Ok((t, signal(SignalKind::interrupt())?)));
        async move {
            match handlers {
                Ok((mut term, mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {},
                        _ = int.recv() => {},
                    }
                }
                Err(e) => {
                    tracing::warn!("cannot watch SIGTERM/SIGINT: {e}");
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// How a client reaches a node beyond its address.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// Sent as `authorization: Bearer <token>` with every call.
    pub token: Option<Secret>,
    /// PEM CA certificate trusted for `https://` addresses (instead of the webpki roots).
    pub ca_cert: Option<PathBuf>,
}

/// Adds the bearer token (if any) to every call.
#[derive(Clone)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "BearerToken(<redacted>)" } else { "BearerToken(None)" })
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

/// A client whose calls carry [`ClientOptions::token`].
pub type AuthClient = ConfluxClient<InterceptedService<Channel, BearerToken>>;

/// The endpoint for `addr` (`host:port` or a URL); TLS for `https://`.
fn endpoint(addr: &str, ca_cert: Option<&Path>) -> anyhow::Result<(String, Endpoint)> {
    let url = if addr.contains("://") { addr.to_owned() } else { format!("http://{addr}") };
    let mut ep = Endpoint::from_shared(url.clone()).with_context(|| format!("bad address {addr:?}"))?.tcp_nodelay(true);
    if url.starts_with("https://") {
        let tls = match ca_cert {
            Some(path) => {
                let pem =
                    std::fs::read(path).with_context(|| format!("cannot read CA certificate {}", path.display()))?;
                ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem))
            }
            None => ClientTlsConfig::new().with_webpki_roots(),
        };
        ep = ep.tls_config(tls).context("TLS client configuration")?;
    } else if ca_cert.is_some() {
        anyhow::bail!("--ca-cert needs an https:// address, not {url}");
    }
    Ok((url, ep))
}

/// Connects to a node without a token, in plaintext or (for `https://`) TLS with
/// the webpki roots; accepts `host:port` as well as a URL.
pub async fn connect(addr: &str) -> anyhow::Result<ConfluxClient<Channel>> {
    let (url, ep) = endpoint(addr, None)?;
    let channel = ep.connect().await.with_context(|| format!("cannot connect to {url}"))?;
    Ok(ConfluxClient::new(channel).max_decoding_message_size(64 << 20))
}

/// Connects to a node with a bearer token and/or a trusted CA certificate.
pub async fn connect_with(addr: &str, opts: &ClientOptions) -> anyhow::Result<AuthClient> {
    let token = match &opts.token {
        Some(t) => {
            let mut v: MetadataValue<Ascii> = format!("Bearer {}", t.expose())
                .parse()
                .map_err(|_| anyhow::anyhow!("--token must be printable ASCII"))?;
            v.set_sensitive(true);
            Some(v)
        }
        None => None,
    };
    let (url, ep) = endpoint(addr, opts.ca_cert.as_deref())?;
    let channel = ep.connect().await.with_context(|| format!("cannot connect to {url}"))?;
    Ok(ConfluxClient::with_interceptor(channel, BearerToken(token)).max_decoding_message_size(64 << 20))
}

/// Components at least this large get a progress bar while uploading.
const PROGRESS_MIN_BYTES: usize = 1 << 20;

/// Streams a component to Deploy. On a terminal, large uploads get a progress
/// bar, and the wait for the server (compiling; for a dry run, also migrating
/// the sample) a spinner saying what it is doing.
async fn upload(client: &mut AuthClient, header: pb::DeployHeader, bytes: &[u8]) -> anyhow::Result<pb::DeployResponse> {
    use std::io::IsTerminal;
    let waiting_for = if header.dry_run {
        format!("dry run: compiling and migrating up to {} sampled entities…", header.dry_run_sample)
    } else {
        "validating and compiling…".to_owned()
    };
    let messages = crate::api::deploy_messages(header, bytes);
    let bar = std::io::stderr().is_terminal().then(|| {
        if bytes.len() >= PROGRESS_MIN_BYTES {
            let bar = indicatif::ProgressBar::new(bytes.len() as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "uploading {bytes}/{total_bytes} [{bar:30}] {bytes_per_sec} {msg}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar
        } else {
            let spinner = indicatif::ProgressBar::new_spinner().with_message(waiting_for.clone());
            spinner.enable_steady_tick(std::time::Duration::from_millis(120));
            spinner
        }
    });
    let ticker = bar.clone().filter(|b| b.length().is_some());
    // A chunk counts as sent when tonic pulls the next one from the stream.
    let stream = futures::stream::iter(messages).inspect(move |m| {
        if let (Some(bar), Some(pb::deploy_request::Part::Chunk(c))) = (&ticker, &m.part) {
            bar.inc(c.len() as u64);
            if bar.position() == bar.length().unwrap_or(0) {
                // The server now validates and compiles before it answers.
                bar.set_message(format!("— {waiting_for}"));
            }
        }
    });
    let result = client.deploy(stream).await;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(result.map_err(rpc_error)?.into_inner())
}

fn print_deploy(r: &pb::DeployResponse) -> std::io::Result<()> {
    if let Some(d) = &r.dry_run {
        say!(
            "dry run of {} as version {} (sha256:{}): compiled and validated; nothing was committed",
            r.entity_type,
            r.version,
            r.digest
        );
        if !d.has_migration {
            say!("the component exports no migration: existing entities would run it unchanged");
        }
        say!(
            "sampled {} entities: {} migrated, {} failed, {} already on this version",
            d.sampled,
            d.migrated,
            d.failed,
            d.up_to_date
        );
        for f in &d.failures {
            say!("  {}/{} (from version {}): {}", r.entity_type, f.id, f.from_version, f.error);
        }
    } else if r.unchanged {
        say!("{} version {} unchanged (digest sha256:{})", r.entity_type, r.version, r.digest);
    } else if !r.canary_ids.is_empty() {
        say!(
            "deployed {} version {} (sha256:{}) as a canary for {}; version {} stays active for the rest \
             (`conflux promote {} {}` to finish)",
            r.entity_type,
            r.version,
            r.digest,
            r.canary_ids.join(","),
            r.previous_active_version,
            r.entity_type,
            r.version
        );
    } else if r.reused {
        say!(
            "{} version {} is active again (sha256:{}; identical bytes, so its number was reused; was {})",
            r.entity_type,
            r.version,
            r.digest,
            r.previous_active_version
        );
    } else {
        say!("deployed {} version {} (sha256:{})", r.entity_type, r.version, r.digest);
    }
    Ok(())
}

fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / (1 << 10) as f64),
        n => format!("{n} B"),
    }
}

/// `YYYY-MM-DD HH:MM:SS UTC` from Unix milliseconds (civil-from-days, proleptic Gregorian).
fn format_utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Turns a gRPC status into a one-line error: `CODE (kind): message`.
fn rpc_error(s: tonic::Status) -> anyhow::Error {
    let kind = s.metadata().get(ERROR_KIND_HEADER).and_then(|v| v.to_str().ok()).map(|k| format!(" ({k})"));
    anyhow::anyhow!("{:?}{}: {}", s.code(), kind.unwrap_or_default(), s.message())
}

/// How a client command prints its result.
#[derive(Debug, Clone, Copy, Default)]
struct Output {
    json: bool,
}

impl Output {
    /// Prints `value` as JSON if asked to, else runs `human`.
    fn print<T: serde::Serialize>(
        self,
        value: &T,
        human: impl FnOnce(&T) -> std::io::Result<()>,
    ) -> anyhow::Result<()> {
        if self.json {
            say!("{}", serde_json::to_string_pretty(value)?);
        } else {
            human(value)?;
        }
        Ok(())
    }
}

fn entity_name(e: &Option<pb::EntityRef>) -> String {
    e.as_ref().map(|e| format!("{}/{}", e.entity_type, e.id)).unwrap_or_default()
}

/// `conflux new`: writes the scaffold and says what to do next.
fn new_crate(name: &str, dir: Option<PathBuf>, sdk_path: Option<PathBuf>, json: bool) -> anyhow::Result<()> {
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
    let scaffold =
        scaffold::Scaffold { name: name.to_owned(), sdk_path, sdk_version: env!("CARGO_PKG_VERSION").to_owned() };
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

async fn client_command(addr: &str, opts: &ClientOptions, command: Command, out: Output) -> anyhow::Result<()> {
    // Validate local input before touching the network.
    match &command {
        Command::Invoke { entity, payload, .. } => {
            EntityRef::parse(entity)?;
            if let Some(p) = payload {
                serde_json::from_str::<serde_json::Value>(p).context("payload is not valid JSON")?;
            }
        }
        Command::State { entity } => {
            EntityRef::parse(entity)?;
        }
        Command::Logs { entity: Some(e), .. } if e.contains('/') => {
            EntityRef::parse(e)?;
        }
        _ => {}
    }
    let mut client = connect_with(addr, opts).await?;
    match command {
        Command::Serve { .. } | Command::New { .. } => unreachable!("handled by run"),
        Command::Deploy { entity_type, file, dry_run, sample, canary } => {
            let bytes = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let header = pb::DeployHeader {
                entity_type,
                dry_run,
                dry_run_sample: if dry_run { sample } else { 0 },
                canary_ids: canary,
                ..Default::default()
            };
            let r = upload(&mut client, header, &bytes).await?;
            out.print(&r, print_deploy)?;
        }
        Command::Versions { entity_type } => {
            let r = client.list_types(pb::ListTypesRequest {}).await.map_err(rpc_error)?.into_inner();
            let t = r.types.into_iter().find(|t| t.name == entity_type).ok_or_else(|| {
                anyhow::anyhow!("unknown entity type {entity_type:?}; deploy a component for it first")
            })?;
            out.print(&t, |t| {
                say!("VERSION\tACTIVE\tSIZE\tDEPLOYED\tDIGEST");
                for v in &t.versions {
                    let mark = match &t.canary {
                        _ if v.version == t.active_version => "active".to_owned(),
                        Some(c) if c.version == v.version => format!("canary({})", c.ids.join(",")),
                        _ => "-".to_owned(),
                    };
                    say!(
                        "{}\t{}\t{}\t{}\tsha256:{}",
                        v.version,
                        mark,
                        human_bytes(v.size_bytes),
                        format_utc(v.deployed_at_ms),
                        v.digest
                    );
                }
                Ok(())
            })?;
        }
        Command::DeadLetters { limit } => {
            let mut start_after = String::new();
            let mut all = pb::ListDeadLettersResponse::default();
            while (all.dead_letters.len() as u32) < limit {
                let shown = all.dead_letters.len() as u32;
                let req =
                    pb::ListDeadLettersRequest { start_after: start_after.clone(), limit: (limit - shown).min(1000) };
                let r = client.list_dead_letters(req).await.map_err(rpc_error)?.into_inner();
                all.dead_letters.extend(r.dead_letters);
                all.next_start_after = r.next_start_after.clone();
                if r.next_start_after.is_empty() {
                    break;
                }
                start_after = r.next_start_after;
            }
            out.print(&all, |all| {
                for d in &all.dead_letters {
                    say!(
                        "{}\t{} #{} -> {} {}\t{} attempt(s)\t{}\tpayload {}",
                        format_utc(d.at_ms),
                        entity_name(&d.sender),
                        d.seq,
                        entity_name(&d.target),
                        d.operation,
                        d.attempts,
                        d.reason,
                        String::from_utf8_lossy(&d.payload)
                    );
                }
                if all.dead_letters.is_empty() {
                    say!("no dead letters");
                }
                Ok(())
            })?;
        }
        Command::Rollback { entity_type, version } => {
            let r = client.rollback(pb::ActivateRequest { entity_type, version }).await.map_err(rpc_error)?;
            out.print(&r.into_inner(), print_activate)?;
        }
        Command::Promote { entity_type, version } => {
            let r = client.promote(pb::ActivateRequest { entity_type, version }).await.map_err(rpc_error)?;
            out.print(&r.into_inner(), print_activate)?;
        }
        Command::Invoke { entity, operation, payload, idempotency_key } => {
            let e = EntityRef::parse(&entity)?;
            let req = pb::InvokeRequest {
                entity: Some(pb::EntityRef { entity_type: e.entity_type, id: e.id }),
                operation,
                payload: payload.unwrap_or_else(|| "null".to_owned()).into_bytes(),
                idempotency_key: idempotency_key.unwrap_or_default(),
            };
            let r = client.invoke(req).await.map_err(rpc_error)?.into_inner();
            out.print(&r, |r| {
                say!("{}", String::from_utf8_lossy(&r.reply));
                Ok(())
            })?;
        }
        Command::Types => {
            let r = client.list_types(pb::ListTypesRequest {}).await.map_err(rpc_error)?.into_inner();
            out.print(&r, |r| {
                if r.types.is_empty() {
                    say!("no entity types deployed");
                }
                for t in &r.types {
                    let active = t.versions.iter().find(|v| v.version == t.active_version);
                    say!(
                        "{}\tversion {}\t{} versions\tsha256:{}",
                        t.name,
                        t.active_version,
                        t.versions.len(),
                        active.map(|v| v.digest.as_str()).unwrap_or("?")
                    );
                }
                Ok(())
            })?;
        }
        Command::Status => {
            let s = client.status(pb::StatusRequest {}).await.map_err(rpc_error)?.into_inner();
            out.print(&s, print_status)?;
        }
        Command::Drain { node_id, no_wait, timeout_secs } => {
            let node = node_id.to_string();
            let r = client.drain(pb::DrainRequest { node_id: node.clone() }).await.map_err(rpc_error)?.into_inner();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(timeout_secs);
            let mut left = r.replicas;
            while !no_wait && left > 0 {
                if std::time::Instant::now() >= deadline {
                    anyhow::bail!("node {node} still holds {left} replicas after {timeout_secs} s; the drain goes on");
                }
                if !out.json {
                    note!("node {node}: {left} replicas to move");
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                let s = client.status(pb::StatusRequest {}).await.map_err(rpc_error)?.into_inner();
                left = s.nodes.iter().find(|n| n.node_id == node).map_or(0, |n| n.replicas);
            }
            let done = pb::DrainResponse { replicas: left };
            out.print(&done, |d| {
                if d.replicas == 0 {
                    say!("node {node} holds no replicas: it is safe to stop");
                } else {
                    say!("node {node} is draining: {} replicas to move", d.replicas);
                }
                Ok(())
            })?;
        }
        Command::State { entity } => {
            let e = EntityRef::parse(&entity)?;
            let mut start_after = String::new();
            let mut all = pb::GetStateResponse::default();
            loop {
                let req = pb::GetStateRequest {
                    entity: Some(pb::EntityRef { entity_type: e.entity_type.clone(), id: e.id.clone() }),
                    start_after: start_after.clone(),
                    limit: 0,
                };
                let r = client.get_state(req).await.map_err(rpc_error)?.into_inner();
                all.entries.extend(r.entries);
                if r.next_start_after.is_empty() {
                    break;
                }
                start_after = r.next_start_after;
            }
            out.print(&all, |all| {
                for entry in &all.entries {
                    say!("{}\t{}", entry.key, String::from_utf8_lossy(&entry.value));
                }
                if all.entries.is_empty() {
                    say!("(no state)");
                }
                Ok(())
            })?;
        }
        Command::Entities { entity_type, prefix, limit, start_after } => {
            let mut all = pb::ListEntitiesResponse::default();
            let mut cursor = start_after.unwrap_or_default();
            while (all.ids.len() as u32) < limit {
                let req = pb::ListEntitiesRequest {
                    entity_type: entity_type.clone(),
                    prefix: prefix.clone(),
                    start_after: cursor.clone(),
                    limit: (limit - all.ids.len() as u32).min(10_000),
                };
                let r = client.list_entities(req).await.map_err(rpc_error)?.into_inner();
                all.ids.extend(r.ids);
                all.next_start_after = r.next_start_after.clone();
                if r.next_start_after.is_empty() {
                    break;
                }
                cursor = r.next_start_after;
            }
            out.print(&all, |all| {
                for id in &all.ids {
                    say!("{id}");
                }
                if !all.next_start_after.is_empty() {
                    note!("(more: --start-after {})", all.next_start_after);
                } else if all.ids.is_empty() {
                    note!("(no entities of type {entity_type} have state)");
                }
                Ok(())
            })?;
        }
        Command::Logs { entity, follow, tail } => {
            let (entity_type, id) = match &entity {
                None => (String::new(), String::new()),
                Some(e) => match e.split_once('/') {
                    Some((t, i)) => (t.to_owned(), i.to_owned()),
                    None => (e.clone(), String::new()),
                },
            };
            let req = pb::StreamLogsRequest { entity_type, id, follow, tail };
            let mut lines = client.stream_logs(req).await.map_err(rpc_error)?.into_inner();
            while let Some(line) = lines.next().await {
                let l = line.map_err(rpc_error)?;
                if out.json {
                    say!("{}", serde_json::to_string(&l)?);
                } else {
                    if l.dropped > 0 {
                        say!("… {} line(s) dropped: this follower fell behind", l.dropped);
                    }
                    say!(
                        "{} {} [{}] {}: {}",
                        format_utc(l.at_ms),
                        entity_name(&l.entity),
                        l.invocation_id,
                        l.stream,
                        l.line
                    );
                }
            }
        }
    }
    Ok(())
}

fn print_status(s: &pb::StatusResponse) -> std::io::Result<()> {
    say!("conflux {}", s.version);
    say!("node             {}", s.node_id);
    say!("uptime           {:.1}s", s.uptime_ms as f64 / 1000.0);
    say!("data dir         {}", s.data_dir);
    say!("entity types     {}", s.entity_types);
    say!("active entities  {}", s.active_entities);
    say!("resident         {}", s.resident_instances);
    say!("in flight        {}", s.inflight_invocations);
    say!("turns ok/failed  {}/{}", s.turns_ok, s.turns_failed);
    say!(
        "outbox           {} waiting, {} delivered, {} dead letters",
        s.outbox_messages,
        s.messages_delivered,
        s.dead_letters
    );
    say!("log applied      {} (durable {}, {} syncs)", s.applied_index, s.durable_index, s.log_sync_batches);
    say!("NODE\tADDRESS\tSTATE\tLEADS\tREPLICAS");
    for n in &s.nodes {
        say!("{}\t{}\t{}\t{}\t{}", n.node_id, n.address, n.state, n.shards_led, n.replicas);
    }
    say!("SHARD\tLEADER\tREPLICAS\tLAG");
    for sh in &s.shards {
        say!("{}\t{}\t{}\t{}", sh.shard_id, sh.leader, sh.replicas.join(","), sh.replication_lag);
    }
    if !s.moves.is_empty() {
        say!("MOVES IN PROGRESS");
        for m in &s.moves {
            say!("{m}");
        }
    }
    Ok(())
}

fn print_activate(r: &pb::ActivateResponse) -> std::io::Result<()> {
    if r.unchanged {
        say!("{} version {} is already active", r.entity_type, r.active_version);
    } else {
        say!("{} version {} is active (was {})", r.entity_type, r.active_version, r.previous_active_version);
    }
    if let Some(c) = &r.ended_canary {
        say!("ended canary of version {} for {}", c.version, c.ids.join(","));
    }
    Ok(())
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
    fn bad_local_input_fails_before_connecting() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        // Port 9 (discard) is never a conflux node: these must fail on input first.
        let bad_json = Command::Invoke {
            entity: "counter/a".into(),
            operation: "add".into(),
            payload: Some("{".into()),
            idempotency_key: None,
        };
        let e = rt
            .block_on(client_command("127.0.0.1:9", &ClientOptions::default(), bad_json, Output::default()))
            .unwrap_err();
        assert!(format!("{e:#}").contains("not valid JSON"), "{e:#}");
        let bad_ref = Command::State { entity: "noslash".into() };
        let e = rt
            .block_on(client_command("127.0.0.1:9", &ClientOptions::default(), bad_ref, Output::default()))
            .unwrap_err();
        assert!(format!("{e:#}").contains("TYPE/ID"), "{e:#}");
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
    fn dates_and_sizes_print_readably() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_utc(1_795_000_000_000), "2026-11-18 11:06:40 UTC");
        assert_eq!(format_utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
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

    #[test]
    fn ca_cert_needs_https() {
        let e = endpoint("127.0.0.1:9", Some(Path::new("ca.pem"))).unwrap_err();
        assert!(e.to_string().contains("https://"), "{e}");
        endpoint("https://127.0.0.1:9", None).unwrap();
    }
}
