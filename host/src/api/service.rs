//! The `Conflux` service's handlers: each checks the caller's token, maps
//! its protobuf request to a scheduler, registry or cluster call, and the
//! answer (or the error, through `super`'s status mapping) back.

use super::auth::Rpc;
use super::pb::conflux_server::Conflux;
use super::{Api, authorize, invoke_status, pb, registry_status, status, storage_status};
use crate::cluster::view::DrainError;
use crate::model::{EntityRef, Keyspace, entity_prefix};
use crate::registry::RegistryError;
use crate::runtime::GuestLogLine;
use crate::scheduler::{ErrorKind, Invocation};
use futures::StreamExt;
use std::pin::Pin;
use std::sync::Arc;
use tonic::{Request, Response, Status, Streaming};

/// Entities a dry run samples when the request does not say.
const DRY_RUN_SAMPLE_DEFAULT: usize = 100;

/// Default and maximum page size of GetState.
const STATE_PAGE_DEFAULT: u32 = 1000;
const STATE_PAGE_MAX: u32 = 10_000;

/// Default and maximum page size of ListEntities.
const ENTITY_PAGE_DEFAULT: u32 = 100;
const ENTITY_PAGE_MAX: u32 = 10_000;

/// Default and maximum number of recent lines StreamLogs sends first.
const LOG_TAIL_DEFAULT: u32 = 100;
const LOG_TAIL_MAX: u32 = 10_000;

/// A requested page size: 0 asks for `default`; more than `max` gets `max`.
fn page_size(requested: u32, default: u32, max: u32) -> usize {
    let n = if requested == 0 { default } else { requested.min(max) };
    n as usize
}

fn entity_ref(r: Option<pb::EntityRef>) -> Result<EntityRef, Status> {
    let r = r.ok_or_else(|| status(ErrorKind::BadEntity, "field `entity` is required"))?;
    EntityRef::new(r.entity_type, r.id).map_err(|e| status(ErrorKind::BadEntity, format!("field `entity`: {e}")))
}

/// One guest line on the wire.
fn log_line(l: &GuestLogLine, dropped: u64) -> pb::LogLine {
    let (entity_type, id) = l.entity.split_once('/').unwrap_or((&l.entity, ""));
    pb::LogLine {
        at_ms: l.at_ms,
        entity: Some(pb::EntityRef { entity_type: entity_type.to_owned(), id: id.to_owned() }),
        invocation_id: l.invocation_id.to_string(),
        stream: l.stream.to_owned(),
        line: l.line.clone(),
        dropped,
    }
}

fn canary_info(c: crate::registry::CanaryRecord) -> pb::CanaryInfo {
    pb::CanaryInfo { version: c.version, ids: c.ids }
}

impl Api {
    /// Rollback and promote: the same registry change, named differently for the user.
    async fn activate(&self, req: pb::ActivateRequest) -> Result<Response<pb::ActivateResponse>, Status> {
        if req.version == 0 {
            return Err(status(ErrorKind::BadVersion, "field `version` is required (versions start at 1)"));
        }
        let o = self.registry.activate(&req.entity_type, req.version).await.map_err(registry_status)?;
        Ok(Response::new(pb::ActivateResponse {
            entity_type: req.entity_type,
            active_version: o.active,
            previous_active_version: o.previous_active,
            unchanged: o.unchanged,
            ended_canary: o.ended_canary.map(canary_info),
        }))
    }
}

#[tonic::async_trait]
impl Conflux for Api {
    type StreamLogsStream = Pin<Box<dyn futures::Stream<Item = Result<pb::LogLine, Status>> + Send>>;

