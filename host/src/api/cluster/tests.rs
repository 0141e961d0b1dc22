use super::client::REDIAL_AFTER_FAILED_CALLS;
use super::*;
use crate::cluster::raft::{NodeId, RaftRpc, ReplicaTable, Transport, TransportError};
use crate::cluster::service::ClusterNode;
use crate::cluster::tests::{TestNode, applied_everywhere, assert_identical, config, initialize, leader, put, write};
use crate::cluster::wire::Wire;
use std::sync::Arc;
use std::time::Duration;

const SECRET: &str = "correct-horse-battery-staple";

/// Serves `replicas` on 127.0.0.1 and returns the address.
async fn serve(node: NodeId, secret: &str, replicas: ReplicaTable) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service =
        ClusterService::new(ClusterSecret::new(secret).unwrap(), ClusterNode::new(node, replicas)).into_server();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    addr
}

#[test]
fn short_or_non_ascii_secrets_are_refused() {
    assert!(matches!(ClusterSecret::new("short"), Err(ClusterApiError::SecretTooShort)));
    assert!(matches!(ClusterSecret::new("sixteen bytes with spaces"), Err(ClusterApiError::SecretNotAscii)));
    assert!(ClusterSecret::new(SECRET).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_group_replicates_over_grpc_and_refuses_strangers() {
    let transports: Vec<Arc<GrpcTransport>> =
        (0..3).map(|_| Arc::new(GrpcTransport::new(ClusterSecret::new(SECRET).unwrap()))).collect();
    let mut nodes = Vec::new();
    let mut addrs = Vec::new();
    for (i, transport) in transports.iter().enumerate() {
        let id = i as NodeId + 1;
        let node = TestNode::open(id, tempfile::tempdir().unwrap(), transport.clone(), config(1000)).await;
        let table = ReplicaTable::default();
        table.insert(crate::cluster::tests::SHARD, node.replica().raft.clone());
        addrs.push(serve(id, SECRET, table).await);
        nodes.push(node);
    }
    for transport in &transports {
        for (i, addr) in addrs.iter().enumerate() {
            transport.set_peer(i as NodeId + 1, &addr.to_string()).unwrap();
        }
    }
    initialize(&nodes).await;
    let mut acked = Vec::new();
    let mut last = openraft::LogId::default();
    for i in 0..20 {
        last = write(&nodes, put(&format!("g{i}"), "1"), Duration::from_secs(10)).await;
        acked.push(format!("g{i}"));
    }
    applied_everywhere(&nodes, last.index, Duration::from_secs(10)).await;
    assert_identical(&nodes, &acked);

    // A process with the wrong secret asks for votes at a far higher
    // term. Were it heard, the leader would have to step down.
    let l = leader(&nodes, Duration::from_secs(5)).await;
    let term_before = nodes.iter().find(|n| n.id == l).unwrap().replica().raft.metrics().borrow().current_term;
    let stranger = GrpcTransport::new(ClusterSecret::new("not-the-cluster-secret").unwrap());
    for (i, addr) in addrs.iter().enumerate() {
        let target = i as NodeId + 1;
        stranger.set_peer(target, &addr.to_string()).unwrap();
        let vote =
            openraft::raft::VoteRequest { vote: openraft::Vote::new(term_before + 100, 99), last_log_id: Some(last) };
        let err = stranger
            .send(target, crate::cluster::tests::SHARD, RaftRpc::Vote(vote), Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, TransportError::Unreachable { reason, .. } if reason.contains("cluster secret")),
            "{err}"
        );
    }
    // A right secret but no such shard is told so.
    let err = transports[0]
        .send(
            2,
            999,
            RaftRpc::Vote(openraft::raft::VoteRequest { vote: openraft::Vote::new(1, 1), last_log_id: None }),
            Duration::from_secs(2),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::NoSuchShard { node: 2, shard: 999 }), "{err}");
    assert_eq!(leader(&nodes, Duration::from_secs(5)).await, l);
    let term_after = nodes.iter().find(|n| n.id == l).unwrap().replica().raft.metrics().borrow().current_term;
    assert_eq!(term_before, term_after, "a stranger's vote request changed the term");
    for n in &mut nodes {
        n.replica().raft.shutdown().await.unwrap();
    }
}

