//! Conflux over its gRPC API: types `counter` (examples/counter) and `user`
//! (examples/team-joiner).

use crate::target::{CallError, Target, parse_teams, parse_total};
use conflux_client::pb::{self, conflux_client::ConfluxClient};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tonic::transport::Channel;

/// Callers share a few HTTP/2 connections, round-robin.
#[derive(Clone)]
pub struct ConfluxTarget {
    clients: Arc<Vec<ConfluxClient<Channel>>>,
    next: Arc<AtomicUsize>,
}

impl ConfluxTarget {
    /// Opens `connections` gRPC connections to `addr`.
    pub async fn connect(addr: &str, connections: usize) -> anyhow::Result<Self> {
        let mut clients = Vec::new();
        for _ in 0..connections.max(1) {
            clients.push(conflux_client::connect(addr).await?);
        }
        Ok(Self { clients: Arc::new(clients), next: Arc::new(AtomicUsize::new(0)) })
    }

    fn client(&self) -> ConfluxClient<Channel> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        self.clients[i % self.clients.len()].clone()
    }

    /// Deploys `wasm` as `entity_type` through the streaming `Deploy` RPC.
    pub async fn deploy(&self, entity_type: &str, wasm: &Path) -> anyhow::Result<()> {
        let bytes = std::fs::read(wasm)?;
        let header = pb::DeployHeader { entity_type: entity_type.into(), ..Default::default() };
        let messages = conflux_client::deploy_messages(header, &bytes);
        self.client().deploy(futures::stream::iter(messages)).await?;
        Ok(())
    }

    /// Makes `version` of `entity_type` active again.
    pub async fn rollback(&self, entity_type: &str, version: u32) -> anyhow::Result<()> {
        let req = pb::ActivateRequest { entity_type: entity_type.into(), version };
        self.client().rollback(req).await?;
        Ok(())
    }

    /// One invocation; FAILED_PRECONDITION (the entity refused) is [`CallError::Refused`].
    pub async fn invoke(&self, ty: &str, id: &str, op: &str, payload: Vec<u8>) -> Result<Vec<u8>, CallError> {
        let req = pb::InvokeRequest {
            entity: Some(pb::EntityRef { entity_type: ty.into(), id: id.into() }),
            operation: op.into(),
            payload,
            ..Default::default()
        };
        match self.client().invoke(req).await {
            Ok(r) => Ok(r.into_inner().reply),
            Err(s) if s.code() == tonic::Code::FailedPrecondition => Err(CallError::Refused),
            Err(s) => Err(CallError::Failed(format!("{:?}: {}", s.code(), s.message()))),
        }
    }
}

impl Target for ConfluxTarget {
    async fn add(&self, key: &str, n: i64) -> Result<i64, CallError> {
        parse_total(&self.invoke("counter", key, "add", n.to_string().into_bytes()).await?)
    }

    async fn get(&self, key: &str) -> Result<i64, CallError> {
        parse_total(&self.invoke("counter", key, "get", Vec::new()).await?)
    }

    async fn join(&self, user: &str, team: &str) -> Result<(), CallError> {
        let payload = serde_json::to_vec(team).expect("a string serialises");
        self.invoke("user", user, "join", payload).await.map(drop)
    }

    async fn teams(&self, user: &str) -> Result<Vec<String>, CallError> {
        parse_teams(&self.invoke("user", user, "team", Vec::new()).await?)
    }
}

/// Adds 1 to counter `id` under idempotency key `key`, retrying (with the
/// same key) while the cluster answers UNAVAILABLE and `stop` is not set, as
/// a client riding out leader changes would. False if the call failed for
/// good (printed).
pub async fn add_keyed(
    c: &mut ConfluxClient<Channel>,
    id: &str,
    key: String,
    stop: &std::sync::atomic::AtomicBool,
) -> bool {
    loop {
        let req = pb::InvokeRequest {
            entity: Some(pb::EntityRef { entity_type: "counter".into(), id: id.into() }),
            operation: "add".into(),
            payload: b"1".to_vec(),
            idempotency_key: key.clone(),
        };
        match c.invoke(req).await {
            Ok(_) => return true,
            Err(e) if e.code() == tonic::Code::Unavailable && !stop.load(Ordering::Relaxed) => {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            Err(e) => {
                eprintln!("add {id}: {e:?}");
                return false;
            }
        }
    }
}
