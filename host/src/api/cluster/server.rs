//! The receiving side: the tonic `Cluster` service, which admits a call
//! (cluster secret, client certificate), maps its protobuf to a call on
//! [`ClusterNode`] and the answer back. What a call does is the cluster
//! layer's.

use super::pb::cluster_server::{Cluster, ClusterServer};
use super::{
    ClusterSecret, MAX_MESSAGE_BYTES, MAX_RAFT_BATCH_MESSAGES, failure_of, invocation_from_pb, pb, refusal_status,
    report_to_pb,
};
use crate::cluster::raft::DispatchError;
use crate::cluster::service::ClusterNode;
use crate::log::LogError;
use crate::model::WriteSet;
use crate::scheduler::ErrorKind;
use tonic::{Code, Request, Response, Status};

/// The `Cluster` service of one node.
#[derive(Clone, Debug)]
pub struct ClusterService {
    secret: ClusterSecret,
    node: ClusterNode,
}

impl ClusterService {
    pub fn new(secret: ClusterSecret, node: ClusterNode) -> Self {
        Self { secret, node }
    }

    /// The tonic service, to add to a server's routes.
    pub fn into_server(self) -> ClusterServer<Self> {
        ClusterServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

/// How a Raft message this node could not take is refused.
fn dispatch_status(e: DispatchError) -> Status {
    match e {
        e @ DispatchError::NoSuchShard { .. } => Status::not_found(e.to_string()),
        e @ DispatchError::Decode(_) => Status::invalid_argument(e.to_string()),
        e @ DispatchError::Encode(_) => Status::internal(e.to_string()),
    }
}

fn empty<T>(outcome: Result<(), crate::cluster::wire::Refusal>, reply: T) -> Result<Response<T>, Status> {
    outcome.map_err(refusal_status)?;
    Ok(Response::new(reply))
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn raft(&self, req: Request<pb::RaftMessage>) -> Result<Response<pb::RaftMessageReply>, Status> {
        self.secret.admit(&req)?;
        let msg = req.into_inner();
        match self.node.raft(msg.shard, &msg.rpc).await {
            Ok(reply) => Ok(Response::new(pb::RaftMessageReply { reply })),
            Err(e) => Err(dispatch_status(e)),
        }
    }

    async fn raft_batch(&self, req: Request<pb::RaftBatchRequest>) -> Result<Response<pb::RaftBatchReply>, Status> {
        self.secret.admit(&req)?;
        let messages = req.into_inner().messages;
        if messages.len() > MAX_RAFT_BATCH_MESSAGES {
            return Err(Status::invalid_argument(format!(
                "{} raft messages in one batch; at most {MAX_RAFT_BATCH_MESSAGES}",
                messages.len()
            )));
        }
        // Concurrently: one group's append waiting for its sync must not
        // hold back another group's vote.
        let outcomes = futures::future::join_all(messages.iter().map(|m| self.node.raft(m.shard, &m.rpc))).await;
        let outcomes = outcomes
            .into_iter()
            .map(|o| pb::RaftOutcome {
                outcome: Some(match o {
                    Ok(reply) => pb::raft_outcome::Outcome::Reply(reply),
                    Err(e) => {
                        let status = dispatch_status(e);
                        pb::raft_outcome::Outcome::Refused(pb::RaftRefusal {
                            code: status.code() as i32,
                            message: status.message().to_owned(),
                        })
                    }
                }),
            })
            .collect();
        Ok(Response::new(pb::RaftBatchReply { outcomes }))
    }

    async fn invoke(&self, req: Request<pb::ForwardedInvocation>) -> Result<Response<pb::ForwardedReply>, Status> {
        self.secret.admit(&req)?;
        let inv = invocation_from_pb(req.into_inner())?;
        let outcome = match self.node.invoke(inv).await.map_err(refusal_status)? {
            Ok(reply) => pb::forwarded_reply::Outcome::Reply(reply),
            Err(e) => pb::forwarded_reply::Outcome::Failure(failure_of(e)),
        };
        Ok(Response::new(pb::ForwardedReply { outcome: Some(outcome) }))
    }

    async fn propose(&self, req: Request<pb::ProposeRequest>) -> Result<Response<pb::ProposeReply>, Status> {
        self.secret.admit(&req)?;
        let req = req.into_inner();
        let ws: WriteSet =
            postcard::from_bytes(&req.write_set).map_err(|e| Status::invalid_argument(format!("write set: {e}")))?;
        let failure = |kind: ErrorKind, code: Code, message: String, leader, index| {
            pb::propose_reply::Outcome::Failure(pb::Failure {
                kind: kind.as_str().into(),
                code: code as i32,
                message,
                leader,
                index,
            })
        };
        let outcome = match self.node.propose(req.shard, ws).await.map_err(refusal_status)? {
            Ok(index) => pb::propose_reply::Outcome::Index(index),
            Err(LogError::NotLeader { leader }) => failure(
                ErrorKind::NotLeader,
                Code::Unavailable,
                format!("node {} does not lead shard {}", self.node.node(), req.shard),
                leader,
                None,
            ),
            Err(LogError::Conflict { key, index }) => {
                failure(ErrorKind::Conflict, Code::Aborted, key, None, Some(index))
            }
            Err(e) => failure(ErrorKind::Commit, Code::Unavailable, e.to_string(), None, None),
        };
        Ok(Response::new(pb::ProposeReply { outcome: Some(outcome) }))
    }

    async fn shards(&self, req: Request<pb::ShardsRequest>) -> Result<Response<pb::ShardsReply>, Status> {
        self.secret.admit(&req)?;
        let shards = self.node.shards().into_iter().map(report_to_pb).collect();
        Ok(Response::new(pb::ShardsReply { shards }))
    }

    async fn join(&self, req: Request<pb::JoinRequest>) -> Result<Response<pb::JoinReply>, Status> {
        self.secret.admit(&req)?;
        let req = req.into_inner();
        let grant = self.node.join(req.node, req.addr).await.map_err(refusal_status)?;
        Ok(Response::new(pb::JoinReply {
            shard_count: grant.shard_count,
            replication_factor: grant.replication_factor as u32,
        }))
    }

    async fn add_replica(&self, req: Request<pb::ReplicaRequest>) -> Result<Response<pb::ReplicaReply>, Status> {
        self.secret.admit(&req)?;
        empty(self.node.add_replica(req.into_inner().shard).await, pb::ReplicaReply {})
    }

    async fn change_replicas(
        &self,
        req: Request<pb::ChangeReplicasRequest>,
    ) -> Result<Response<pb::ChangeReplicasReply>, Status> {
        self.secret.admit(&req)?;
        let r = req.into_inner();
        let membership_index = self.node.change_replicas(r.shard, r.add, r.remove).await.map_err(refusal_status)?;
        Ok(Response::new(pb::ChangeReplicasReply { membership_index }))
    }

    async fn drop_replica(&self, req: Request<pb::ReplicaRequest>) -> Result<Response<pb::ReplicaReply>, Status> {
        self.secret.admit(&req)?;
        let r = req.into_inner();
        empty(self.node.drop_replica(r.shard, r.removed_as_of).await, pb::ReplicaReply {})
    }

    async fn hand_off(&self, req: Request<pb::HandOffRequest>) -> Result<Response<pb::ReplicaReply>, Status> {
        self.secret.admit(&req)?;
        let r = req.into_inner();
        empty(self.node.hand_off(r.shard, r.to).await, pb::ReplicaReply {})
    }

    async fn campaign(&self, req: Request<pb::ReplicaRequest>) -> Result<Response<pb::ReplicaReply>, Status> {
        self.secret.admit(&req)?;
        empty(self.node.campaign(req.into_inner().shard).await, pb::ReplicaReply {})
    }

    async fn read_component(
        &self,
        req: Request<pb::ReadComponentRequest>,
    ) -> Result<Response<pb::ReadComponentReply>, Status> {
        self.secret.admit(&req)?;
        let r = req.into_inner();
        let chunk = self.node.read_component(r.digest, r.offset, r.max_bytes).await.map_err(refusal_status)?;
        Ok(Response::new(pb::ReadComponentReply { data: chunk.data, total_bytes: chunk.total_bytes }))
    }

    async fn loaded_type(&self, req: Request<pb::LoadedTypeRequest>) -> Result<Response<pb::LoadedTypeReply>, Status> {
        self.secret.admit(&req)?;
        let record_json = match self.node.loaded_type(&req.into_inner().type_name).map_err(refusal_status)? {
            Some(record) => serde_json::to_vec(&record).map_err(|e| Status::internal(e.to_string()))?,
            None => Vec::new(),
        };
        Ok(Response::new(pb::LoadedTypeReply { record_json }))
    }
}
