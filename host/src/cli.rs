//! The `conflux` command line: `serve` runs a node; every other command is a
//! gRPC client of one (`--addr` / `CONFLUX_ADDR`). Output for humans on stdout,
//! one-line reasons on stderr, non-zero exit on failure. Client commands send
//! `--token` as a bearer token and speak TLS to `https://` addresses.

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
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
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
    /// Show the committed state keys of one entity (TYPE/ID).
    State { entity: String },
    /// List messages that could not be delivered, oldest first, with the reason.
    DeadLetters {
        /// Show at most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
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
        Command::Serve { config, data_dir, listen, overrides, admin_token, invoke_token, tls_cert, tls_key } => {
            let flags = ServeFlags { data_dir, listen, admin_token, invoke_token, tls_cert, tls_key };
            serve(config, overrides, flags).await
        }
        command => {
            let opts = ClientOptions { token: cli.token, ca_cert: cli.ca_cert };
            client_command(&cli.addr, &opts, command).await
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
}

async fn serve(config: Option<PathBuf>, overrides: Vec<String>, flags: ServeFlags) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut cfg = match config {
        Some(path) => Config::from_file(&path)?,
        None => Config::default(),
    }
    .with_overrides(&overrides)?;
    let ServeFlags { data_dir, listen, admin_token, invoke_token, tls_cert, tls_key } = flags;
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
    let tls = cfg.api.tls_cert_path.is_some();
    let data_dir = cfg.storage.data_dir.clone();
    let shutdown = shutdown_signal();
    let node = tokio::task::spawn_blocking(move || Node::open(cfg)).await??;
    node.serve(shutdown, |addr| {
        // Scripts and tests read this line to find the port.
        println!("conflux listening on {addr}");
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

/// Streams a component to Deploy, with a progress bar on a terminal for large ones.
async fn upload(client: &mut AuthClient, header: pb::DeployHeader, bytes: &[u8]) -> anyhow::Result<pb::DeployResponse> {
    use std::io::IsTerminal;
    let messages = crate::api::deploy_messages(header, bytes);
    let bar = if bytes.len() >= PROGRESS_MIN_BYTES && std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(bytes.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("uploading {bytes}/{total_bytes} [{bar:30}] {bytes_per_sec} {msg}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        Some(bar)
    } else {
        None
    };
    let ticker = bar.clone();
    // A chunk counts as sent when tonic pulls the next one from the stream.
    let stream = futures::stream::iter(messages).inspect(move |m| {
        if let (Some(bar), Some(pb::deploy_request::Part::Chunk(c))) = (&ticker, &m.part) {
            bar.inc(c.len() as u64);
            if bar.position() == bar.length().unwrap_or(0) {
                // The server now validates and compiles before it answers.
                bar.set_message("— validating and compiling…");
            }
        }
    });
    let result = client.deploy(stream).await;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(result.map_err(rpc_error)?.into_inner())
}

fn print_deploy(r: &pb::DeployResponse) {
    if let Some(d) = &r.dry_run {
        println!(
            "dry run of {} as version {} (sha256:{}): compiled and validated; nothing was committed",
            r.entity_type, r.version, r.digest
        );
        if !d.has_migration {
            println!("the component exports no migration: existing entities would run it unchanged");
        }
        println!(
            "sampled {} entities: {} migrated, {} failed, {} already on this version",
            d.sampled, d.migrated, d.failed, d.up_to_date
        );
        for f in &d.failures {
            println!("  {}/{} (from version {}): {}", r.entity_type, f.id, f.from_version, f.error);
        }
    } else if r.unchanged {
        println!("{} version {} unchanged (digest sha256:{})", r.entity_type, r.version, r.digest);
    } else if !r.canary_ids.is_empty() {
        println!(
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
        println!(
            "{} version {} is active again (sha256:{}; identical bytes, so its number was reused; was {})",
            r.entity_type, r.version, r.digest, r.previous_active_version
        );
    } else {
        println!("deployed {} version {} (sha256:{})", r.entity_type, r.version, r.digest);
    }
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

async fn client_command(addr: &str, opts: &ClientOptions, command: Command) -> anyhow::Result<()> {
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
        _ => {}
    }
    let mut client = connect_with(addr, opts).await?;
    match command {
        Command::Serve { .. } => unreachable!("handled by run"),
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
            print_deploy(&r);
        }
        Command::Versions { entity_type } => {
            let r = client.list_types(pb::ListTypesRequest {}).await.map_err(rpc_error)?.into_inner();
            let t = r.types.into_iter().find(|t| t.name == entity_type).ok_or_else(|| {
                anyhow::anyhow!("unknown entity type {entity_type:?}; deploy a component for it first")
            })?;
            println!("VERSION\tACTIVE\tSIZE\tDEPLOYED\tDIGEST");
            for v in &t.versions {
                let mark = match &t.canary {
                    _ if v.version == t.active_version => "active".to_owned(),
                    Some(c) if c.version == v.version => format!("canary({})", c.ids.join(",")),
                    _ => "-".to_owned(),
                };
                println!(
                    "{}\t{}\t{}\t{}\tsha256:{}",
                    v.version,
                    mark,
                    human_bytes(v.size_bytes),
                    format_utc(v.deployed_at_ms),
                    v.digest
                );
            }
        }
        Command::DeadLetters { limit } => {
            let mut start_after = String::new();
            let mut shown = 0u32;
            while shown < limit {
                let req =
                    pb::ListDeadLettersRequest { start_after: start_after.clone(), limit: (limit - shown).min(1000) };
                let r = client.list_dead_letters(req).await.map_err(rpc_error)?.into_inner();
                for d in &r.dead_letters {
                    shown += 1;
                    let name = |e: &Option<pb::EntityRef>| {
                        e.as_ref().map(|e| format!("{}/{}", e.entity_type, e.id)).unwrap_or_default()
                    };
                    println!(
                        "{}\t{} #{} -> {} {}\t{} attempt(s)\t{}\tpayload {}",
                        format_utc(d.at_ms),
                        name(&d.sender),
                        d.seq,
                        name(&d.target),
                        d.operation,
                        d.attempts,
                        d.reason,
                        String::from_utf8_lossy(&d.payload)
                    );
                }
                if r.next_start_after.is_empty() {
                    break;
                }
                start_after = r.next_start_after;
            }
            if shown == 0 {
                println!("no dead letters");
            }
        }
        Command::Rollback { entity_type, version } => {
            let r = client.rollback(pb::ActivateRequest { entity_type, version }).await.map_err(rpc_error)?;
            print_activate(&r.into_inner());
        }
        Command::Promote { entity_type, version } => {
            let r = client.promote(pb::ActivateRequest { entity_type, version }).await.map_err(rpc_error)?;
            print_activate(&r.into_inner());
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
            println!("{}", String::from_utf8_lossy(&r.reply));
        }
        Command::Types => {
            let r = client.list_types(pb::ListTypesRequest {}).await.map_err(rpc_error)?.into_inner();
            if r.types.is_empty() {
                println!("no entity types deployed");
            }
            for t in r.types {
                let active = t.versions.iter().find(|v| v.version == t.active_version);
                println!(
                    "{}\tversion {}\t{} versions\tsha256:{}",
                    t.name,
                    t.active_version,
                    t.versions.len(),
                    active.map(|v| v.digest.as_str()).unwrap_or("?")
                );
            }
        }
        Command::Status => {
            let s = client.status(pb::StatusRequest {}).await.map_err(rpc_error)?.into_inner();
            println!("conflux {}", s.version);
            println!("uptime           {:.1}s", s.uptime_ms as f64 / 1000.0);
            println!("data dir         {}", s.data_dir);
            println!("entity types     {}", s.entity_types);
            println!("active entities  {}", s.active_entities);
            println!("resident         {}", s.resident_instances);
            println!("in flight        {}", s.inflight_invocations);
            println!("turns ok/failed  {}/{}", s.turns_ok, s.turns_failed);
            println!(
                "outbox           {} waiting, {} delivered, {} dead letters",
                s.outbox_messages, s.messages_delivered, s.dead_letters
            );
            println!(
                "log applied      {} (durable {}, {} syncs)",
                s.applied_index, s.durable_index, s.log_sync_batches
            );
        }
        Command::State { entity } => {
            let e = EntityRef::parse(&entity)?;
            let mut start_after = String::new();
            let mut any = false;
            loop {
                let req = pb::GetStateRequest {
                    entity: Some(pb::EntityRef { entity_type: e.entity_type.clone(), id: e.id.clone() }),
                    start_after: start_after.clone(),
                    limit: 0,
                };
                let r = client.get_state(req).await.map_err(rpc_error)?.into_inner();
                for entry in &r.entries {
                    any = true;
                    println!("{}\t{}", entry.key, String::from_utf8_lossy(&entry.value));
                }
                if r.next_start_after.is_empty() {
                    break;
                }
                start_after = r.next_start_after;
            }
            if !any {
                println!("(no state)");
            }
        }
    }
    Ok(())
}

fn print_activate(r: &pb::ActivateResponse) {
    if r.unchanged {
        println!("{} version {} is already active", r.entity_type, r.active_version);
    } else {
        println!("{} version {} is active (was {})", r.entity_type, r.active_version, r.previous_active_version);
    }
    if let Some(c) = &r.ended_canary {
        println!("ended canary of version {} for {}", c.version, c.ids.join(","));
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
    fn bad_local_input_fails_before_connecting() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        // Port 9 (discard) is never a conflux node: these must fail on input first.
        let bad_json = Command::Invoke {
            entity: "counter/a".into(),
            operation: "add".into(),
            payload: Some("{".into()),
            idempotency_key: None,
        };
        let e = rt.block_on(client_command("127.0.0.1:9", &ClientOptions::default(), bad_json)).unwrap_err();
        assert!(format!("{e:#}").contains("not valid JSON"), "{e:#}");
        let bad_ref = Command::State { entity: "noslash".into() };
        let e = rt.block_on(client_command("127.0.0.1:9", &ClientOptions::default(), bad_ref)).unwrap_err();
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
