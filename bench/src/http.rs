//! Systems behind HTTP/1.1 with keep-alive (one pooled connection per caller):
//! Restate's ingress (`POST /<object>/<key>/<handler>`) and the PostgreSQL
//! service, which serves the same paths. Both take and return JSON.
//!
//! | call | request | reply |
//! |---|---|---|
//! | add | `POST /counter/<key>/add` body `1` | 200, the new total |
//! | get | `POST /counter/<key>/get` | 200, the total |
//! | join | `POST /user/<key>/join` body `"red"` | 200; 409 if on another team |
//! | teams | `POST /user/<key>/team` | 200, `null`, `"red"` or `["red", …]` |

use crate::target::{CallError, Target, parse_teams, parse_total};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::time::Duration;

/// A JSON-over-HTTP/1.1 system at `base` (e.g. `http://127.0.0.1:8080`).
#[derive(Clone)]
pub struct HttpTarget {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
    timeout: Duration,
}

impl HttpTarget {
    pub fn new(base: &str) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            .build(connector);
        Self { client, base: base.trim_end_matches('/').to_owned(), timeout: Duration::from_secs(60) }
    }

    /// `POST base/path` with a JSON body; returns the status and the body.
    pub async fn post(&self, path: &str, body: Option<Vec<u8>>) -> Result<(u16, Bytes), CallError> {
        let mut req = hyper::Request::post(format!("{}{path}", self.base));
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| CallError::Failed(format!("request: {e}")))?;
        let call = async {
            let resp = self.client.request(req).await.map_err(|e| CallError::Failed(format!("{path}: {e}")))?;
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.map_err(|e| CallError::Failed(format!("{path}: {e}")))?;
            Ok((status, body.to_bytes()))
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| CallError::Failed(format!("{path}: no reply within {:?}", self.timeout)))?
    }

    /// `GET url` (any address): the body as text, for a metrics scrape.
    pub async fn get_text(&self, url: &str) -> Result<String, CallError> {
        let req = hyper::Request::get(url)
            .body(Full::new(Bytes::new()))
            .map_err(|e| CallError::Failed(format!("request: {e}")))?;
        let call = async {
            let resp = self.client.request(req).await.map_err(|e| CallError::Failed(format!("{url}: {e}")))?;
            let body = resp.into_body().collect().await.map_err(|e| CallError::Failed(format!("{url}: {e}")))?;
            Ok(String::from_utf8_lossy(&body.to_bytes()).into_owned())
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| CallError::Failed(format!("{url}: no reply within {:?}", self.timeout)))?
    }

    async fn call(&self, path: &str, body: Option<Vec<u8>>) -> Result<Bytes, CallError> {
        match self.post(path, body).await? {
            (200, b) => Ok(b),
            (409, _) => Err(CallError::Refused),
            (s, b) => Err(CallError::Failed(format!("{path}: HTTP {s}: {}", String::from_utf8_lossy(&b)))),
        }
    }
}

impl Target for HttpTarget {
    async fn add(&self, key: &str, n: i64) -> Result<i64, CallError> {
        parse_total(&self.call(&format!("/counter/{key}/add"), Some(n.to_string().into_bytes())).await?)
    }

    async fn get(&self, key: &str) -> Result<i64, CallError> {
        parse_total(&self.call(&format!("/counter/{key}/get"), None).await?)
    }

    async fn join(&self, user: &str, team: &str) -> Result<(), CallError> {
        let body = serde_json::to_vec(team).expect("a string serialises");
        self.call(&format!("/user/{user}/join"), Some(body)).await.map(drop)
    }

    async fn teams(&self, user: &str) -> Result<Vec<String>, CallError> {
        parse_teams(&self.call(&format!("/user/{user}/team"), None).await?)
    }
}
