//! End to end with the real binary: bearer-token authentication of admin and
//! invoke RPCs (gRPC and CLI), tokens kept out of the log, TLS with a
//! self-signed certificate, refusing a data directory that is in use or
//! corrupt, garbage protobuf bodies, and the warning of a cluster member
//! without TLS.

mod support;

use conflux_client::pb;
use std::path::Path;
use support::*;
use tonic::Code;

const ADMIN: &str = "adm-7f3c9e1b2d4a";
const INVOKE: &str = "inv-5a8d2c6e0f1b";

fn assert_unauthenticated<T: std::fmt::Debug>(r: Result<T, tonic::Status>, rpc: &str, token: &str) {
    let e = r.expect_err("call should be refused");
    assert_eq!(e.code(), Code::Unauthenticated, "{rpc}: {e:?}");
    assert_eq!(kind(&e), "unauthenticated", "{rpc}: {e:?}");
    let needle = format!("{rpc} needs the {token} token");
    assert!(e.message().contains(&needle), "{:?} lacks {needle:?}", e.message());
    for secret in [ADMIN, INVOKE, "wrong-token"] {
        assert!(!e.message().contains(secret), "message echoes a token: {}", e.message());
    }
}

fn deploy_stream(entity_type: &str, bytes: &[u8]) -> impl futures::Stream<Item = pb::DeployRequest> + use<> {
    let header = pb::DeployHeader { entity_type: entity_type.into(), ..Default::default() };
    futures::stream::iter(conflux_client::deploy_messages(header, bytes))
}

fn state_req(id: &str) -> pb::GetStateRequest {
    pb::GetStateRequest {
        entity: Some(pb::EntityRef { entity_type: "counter".into(), id: id.into() }),
        start_after: String::new(),
        limit: 0,
    }
}

fn assert_log_has_no_tokens(d: &Daemon) {
    let log = d.log();
    assert!(log.contains("conflux listening"), "log is being written: {log}");
    for secret in [ADMIN, INVOKE] {
        assert!(!log.contains(secret), "daemon log contains a token:\n{log}");
    }
}

#[test]
fn admin_rpcs_need_the_admin_token() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(dir.path(), &["--admin-token", ADMIN]);
    let wasm = std::fs::read(guest_wasm("counter")).unwrap();
    rt().block_on(async {
        let mut anon = d.client_with_token(None).await;
        let mut wrong = d.client_with_token(Some("wrong-token")).await;
        let mut admin = d.client_with_token(Some(ADMIN)).await;

        for c in [&mut anon, &mut wrong] {
            assert_unauthenticated(c.deploy(deploy_stream("counter", &wasm)).await, "Deploy", "admin");
            assert_unauthenticated(c.get_state(state_req("a")).await, "GetState", "admin");
            assert_unauthenticated(c.status(pb::StatusRequest {}).await, "Status", "admin");
        }
        // A refused Deploy registered nothing (ListTypes is open without an invoke token).
        let types = anon.list_types(pb::ListTypesRequest {}).await.unwrap().into_inner().types;
        assert!(types.is_empty(), "{types:?}");
        let e = call(&mut d.client().await, "counter", "a", "add", "1").await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{e:?}");

        let r = admin.deploy(deploy_stream("counter", &wasm)).await.unwrap().into_inner();
        assert_eq!(r.version, 1);
        // Invoke stays open without an invoke token.
        let reply = anon.invoke(invoke_req("counter", "a", "add", "5")).await.unwrap().into_inner().reply;
        assert_eq!(reply, b"5");
        let state = admin.get_state(state_req("a")).await.unwrap().into_inner();
        assert_eq!(state.entries.len(), 1, "{state:?}");
        let status = admin.status(pb::StatusRequest {}).await.unwrap().into_inner();
        assert_eq!(status.entity_types, 1);
    });
    assert_log_has_no_tokens(&d);
}

#[test]
fn invoke_token_guards_invoke_and_list_types() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(dir.path(), &["--admin-token", ADMIN, "--invoke-token", INVOKE]);
    let wasm = std::fs::read(guest_wasm("counter")).unwrap();
    rt().block_on(async {
        let mut anon = d.client_with_token(None).await;
        let mut wrong = d.client_with_token(Some("wrong-token")).await;
        let mut invoker = d.client_with_token(Some(INVOKE)).await;
        let mut admin = d.client_with_token(Some(ADMIN)).await;
        // The invoke token does not open admin RPCs.
        assert_unauthenticated(invoker.deploy(deploy_stream("counter", &wasm)).await, "Deploy", "admin");
        admin.deploy(deploy_stream("counter", &wasm)).await.unwrap();

        for c in [&mut anon, &mut wrong] {
            assert_unauthenticated(c.invoke(invoke_req("counter", "a", "add", "1")).await, "Invoke", "invoke");
            assert_unauthenticated(c.list_types(pb::ListTypesRequest {}).await, "ListTypes", "invoke");
        }
        // Refused invocations ran nothing: the first accepted one starts from 0.
        let reply = invoker.invoke(invoke_req("counter", "a", "add", "2")).await.unwrap().into_inner().reply;
        assert_eq!(reply, b"2");
        let reply = admin.invoke(invoke_req("counter", "a", "add", "3")).await.unwrap().into_inner().reply;
        assert_eq!(reply, b"5");
        let types = invoker.list_types(pb::ListTypesRequest {}).await.unwrap().into_inner().types;
        assert_eq!(types.len(), 1);
    });
    assert_log_has_no_tokens(&d);
}

