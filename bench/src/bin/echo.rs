//! `conflux-bench-echo`: the RPC ceilings of `conflux-bench peers`. A server
//! that answers every call at once from memory, so a side-by-side run can say
//! how much of what any RPC service could do on this machine each system does.
//!
//! - `--grpc`: Conflux's own gRPC `Invoke` (same protobuf, same tonic server
//!   stack, driven by the same client and connections as Conflux); every
//!   other RPC is UNIMPLEMENTED.
//! - `--http`: hyper HTTP/1.1 on the JSON paths of Restate's ingress and the
//!   PostgreSQL service (see `conflux_bench::http`).
//!
//! Both keep the counter and team-joiner state in memory (the `native-memory`
//! logic), so the workloads and their correctness checks run unchanged; the
//! work per call is a mutex and a map, next to nothing beside the RPC.

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use conflux_bench::native::{NativeLog, NativeTarget};
use conflux_bench::target::{CallError, Target};
use conflux_client::pb;
// The daemon's own generated server (its codec included), so the ceiling is
// that of the same server stack; the messages are conflux-client's.
use conflux_host::api::pb::conflux_server::{Conflux, ConfluxServer};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::pin::Pin;
use tokio::net::TcpListener;
use tonic::{Status, Streaming};

#[derive(Debug, Parser)]
#[command(about = "An RPC server that answers at once from memory: the ceiling of conflux-bench peers")]
struct Args {
    /// Serve Conflux's gRPC Invoke (tonic).
    #[arg(long, conflicts_with = "http", required_unless_present = "http")]
    grpc: bool,
    /// Serve the JSON-over-HTTP/1.1 paths (hyper).
    #[arg(long)]
    http: bool,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
}

/// What a call did: a JSON reply, a refusal (the second team), or a bad request.
enum Answer {
    Reply(Vec<u8>),
    Refused,
    Bad(String),
}

/// The counter and team-joiner calls over the in-memory state.
async fn answer(state: &NativeTarget, object: &str, key: &str, op: &str, body: &[u8]) -> Answer {
    let result: Result<Vec<u8>, CallError> = match (object, op) {
        ("counter", "add") => match serde_json::from_slice::<i64>(body) {
            Ok(n) => state.add(key, n).await.map(|t| json(&t)),
            Err(e) => return Answer::Bad(format!("add takes an integer: {e}")),
        },
        ("counter", "get") => state.get(key).await.map(|t| json(&t)),
        ("user", "join") => match serde_json::from_slice::<String>(body) {
            Ok(team) => state.join(key, &team).await.map(|()| json(&team)),
            Err(e) => return Answer::Bad(format!("join takes a string: {e}")),
        },
        ("user", "team") => state.teams(key).await.map(|t| json(&t)),
        _ => return Answer::Bad(format!("no operation {object}/{key}/{op}")),
    };
    match result {
        Ok(reply) => Answer::Reply(reply),
        Err(CallError::Refused) => Answer::Refused,
        Err(CallError::Failed(m)) => Answer::Bad(m),
    }
}

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("plain values serialise")
}

struct Echo {
    state: NativeTarget,
}

fn unimplemented<T>() -> Result<tonic::Response<T>, Status> {
    Err(Status::unimplemented("the echo server answers Invoke only"))
}

#[tonic::async_trait]
impl Conflux for Echo {
    type StreamLogsStream = Pin<Box<dyn futures::Stream<Item = Result<pb::LogLine, Status>> + Send>>;

    async fn invoke(
        &self,
        request: tonic::Request<pb::InvokeRequest>,
    ) -> Result<tonic::Response<pb::InvokeResponse>, Status> {
        let req = request.into_inner();
        let entity = req.entity.unwrap_or_default();
        match answer(&self.state, &entity.entity_type, &entity.id, &req.operation, &req.payload).await {
            Answer::Reply(reply) => Ok(tonic::Response::new(pb::InvokeResponse { reply })),
            Answer::Refused => Err(Status::failed_precondition("already on another team")),
            Answer::Bad(m) => Err(Status::invalid_argument(m)),
        }
    }

    async fn deploy(
        &self,
        _: tonic::Request<Streaming<pb::DeployRequest>>,
    ) -> Result<tonic::Response<pb::DeployResponse>, Status> {
        unimplemented()
    }
    async fn rollback(
        &self,
        _: tonic::Request<pb::ActivateRequest>,
    ) -> Result<tonic::Response<pb::ActivateResponse>, Status> {
        unimplemented()
    }
    async fn promote(
        &self,
        _: tonic::Request<pb::ActivateRequest>,
    ) -> Result<tonic::Response<pb::ActivateResponse>, Status> {
        unimplemented()
    }
    async fn list_types(
        &self,
        _: tonic::Request<pb::ListTypesRequest>,
    ) -> Result<tonic::Response<pb::ListTypesResponse>, Status> {
        unimplemented()
    }
    async fn status(
        &self,
        _: tonic::Request<pb::StatusRequest>,
    ) -> Result<tonic::Response<pb::StatusResponse>, Status> {
        unimplemented()
    }
    async fn drain(&self, _: tonic::Request<pb::DrainRequest>) -> Result<tonic::Response<pb::DrainResponse>, Status> {
        unimplemented()
    }
    async fn list_dead_letters(
        &self,
        _: tonic::Request<pb::ListDeadLettersRequest>,
    ) -> Result<tonic::Response<pb::ListDeadLettersResponse>, Status> {
        unimplemented()
    }
    async fn get_state(
        &self,
        _: tonic::Request<pb::GetStateRequest>,
    ) -> Result<tonic::Response<pb::GetStateResponse>, Status> {
        unimplemented()
    }
    async fn list_entities(
        &self,
        _: tonic::Request<pb::ListEntitiesRequest>,
    ) -> Result<tonic::Response<pb::ListEntitiesResponse>, Status> {
        unimplemented()
    }
    async fn stream_logs(
        &self,
        _: tonic::Request<pb::StreamLogsRequest>,
    ) -> Result<tonic::Response<Self::StreamLogsStream>, Status> {
        unimplemented()
    }
}

async fn serve_http(listener: TcpListener, state: NativeTarget) -> anyhow::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let state = state.clone();
                async move {
                    let path = req.uri().path().to_owned();
                    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
                    let (status, text) = match parts[..] {
                        [object, key, op] => match answer(&state, object, key, op, &body).await {
                            Answer::Reply(r) => (StatusCode::OK, r),
                            Answer::Refused => (StatusCode::CONFLICT, b"\"already on another team\"".to_vec()),
                            Answer::Bad(m) => (StatusCode::BAD_REQUEST, m.into_bytes()),
                        },
                        _ => (StatusCode::NOT_FOUND, format!("no route {path}").into_bytes()),
                    };
                    let mut resp = Response::new(Full::new(Bytes::from(text)));
                    *resp.status_mut() = status;
                    resp.headers_mut().insert(hyper::header::CONTENT_TYPE, "application/json".parse().expect("valid"));
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let state = NativeTarget::new(NativeLog::None, dir.path())?;
    let listener = TcpListener::bind(&args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    println!("echo listening on {}", listener.local_addr()?);
    if args.http {
        return serve_http(listener, state).await;
    }
    // As `conflux serve` listens (api::serve): TCP_NODELAY on every connection.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(ConfluxServer::new(Echo { state }))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}
