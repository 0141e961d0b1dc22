//! `conflux serve`: its flags ([`ServeArgs`], one clap struct), the
//! configuration they make (file, then `--set`, then flags), and the daemon's
//! start-up: tracing, the signal handlers, the node, the "listening" line.

use crate::config::{ClusterMember, Config, Secret};
use crate::node::Node;
use std::net::SocketAddr;
use std::path::PathBuf;

/// The flags of `conflux serve`. Each one overrides a configuration field
/// (named in its help) of the `--config` file, after `--set`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// TOML configuration file (see README.md); flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Directory for state, log and components [default: ./conflux-data].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:7070].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Override any configuration field: `--set runtime.turn_timeout_ms=250`
    /// (repeatable; see README.md for the fields).
    #[arg(long = "set", value_name = "SECTION.FIELD=VALUE")]
    pub overrides: Vec<String>,
    /// Require this bearer token for Deploy, Rollback, Promote, GetState and Status (`api.admin_token`).
    #[arg(long, env = "CONFLUX_ADMIN_TOKEN", hide_env_values = true, value_name = "TOKEN")]
    pub admin_token: Option<Secret>,
    /// Require this bearer token (or the admin token) for Invoke and
    /// ListTypes (`api.invoke_token`).
    #[arg(long, env = "CONFLUX_INVOKE_TOKEN", hide_env_values = true, value_name = "TOKEN")]
    pub invoke_token: Option<Secret>,
    /// Serve TLS with this PEM certificate chain (`api.tls_cert_path`; needs --tls-key).
    #[arg(long, value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert (`api.tls_key_path`).
    #[arg(long, value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// This node's id in its cluster (`cluster.node_id`; needs --peer or --join).
    #[arg(long, value_name = "ID")]
    pub node_id: Option<u64>,
    /// Join the existing cluster that the member at HOST:PORT belongs to
    /// (`cluster.join`; first start only, later starts find it joined).
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "peers")]
    pub join: Option<String>,
    /// A member of the cluster, this node included, as ID=HOST:PORT
    /// (repeatable or comma-separated; `cluster.nodes`).
    #[arg(long = "peer", value_name = "ID=HOST:PORT", value_delimiter = ',')]
    pub peers: Vec<String>,
    /// The secret all members of the cluster share (`cluster.secret`).
    #[arg(long, env = "CONFLUX_CLUSTER_SECRET", hide_env_values = true, value_name = "SECRET")]
    pub cluster_secret: Option<Secret>,
    /// Mutual TLS between members: the PEM CA certificate that signs every
    /// member's --tls-cert (`cluster.tls_ca_path`; needs --tls-cert).
    #[arg(long, value_name = "PEM")]
    pub cluster_ca: Option<PathBuf>,
}

impl ServeArgs {
    /// The configuration these flags make: the `--config` file (or the
    /// defaults), then the `--set` overrides, then the flags; validated.
    pub fn into_config(self) -> anyhow::Result<Config> {
        let ServeArgs {
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
        } = self;
        let mut cfg = match config {
            Some(path) => Config::from_file(&path)?,
            None => Config::default(),
        }
        .with_overrides(&overrides)?;
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
        Ok(cfg)
    }
}

/// Parses `--peer ID=HOST:PORT`.
fn parse_peer(raw: &str) -> anyhow::Result<ClusterMember> {
    let (id, addr) = raw.split_once('=').ok_or_else(|| anyhow::anyhow!("--peer {raw:?}: expected ID=HOST:PORT"))?;
    let id = id.trim().parse().map_err(|_| anyhow::anyhow!("--peer {raw:?}: the id must be a number"))?;
    Ok(ClusterMember { id, addr: addr.trim().to_owned() })
}

/// Runs a node until SIGTERM or SIGINT; prints the address it listens on.
pub(super) async fn serve(args: ServeArgs, json: bool) -> anyhow::Result<()> {
    let cfg = args.into_config()?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// `conflux serve`'s flags alone, as the binary parses them.
    #[derive(Debug, Parser)]
    struct Serve {
        #[command(flatten)]
        args: ServeArgs,
    }

    fn config(flags: &[&str]) -> anyhow::Result<Config> {
        let argv = std::iter::once("serve").chain(flags.iter().copied());
        Serve::try_parse_from(argv)?.args.into_config()
    }

    #[test]
    fn flags_override_set_which_overrides_the_defaults() {
        let cfg = config(&[
            "--set",
            "runtime.turn_timeout_ms=250",
            "--set",
            "api.listen=127.0.0.1:1",
            "--listen",
            "127.0.0.1:7171",
            "--data-dir",
            "/tmp/d",
            "--admin-token",
            "admin-token-long-enough",
        ])
        .unwrap();
        assert_eq!(cfg.runtime.turn_timeout_ms, 250);
        assert_eq!(cfg.api.listen, "127.0.0.1:7171".parse().unwrap());
        assert_eq!(cfg.storage.data_dir, PathBuf::from("/tmp/d"));
        assert_eq!(cfg.api.admin_token.as_ref().map(Secret::expose), Some("admin-token-long-enough"));
        let defaults = config(&[]).unwrap();
        assert_eq!(defaults.api.listen, Config::default().api.listen);
    }

    #[test]
    fn peers_are_id_equals_address() {
        let cfg = config(&[
            "--node-id",
            "2",
            "--peer",
            "1=127.0.0.1:7001,2=127.0.0.1:7002",
            "--cluster-secret",
            "a-cluster-secret-of-32-characters",
        ])
        .unwrap();
        assert_eq!(cfg.cluster.node_id, 2);
        let nodes: Vec<(u64, &str)> = cfg.cluster.nodes.iter().map(|m| (m.id, m.addr.as_str())).collect();
        assert_eq!(nodes, [(1, "127.0.0.1:7001"), (2, "127.0.0.1:7002")]);
        let e = config(&["--peer", "x=127.0.0.1:1"]).unwrap_err();
        assert!(e.to_string().contains("the id must be a number"), "{e}");
        assert!(config(&["--join", "127.0.0.1:1", "--peer", "1=127.0.0.1:1"]).is_err(), "--join conflicts with --peer");
    }
}