#[test]
fn cli_sends_the_token_from_flag_or_env() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(dir.path(), &["--admin-token", ADMIN]);
    let wasm = guest_wasm("counter");
    let wasm = wasm.to_str().unwrap();

    let out = d.cli(&["deploy", "counter", wasm]);
    assert!(!out.status.success());
    let line = error_line(&stderr(&out));
    assert!(line.contains("Unauthenticated (unauthenticated): Deploy needs the admin token"), "{line}");
    let out = d.cli(&["--token", "wrong-token", "status"]);
    assert!(!out.status.success());
    assert!(error_line(&stderr(&out)).contains("Status needs the admin token"), "{}", stderr(&out));
    assert!(stdout(&d.cli(&["types"])).contains("no entity types deployed"));

    let out = d.cli(&["--token", ADMIN, "deploy", "counter", wasm]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = d.cli(&["invoke", "counter/c", "add", "4"]);
    assert_eq!(stdout(&out).trim(), "4", "{}", stderr(&out));
    let out = std::process::Command::new(conflux_bin())
        .args(["--addr", &d.url(), "state", "counter/c"])
        .env("CONFLUX_TOKEN", ADMIN)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains('4'), "{}", stdout(&out));
    assert_log_has_no_tokens(&d);
}

#[test]
fn bad_security_config_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let err = serve_expecting_failure(dir.path(), &["--admin-token", ""]);
    assert!(error_line(&err).contains("api.admin_token must not be empty"), "{err}");
    let err = serve_expecting_failure(dir.path(), &["--tls-cert", "cert.pem"]);
    assert!(error_line(&err).contains("both or neither"), "{err}");
    let missing = dir.path().join("missing.pem");
    let m = missing.to_str().unwrap();
    let err = serve_expecting_failure(dir.path(), &["--tls-cert", m, "--tls-key", m]);
    assert!(error_line(&err).contains("cannot read TLS certificate"), "{err}");
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n").unwrap();
    let j = junk.to_str().unwrap();
    let err = serve_expecting_failure(dir.path(), &["--tls-cert", j, "--tls-key", j]);
    assert!(error_line(&err).contains("not usable"), "{err}");
}

/// Writes a self-signed certificate for 127.0.0.1/localhost; returns (cert, key) paths.
fn self_signed(dir: &Path) -> (String, String) {
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    (cert.to_str().unwrap().to_owned(), key.to_str().unwrap().to_owned())
}