/// A peer whose connection stalls (it accepted, then never answers) is
/// dialled afresh after `REDIAL_AFTER_FAILED_CALLS` unanswered calls.
#[tokio::test]
async fn a_peer_whose_connection_stalls_is_redialled() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            held.push(conn);
        }
    });
    let transport = GrpcTransport::new(ClusterSecret::new(SECRET).unwrap());
    transport.set_peer(2, &addr.to_string()).unwrap();
    let vote = || RaftRpc::Vote(openraft::raft::VoteRequest { vote: openraft::Vote::new(1, 1), last_log_id: None });
    for _ in 0..REDIAL_AFTER_FAILED_CALLS {
        let err = transport.send(2, 0, vote(), Duration::from_millis(50)).await.unwrap_err();
        assert!(matches!(err, TransportError::Network { .. }), "{err}");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "one channel, one connection until the redial");
    let _ = transport.send(2, 0, vote(), Duration::from_millis(50)).await;
    // The new connection may still be on its way when the call times out
    // (a loaded machine): it must arrive, and be the only new one.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while accepted.load(Ordering::SeqCst) < 2 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let n = accepted.load(Ordering::SeqCst);
    assert_eq!(n, 2, "the stalled connection was not replaced by exactly one new one: {n} connections");
    holder.abort();
}

fn vote() -> RaftRpc {
    RaftRpc::Vote(openraft::raft::VoteRequest { vote: openraft::Vote::new(1, 1), last_log_id: None })
}

/// Messages of many shard groups to one peer share calls, and each sender
/// gets its own message's answer (here: the refusal naming its shard).
#[tokio::test]
async fn raft_messages_of_many_groups_to_one_peer_share_calls() {
    let addr = serve(2, SECRET, ReplicaTable::default()).await;
    let transport = GrpcTransport::new(ClusterSecret::new(SECRET).unwrap());
    transport.set_peer(2, &addr.to_string()).unwrap();
    let shards: Vec<u32> = (1000..1064).collect();
    let answers =
        futures::future::join_all(shards.iter().map(|&shard| transport.send(2, shard, vote(), Duration::from_secs(5))))
            .await;
    for (shard, answer) in shards.iter().zip(answers) {
        let err = answer.unwrap_err();
        assert!(matches!(err, TransportError::NoSuchShard { node: 2, shard: s } if s == *shard), "{shard}: {err}");
    }
    let calls = transport.raft_calls();
    assert!(calls <= 4, "64 messages took {calls} calls");
}

/// A peer of an older version, which has no `RaftBatch`, is sent one
/// message per call after its first refusal.
#[tokio::test]
async fn a_peer_without_raft_batches_is_sent_one_message_per_call() {
    use tower::Service;
    /// The cluster service without `RaftBatch`, as an older node serves it.
    #[derive(Clone)]
    struct Older(pb::cluster_server::ClusterServer<ClusterService>);
    impl tonic::server::NamedService for Older {
        const NAME: &'static str = "conflux.cluster.v1.Cluster";
    }
    impl Service<tonic::codegen::http::Request<tonic::body::Body>> for Older {
        type Response = tonic::codegen::http::Response<tonic::body::Body>;
        type Error = std::convert::Infallible;
        type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;
        fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
            Service::<tonic::codegen::http::Request<tonic::body::Body>>::poll_ready(&mut self.0, cx)
        }
        fn call(&mut self, req: tonic::codegen::http::Request<tonic::body::Body>) -> Self::Future {
            if req.uri().path().ends_with("/RaftBatch") {
                return Box::pin(async { Ok(tonic::Status::unimplemented("no such method").into_http()) });
            }
            let call = self.0.call(req);
            Box::pin(call)
        }
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let inner = ClusterService::new(ClusterSecret::new(SECRET).unwrap(), ClusterNode::new(2, ReplicaTable::default()))
        .into_server();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(Older(inner))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let transport = GrpcTransport::new(ClusterSecret::new(SECRET).unwrap());
    transport.set_peer(2, &addr.to_string()).unwrap();
    let first = transport.send(2, 7, vote(), Duration::from_secs(5)).await.unwrap_err();
    assert!(matches!(first, TransportError::Network { .. }), "{first}");
    for shard in [7, 8] {
        let err = transport.send(2, shard, vote(), Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(err, TransportError::NoSuchShard { node: 2, shard: s } if s == shard), "{err}");
    }
    assert_eq!(transport.raft_calls(), 3, "one refused batch, then a call per message");
}