    async fn list_entities(
        &self,
        request: Request<pb::ListEntitiesRequest>,
    ) -> Result<Response<pb::ListEntitiesResponse>, Status> {
        authorize(&self.auth, Rpc::ListEntities, &request)?;
        let req = request.into_inner();
        self.registry.active(&req.entity_type).map_err(registry_status)?;
        let limit = page_size(req.limit, ENTITY_PAGE_DEFAULT, ENTITY_PAGE_MAX);
        let store = self.store.clone();
        let start_after = (!req.start_after.is_empty()).then_some(req.start_after);
        let mut ids = crate::determinism::blocking(move || {
            crate::storage::entity_ids(store.as_ref(), &req.entity_type, &req.prefix, start_after.as_deref(), limit + 1)
        })
        .await
        .map_err(|e| status(ErrorKind::Internal, e.to_string()))?
        .map_err(storage_status)?;
        let next_start_after = if ids.len() > limit {
            ids.truncate(limit);
            ids.last().cloned().unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListEntitiesResponse { ids, next_start_after }))
    }

    async fn stream_logs(
        &self,
        request: Request<pb::StreamLogsRequest>,
    ) -> Result<Response<Self::StreamLogsStream>, Status> {
        authorize(&self.auth, Rpc::StreamLogs, &request)?;
        let req = request.into_inner();
        if !req.id.is_empty() && req.entity_type.is_empty() {
            return Err(status(ErrorKind::BadEntity, "field `id` needs field `entity_type`"));
        }
        let wanted: Arc<str> = match (req.entity_type.is_empty(), req.id.is_empty()) {
            (true, _) => "".into(),
            (false, true) => format!("{}/", req.entity_type).into(),
            (false, false) => format!("{}/{}", req.entity_type, req.id).into(),
        };
        let whole_entity = !req.id.is_empty();
        let keep = move |l: &GuestLogLine| {
            if whole_entity { *l.entity == *wanted } else { l.entity.starts_with(&*wanted) }
        };
        let tail = page_size(req.tail, LOG_TAIL_DEFAULT, LOG_TAIL_MAX);
        let (recent, live) = self.guest_logs.tail_and_follow(tail, &keep);
        let head = futures::stream::iter(recent.into_iter().map(|l| Ok(log_line(&l, 0))).collect::<Vec<_>>());
        if !req.follow {
            return Ok(Response::new(Box::pin(head)));
        }
        let stopping = self.stopping.subscribe();
        let follow = futures::stream::unfold((live, stopping, 0u64), move |(mut live, mut stopping, mut dropped)| {
            let keep = keep.clone();
            async move {
                loop {
                    use tokio::sync::broadcast::error::RecvError;
                    let next = tokio::select! {
                        next = live.recv() => next,
                        _ = stopping.wait_for(|s| *s) => return None,
                    };
                    match next {
                        Ok(l) if keep(&l) => return Some((Ok(log_line(&l, dropped)), (live, stopping, 0))),
                        Ok(_) => {}
                        Err(RecvError::Lagged(n)) => dropped += n,
                        Err(RecvError::Closed) => return None,
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(head.chain(follow))))
    }

    async fn deploy(
        &self,
        request: Request<Streaming<pb::DeployRequest>>,
    ) -> Result<Response<pb::DeployResponse>, Status> {
        authorize(&self.auth, Rpc::Deploy, &request)?;
        let mut stream = request.into_inner();
        let header = match stream.next().await {
            Some(Ok(pb::DeployRequest { part: Some(pb::deploy_request::Part::Header(h)) })) => h,
            Some(Err(e)) => return Err(e),
            _ => {
                return Err(status(
                    ErrorKind::BadUpload,
                    "the first Deploy message must be a header naming the entity type",
                ));
            }
        };
        let limit = self.max_component_bytes;
        if header.size_bytes as usize > limit {
            return Err(registry_status(RegistryError::TooLarge { size: header.size_bytes as usize, limit }));
        }
        let mut bytes = Vec::with_capacity(header.size_bytes as usize);
        while let Some(msg) = stream.next().await {
            match msg?.part {
                Some(pb::deploy_request::Part::Chunk(c)) => {
                    if bytes.len() + c.len() > limit {
                        return Err(registry_status(RegistryError::TooLarge { size: bytes.len() + c.len(), limit }));
                    }
                    bytes.extend_from_slice(&c);
                }
                _ => {
                    return Err(status(ErrorKind::BadUpload, "only the first Deploy message may be a header"));
                }
            }
        }
        if header.size_bytes != 0 && bytes.len() as u64 != header.size_bytes {
            return Err(status(
                ErrorKind::TruncatedUpload,
                format!("upload truncated: received {} of {} bytes", bytes.len(), header.size_bytes),
            ));
        }
        if header.dry_run {
            if !header.canary_ids.is_empty() {
                return Err(status(ErrorKind::BadUpload, "a dry run cannot also be a canary"));
            }
            let candidate =
                self.registry.compile_candidate(&header.entity_type, bytes).await.map_err(registry_status)?;
            let sample = match header.dry_run_sample {
                0 => DRY_RUN_SAMPLE_DEFAULT,
                n => n as usize,
            };
            let version = candidate.version;
            let r = self.scheduler.dry_run_migration(candidate.loaded, sample).await.map_err(invoke_status)?;
            let previous = self.registry.get(&header.entity_type).map(|t| t.active).unwrap_or(0);
            return Ok(Response::new(pb::DeployResponse {
                entity_type: header.entity_type,
                version,
                digest: candidate.digest,
                unchanged: false,
                reused: false,
                previous_active_version: previous,
                canary_ids: vec![],
                dry_run: Some(pb::DryRunReport {
                    sampled: r.sampled,
                    migrated: r.migrated,
                    failed: r.failed,
                    up_to_date: r.up_to_date,
                    failures: r
                        .failures
                        .into_iter()
                        .map(|(id, from_version, error)| pb::DryRunFailure { id, from_version, error })
                        .collect(),
                    has_migration: r.has_migration,
                }),
            }));
        }
        let canary = (!header.canary_ids.is_empty()).then_some(header.canary_ids);
        let outcome = self.registry.deploy(&header.entity_type, bytes, canary).await.map_err(registry_status)?;
        Ok(Response::new(pb::DeployResponse {
            entity_type: header.entity_type,
            version: outcome.version,
            digest: outcome.digest,
            unchanged: outcome.unchanged,
            reused: outcome.reused,
            previous_active_version: outcome.previous_active.unwrap_or(0),
            canary_ids: outcome.canary.unwrap_or_default(),
            dry_run: None,
        }))
    }

    async fn rollback(&self, request: Request<pb::ActivateRequest>) -> Result<Response<pb::ActivateResponse>, Status> {
        authorize(&self.auth, Rpc::Rollback, &request)?;
        self.activate(request.into_inner()).await
    }

    async fn promote(&self, request: Request<pb::ActivateRequest>) -> Result<Response<pb::ActivateResponse>, Status> {
        authorize(&self.auth, Rpc::Promote, &request)?;
        self.activate(request.into_inner()).await
    }

    async fn invoke(&self, request: Request<pb::InvokeRequest>) -> Result<Response<pb::InvokeResponse>, Status> {
        authorize(&self.auth, Rpc::Invoke, &request)?;
        let req = request.into_inner();
        let entity = entity_ref(req.entity)?;
        if req.payload.len() > self.cfg.max_payload_bytes {
            return Err(status(
                ErrorKind::PayloadTooLarge,
                format!("field `payload` is {} bytes; the limit is {}", req.payload.len(), self.cfg.max_payload_bytes),
            ));
        }
        let idempotency_key = (!req.idempotency_key.is_empty()).then_some(req.idempotency_key);
        let inv = Invocation {
            entity,
            operation: req.operation,
            payload: req.payload,
            caller: None,
            idempotency_key,
            message_seq: None,
            kind: crate::model::MessageKind::Send,
        };
        let reply = self.scheduler.invoke(inv).await.map_err(invoke_status)?;
        Ok(Response::new(pb::InvokeResponse { reply }))
    }

    async fn list_types(
        &self,
        request: Request<pb::ListTypesRequest>,
    ) -> Result<Response<pb::ListTypesResponse>, Status> {
        authorize(&self.auth, Rpc::ListTypes, &request)?;
        let types = self
            .registry
            .list()
            .into_iter()
            .map(|t| pb::TypeInfo {
                canary: t.canary.map(canary_info),
                name: t.name,
                active_version: t.active,
                versions: t
                    .versions
                    .into_iter()
                    .map(|v| pb::VersionInfo {
                        version: v.version,
                        digest: v.digest,
                        size_bytes: v.size_bytes,
                        deployed_at_ms: v.deployed_at_ms,
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(pb::ListTypesResponse { types }))
    }

    async fn status(&self, request: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        authorize(&self.auth, Rpc::Status, &request)?;
        let s = self.scheduler.stats();
        let l = self.log.stats();
        let me = self.node_id();
        let g = self.cluster_view.gather().await;
        let name = |n: u64| n.to_string();
        let nodes = g
            .nodes
            .into_iter()
            .map(|n| pb::NodeInfo {
                node_id: name(n.node),
                address: n.address,
                state: n.state.to_owned(),
                shards_led: n.shards_led,
                replicas: n.replicas,
            })
            .collect();
        let shards = g
            .shards
            .into_iter()
            .map(|s| pb::ShardInfo {
                shard_id: s.shard,
                replicas: s.replicas.into_iter().map(name).collect(),
                leader: s.leader.map(name).unwrap_or_default(),
                replication_lag: s.lag,
            })
            .collect();
        let moves = g.moves;
        Ok(Response::new(pb::StatusResponse {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            entity_types: self.registry.list().len() as u32,
            active_entities: s.active_entities as u64,
            resident_instances: s.resident_instances as u64,
            inflight_invocations: s.inflight_invocations as u64,
            turns_ok: s.turns_ok,
            turns_failed: s.turns_failed,
            applied_index: self.log.applied_index(),
            durable_index: self.log.last_durable_index(),
            log_sync_batches: l.sync_batches,
            data_dir: self.data_dir.clone(),
            outbox_messages: s.outbox_messages,
            messages_delivered: s.messages_delivered,
            dead_letters: s.dead_letters,
            nodes,
            shards,
            node_id: me,
            moves,
            guest_memory_bytes: s.guest_memory_bytes as u64,
            guest_memory_limit_bytes: s.guest_memory_limit_bytes as u64,
        }))
    }

    async fn drain(&self, request: Request<pb::DrainRequest>) -> Result<Response<pb::DrainResponse>, Status> {
        authorize(&self.auth, Rpc::Drain, &request)?;
        let raw = request.into_inner().node_id;
        let node: u64 =
            raw.parse().map_err(|_| status(ErrorKind::BadNode, format!("field `node_id` {raw:?} is not a node id")))?;
        let replicas = self.cluster_view.drain(node).await.map_err(|e| {
            let kind = match &e {
                DrainError::NoSuchNode { .. } => ErrorKind::NoSuchNode,
                DrainError::LastNode => ErrorKind::LastNode,
                DrainError::NotCommitted(_) => ErrorKind::NotCommitted,
            };
            status(kind, e.to_string())
        })?;
        Ok(Response::new(pb::DrainResponse { replicas }))
    }

    async fn list_dead_letters(
        &self,
        request: Request<pb::ListDeadLettersRequest>,
    ) -> Result<Response<pb::ListDeadLettersResponse>, Status> {
        authorize(&self.auth, Rpc::ListDeadLetters, &request)?;
        let req = request.into_inner();
        let limit = page_size(req.limit, 100, 1000);
        let start = if req.start_after.is_empty() {
            None
        } else {
            Some(
                hex::decode(&req.start_after)
                    .map_err(|_| status(ErrorKind::BadCursor, "field `start_after` is not a cursor from this RPC"))?,
            )
        };
        let scheduler = self.scheduler.clone();
        let max_bytes = self.cfg.max_page_bytes;
        let (rows, more) =
            crate::determinism::blocking(move || scheduler.dead_letters(start.as_deref(), limit, max_bytes))
                .await
                .map_err(|e| status(ErrorKind::Internal, e.to_string()))?
                .map_err(invoke_status)?;
        let next_start_after = match rows.last() {
            Some((key, _)) if more => hex::encode(key),
            _ => String::new(),
        };
        let wire = |r: &EntityRef| pb::EntityRef { entity_type: r.entity_type.clone(), id: r.id.clone() };
        let dead_letters = rows
            .into_iter()
            .map(|(_, d)| pb::DeadLetterInfo {
                sender: Some(wire(&d.message.sender)),
                seq: d.message.seq,
                target: Some(wire(&d.message.target)),
                operation: d.message.operation,
                payload: d.message.payload,
                reason: d.reason,
                attempts: d.attempts,
                at_ms: d.at_ms,
            })
            .collect();
        Ok(Response::new(pb::ListDeadLettersResponse { dead_letters, next_start_after }))
    }

    async fn get_state(&self, request: Request<pb::GetStateRequest>) -> Result<Response<pb::GetStateResponse>, Status> {
        authorize(&self.auth, Rpc::GetState, &request)?;
        let req = request.into_inner();
        let entity = entity_ref(req.entity)?;
        self.registry.active(&entity.entity_type).map_err(registry_status)?;
        let limit = page_size(req.limit, STATE_PAGE_DEFAULT, STATE_PAGE_MAX);
        let prefix = entity_prefix(&entity);
        let plen = prefix.len();
        let start = (!req.start_after.is_empty()).then(|| {
            let mut k = prefix.clone();
            k.extend_from_slice(req.start_after.as_bytes());
            k
        });
        let store = self.store.clone();
        let max_bytes = self.cfg.max_page_bytes;
        let page = crate::determinism::blocking(move || {
            store.scan_page(Keyspace::State, &prefix, start.as_deref(), limit, max_bytes)
        })
        .await
        .map_err(|e| status(ErrorKind::Internal, e.to_string()))?
        .map_err(storage_status)?;
        let entries: Vec<pb::StateEntry> = page
            .entries
            .into_iter()
            .map(|(k, v)| pb::StateEntry { key: String::from_utf8_lossy(&k[plen..]).into_owned(), value: v })
            .collect();
        let next_start_after =
            if page.more { entries.last().map(|e| e.key.clone()).unwrap_or_default() } else { String::new() };
        Ok(Response::new(pb::GetStateResponse { entries, next_start_after }))
    }
}