#[test]
fn tls_listener_serves_trusting_clients_only() {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(certs.path());
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(dir.path(), &["--tls-cert", &cert, "--tls-key", &key]);
    let https = format!("https://{}", d.addr);
    let cli = |args: &[&str]| {
        std::process::Command::new(conflux_bin()).arg("--addr").arg(&https).args(args).output().unwrap()
    };
    let wasm = guest_wasm("counter");
    let out = cli(&["--ca-cert", &cert, "deploy", "counter", wasm.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = cli(&["--ca-cert", &cert, "invoke", "counter/t", "add", "7"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "7");

    // Without trusting the self-signed certificate the CLI refuses the server.
    let out = cli(&["invoke", "counter/t", "get"]);
    assert!(!out.status.success(), "{}", stdout(&out));
    // A plaintext client gets nowhere.
    rt().block_on(async {
        match conflux_client::connect(&d.addr).await {
            Err(e) => eprintln!("plaintext connect failed as expected: {e:#}"),
            Ok(mut c) => {
                let e = call(&mut c, "counter", "t", "get", "").await.unwrap_err();
                assert_ne!(e.code(), Code::Ok);
            }
        }
    });
    // The daemon still serves TLS clients afterwards, and state is intact.
    let out = cli(&["--ca-cert", &cert, "invoke", "counter/t", "get"]);
    assert_eq!(stdout(&out).trim(), "7", "{}", stderr(&out));
}

#[test]
fn a_second_daemon_on_the_same_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    deploy(&d, "counter", &guest_wasm("counter"));
    let err = serve_expecting_failure(dir.path(), &[]);
    let line = error_line(&err);
    let expected = format!("data directory {} is in use by another conflux process", dir.path().display());
    assert!(line.contains(&expected), "{line}");
    rt().block_on(async {
        let mut c = d.client().await;
        assert_eq!(call(&mut c, "counter", "x", "add", "2").await.unwrap(), 2);
    });
}

#[test]
fn a_corrupt_data_dir_is_refused_with_a_clear_message() {
    // A garbage file where the node's WAL directory belongs.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("wal"), b"\x00garbage\xff").unwrap();
    let line = error_line(&serve_expecting_failure(dir.path(), &[]));
    let prefix = format!("error: data directory {}: cannot open the commit log", dir.path().display());
    assert!(line.starts_with(&prefix), "{line}");

    // The same where a replica's WAL of the older layout (moved into the
    // node's WAL on start) belongs.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("shards/0")).unwrap();
    std::fs::write(dir.path().join("shards/0/wal"), b"\x00garbage\xff").unwrap();
    let line = error_line(&serve_expecting_failure(dir.path(), &[]));
    let prefix = format!("error: data directory {}: cannot open the commit log", dir.path().display());
    assert!(line.starts_with(&prefix), "{line}");

    // A garbage file where the state store directory belongs.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("state"), b"\x00garbage\xff").unwrap();
    let line = error_line(&serve_expecting_failure(dir.path(), &[]));
    let prefix = format!("error: data directory {}: cannot open the state store", dir.path().display());
    assert!(line.starts_with(&prefix), "{line}");

    // Real data whose WAL files were overwritten with garbage.
    let dir = tempfile::tempdir().unwrap();
    {
        let mut d = Daemon::start(dir.path());
        deploy(&d, "counter", &guest_wasm("counter"));
        rt().block_on(async {
            let mut c = d.client().await;
            call(&mut c, "counter", "x", "add", "2").await.unwrap();
        });
        assert!(d.terminate().success());
    }
    let mut clobbered = 0;
    for entry in std::fs::read_dir(dir.path().join("wal")).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() && std::fs::metadata(&path).unwrap().len() > 0 {
            std::fs::write(&path, vec![0xA5u8; 4096]).unwrap();
            clobbered += 1;
        }
    }
    assert!(clobbered > 0, "no WAL files found to corrupt");
    let line = error_line(&serve_expecting_failure(dir.path(), &[]));
    let prefix = format!("error: data directory {}: cannot open the commit log", dir.path().display());
    assert!(line.starts_with(&prefix), "{line}");

    // Real data whose sled files were overwritten with garbage.
    let dir = tempfile::tempdir().unwrap();
    assert!(Daemon::start(dir.path()).terminate().success());
    let sled_dir = dir.path().join("state");
    let mut clobbered = 0;
    for entry in std::fs::read_dir(&sled_dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::write(&path, vec![0x5Au8; 8192]).unwrap();
            clobbered += 1;
        }
    }
    assert!(clobbered > 0, "no sled files found to corrupt");
    let line = error_line(&serve_expecting_failure(dir.path(), &[]));
    let prefix = format!("error: data directory {}: cannot open the state store", dir.path().display());
    assert!(line.starts_with(&prefix), "{line}");
}

/// A codec that sends raw bytes as the message body, to feed the server garbage.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf;
        let v = src.copy_to_bytes(src.remaining()).to_vec();
        Ok(Some(v))
    }
}

#[test]
fn garbage_protobuf_is_refused_and_the_daemon_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    deploy(&d, "counter", &guest_wasm("counter"));
    rt().block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(d.url()).unwrap().connect().await.unwrap();
        let path = tonic::codegen::http::uri::PathAndQuery::from_static("/conflux.v1.Conflux/Invoke");
        // Field 1 (entity), length-delimited, claiming 200 bytes that are not there;
        // then a varint that never ends.
        for garbage in
            [vec![0x0a, 0xc8, 0x01, 0x01], vec![0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]]
        {
            let mut grpc = tonic::client::Grpc::new(channel.clone());
            grpc.ready().await.unwrap();
            let e = grpc.unary(tonic::Request::new(garbage.clone()), path.clone(), RawCodec).await.unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{garbage:?}: {e:?}");
            assert!(e.message().contains("not a valid protobuf message"), "{e:?}");
            let kind = e.metadata().get("conflux-error-kind").and_then(|v| v.to_str().ok());
            assert_eq!(kind, Some("bad-protobuf"));
        }
        let mut c = d.client().await;
        assert_eq!(call(&mut c, "counter", "after", "add", "1").await.unwrap(), 1);
    });
}

#[test]
fn a_cluster_member_without_tls_warns_that_its_traffic_is_in_clear() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let peer = format!("1={addr}");
    let dir = tempfile::tempdir().unwrap();
    let member = [
        "--node-id",
        "1",
        "--peer",
        &peer,
        "--cluster-secret",
        "0123456789abcdef-warn",
        "--set",
        "cluster.shard_count=1",
    ];
    let mut d = Daemon::start_at(&dir.path().join("member"), &addr, &member);
    assert!(d.terminate().success());
    let log = d.log();
    assert!(log.contains("WARN") && log.contains("without TLS"), "no warning in:\n{log}");
    assert!(!log.contains("0123456789abcdef-warn"), "the secret is logged:\n{log}");
    // A single node on loopback has nothing to warn about.
    let mut single = Daemon::start(&dir.path().join("single"));
    assert!(single.terminate().success());
    assert!(!single.log().contains("WARN"), "{}", single.log());
}
