//! Raft messages to one peer, batched across shard groups: every group on
//! this node queues its messages for a peer in one [`RaftQueue`], and the
//! queue's task sends what has gathered as one `RaftBatch` call whenever one
//! of its [`CALLS_IN_FLIGHT`] calls is free. An idle queue sends a message
//! at once; a busy one sends the appends of many groups in one HTTP/2
//! request instead of one request each (the multi-Raft transport of TiKV).
//! Snapshot chunks do not queue: a slow install must not hold back another
//! group's heartbeats.

use super::client::PeerBook;
use super::pb;
use super::{MAX_RAFT_BATCH_MESSAGES, SECRET_HEADER, answered};
use crate::cluster::raft::{NodeId, ShardId, TransportError};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use tonic::metadata::AsciiMetadataValue;
use tonic::{Code, Request, Response, Status};

/// Batch calls to one peer at a time. While they are all out, messages
/// gather for the next: the wait for a free call is what batches them.
/// Two, so that one slow reply (a follower's sync) does not stop the flow.
const CALLS_IN_FLIGHT: usize = 2;

/// Payload bytes that make a batch full; a larger message goes alone.
const MAX_BATCH_BYTES: usize = 4 << 20;

/// Messages queued for one peer beyond which a sender is refused (the peer
/// is not keeping up; Raft backs off and retries).
const QUEUE_MESSAGES: usize = 4096;

/// An encoded Raft message waiting for its batch.
struct Queued {
    shard: ShardId,
    rpc: Vec<u8>,
    deadline: Instant,
    reply: Answer,
}

/// Where a queued message's encoded `RaftReply` (or why there is none) goes.
type Answer = oneshot::Sender<Result<Vec<u8>, TransportError>>;

/// The queue of Raft messages to one peer; clones share it. Its task ends
/// when the last clone is dropped and what was queued has been sent.
#[derive(Clone)]
pub(super) struct RaftQueue {
    node: NodeId,
    tx: mpsc::Sender<Queued>,
}

impl RaftQueue {
    /// Starts the queue's task on the current runtime.
    pub(super) fn start(node: NodeId, book: PeerBook, secret: AsciiMetadataValue) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE_MESSAGES);
        tokio::spawn(run(node, Sender { book, secret, unbatched: Arc::default() }, rx));
        Self { node, tx }
    }

    /// Queues `rpc` (an encoded `RaftRpc`) for `shard`'s replica on the
    /// peer; resolves to the encoded `RaftReply`, or an error, within `timeout`.
    pub(super) async fn send(
        &self,
        shard: ShardId,
        rpc: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, TransportError> {
        let node = self.node;
        let (reply, answer) = oneshot::channel();
        let queued = Queued { shard, rpc, deadline: Instant::now() + timeout, reply };
        self.tx.try_send(queued).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                TransportError::Unreachable { node, reason: format!("{QUEUE_MESSAGES} raft messages already queued") }
            }
            mpsc::error::TrySendError::Closed(_) => {
                TransportError::Unreachable { node, reason: "the peer's queue has stopped".into() }
            }
        })?;
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => {
                Err(TransportError::Network { node, reason: "the batch carrying the message was lost".into() })
            }
            Err(_) => Err(no_reply(node, timeout)),
        }
    }
}

/// What a batch needs to reach the peer.
#[derive(Clone)]
struct Sender {
    book: PeerBook,
    secret: AsciiMetadataValue,
    /// The peer answered `RaftBatch` with UNIMPLEMENTED (an older version):
    /// send it one message per call.
    unbatched: Arc<AtomicBool>,
}

async fn run(node: NodeId, sender: Sender, mut rx: mpsc::Receiver<Queued>) {
    let calls = Arc::new(Semaphore::new(CALLS_IN_FLIGHT));
    // A message taken from the queue that did not fit the last batch.
    let mut carried: Option<Queued> = None;
    loop {
        let Ok(call) = calls.clone().acquire_owned().await else { return };
        let first = match carried.take() {
            Some(q) => q,
            None => match rx.recv().await {
                Some(q) => q,
                None => return,
            },
        };
        let mut bytes = first.rpc.len();
        let mut batch = vec![first];
        while batch.len() < MAX_RAFT_BATCH_MESSAGES {
            let Ok(q) = rx.try_recv() else { break };
            if bytes + q.rpc.len() > MAX_BATCH_BYTES {
                carried = Some(q);
                break;
            }
            bytes += q.rpc.len();
            batch.push(q);
        }
        // Their senders gave up waiting: the messages are stale.
        batch.retain(|q| !q.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let sender = sender.clone();
        tokio::spawn(async move {
            sender.deliver(node, batch).await;
            drop(call);
        });
    }
}

impl Sender {
    /// Sends `batch` in one call and answers each message's sender.
    async fn deliver(&self, node: NodeId, batch: Vec<Queued>) {
        crate::telemetry::metrics().raft_messages_per_call.observe(batch.len() as f64);
        if self.unbatched.load(Ordering::Relaxed) {
            return self.deliver_one_by_one(node, batch).await;
        }
        let now = Instant::now();
        let timeout = batch.iter().map(|q| q.deadline.saturating_duration_since(now)).max().unwrap_or_default();
        let (messages, waiting): (Vec<_>, Vec<_>) =
            batch.into_iter().map(|q| (pb::RaftMessage { shard: q.shard, rpc: q.rpc }, (q.shard, q.reply))).unzip();
        let Some(mut client) = self.book.client(node) else {
            return answer_each(waiting, |_| Err(address_unknown(node)));
        };
        let req = request(pb::RaftBatchRequest { messages }, self.secret.clone(), timeout);
        let reply = raft_call(&self.book, node, timeout, client.raft_batch(req)).await;
        let reply = match reply {
            Err(_) => return answer_each(waiting, |_| Err(no_reply(node, timeout))),
            Ok(Err(s)) if s.code() == Code::Unimplemented => {
                tracing::info!(node, "the peer takes no raft batches (an older version): one message per call");
                self.unbatched.store(true, Ordering::Relaxed);
                // Raft sends these again; those go one by one.
                let e = TransportError::Network { node, reason: "the peer takes no raft batches".into() };
                return answer_each(waiting, |_| Err(e.clone()));
            }
            Ok(Err(s)) => return answer_each(waiting, |shard| Err(transport_error(node, shard, &s))),
            Ok(Ok(r)) => r.into_inner().outcomes,
        };
        if reply.len() != waiting.len() {
            let e = TransportError::Network {
                node,
                reason: format!("{} answers to a batch of {} raft messages", reply.len(), waiting.len()),
            };
            return answer_each(waiting, |_| Err(e.clone()));
        }
        for ((shard, tx), outcome) in waiting.into_iter().zip(reply) {
            let answer = match outcome.outcome {
                Some(pb::raft_outcome::Outcome::Reply(bytes)) => Ok(bytes),
                Some(pb::raft_outcome::Outcome::Refused(r)) => {
                    Err(transport_error(node, shard, &Status::new(Code::from(r.code), r.message)))
                }
                None => Err(TransportError::Network { node, reason: "an empty raft outcome".into() }),
            };
            let _ = tx.send(answer);
        }
    }

    /// Sends each message of `batch` in a call of its own, all at once.
    async fn deliver_one_by_one(&self, node: NodeId, batch: Vec<Queued>) {
        let calls = batch.into_iter().map(|q| async move {
            let timeout = q.deadline.saturating_duration_since(Instant::now());
            let answer = send_alone(&self.book, self.secret.clone(), node, q.shard, q.rpc, timeout).await;
            let _ = q.reply.send(answer);
        });
        futures::future::join_all(calls).await;
    }
}

/// Sends one encoded Raft message to `node` in a `Raft` call of its own.
pub(super) async fn send_alone(
    book: &PeerBook,
    secret: AsciiMetadataValue,
    node: NodeId,
    shard: ShardId,
    rpc: Vec<u8>,
    timeout: Duration,
) -> Result<Vec<u8>, TransportError> {
    let Some(mut client) = book.client(node) else { return Err(address_unknown(node)) };
    let req = request(pb::RaftMessage { shard, rpc }, secret, timeout);
    let reply = raft_call(book, node, timeout, client.raft(req)).await;
    match reply {
        Err(_) => Err(no_reply(node, timeout)),
        Ok(Err(s)) => Err(transport_error(node, shard, &s)),
        Ok(Ok(r)) => Ok(r.into_inner().reply),
    }
}

/// A Raft request carrying the cluster secret and `timeout`.
fn request<T>(msg: T, secret: AsciiMetadataValue, timeout: Duration) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut().insert(SECRET_HEADER, secret);
    req.set_timeout(timeout);
    req
}

/// Runs one call carrying Raft messages to `node` within `timeout`, counts
/// it, and notes whether the peer answered (towards redialling it).
async fn raft_call<R>(
    book: &PeerBook,
    node: NodeId,
    timeout: Duration,
    call: impl Future<Output = Result<Response<R>, Status>>,
) -> Result<Result<Response<R>, Status>, tokio::time::error::Elapsed> {
    book.count_raft_call();
    let reply = tokio::time::timeout(timeout, call).await;
    book.note_call(node, matches!(&reply, Ok(Ok(_))) || matches!(&reply, Ok(Err(s)) if answered(s)));
    reply
}

fn address_unknown(node: NodeId) -> TransportError {
    TransportError::Unreachable { node, reason: "address unknown".into() }
}

fn no_reply(node: NodeId, timeout: Duration) -> TransportError {
    TransportError::Network { node, reason: format!("no reply within {timeout:?}") }
}

/// Answers every waiting sender with what `answer` says for its shard.
fn answer_each(waiting: Vec<(ShardId, Answer)>, answer: impl Fn(ShardId) -> Result<Vec<u8>, TransportError>) {
    for (shard, tx) in waiting {
        let _ = tx.send(answer(shard));
    }
}

/// A refused Raft call as the sending replica sees it.
fn transport_error(node: NodeId, shard: ShardId, status: &Status) -> TransportError {
    match status.code() {
        Code::NotFound => TransportError::NoSuchShard { node, shard },
        // Refused or not connected: nothing was delivered.
        Code::Unauthenticated | Code::Unavailable => {
            TransportError::Unreachable { node, reason: format!("{}: {}", status.code(), status.message()) }
        }
        _ => TransportError::Network { node, reason: format!("{}: {}", status.code(), status.message()) },
    }
}
