//! The client commands (`deploy`, `invoke`, `status`, …): each checks its
//! local input, makes its calls through conflux-client (following pages and
//! waiting where the command says so) and hands the reply to [`super::render`].

use super::Command;
use super::render::{self, Output, rpc_error};
use crate::model::EntityRef;
use anyhow::Context;
use conflux_client::{AuthClient, ClientOptions, connect_with, pb};
use futures::StreamExt;

pub(super) async fn client_command(
    addr: &str,
    opts: &ClientOptions,
    command: Command,
    out: Output,
) -> anyhow::Result<()> {
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
        Command::Logs { entity: Some(e), .. } if e.contains('/') => {
            EntityRef::parse(e)?;
        }
        _ => {}
    }
    let mut client = connect_with(addr, opts).await?;
    match command {
        Command::Serve { .. } | Command::New { .. } => unreachable!("handled by run"),
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
            out.print(&r, render::deploy)?;
        }
        Command::Versions { entity_type } => {
            let r = client.list_types(pb::ListTypesRequest {}).await.map_err(rpc_error)?.into_inner();
            let t = r.types.into_iter().find(|t| t.name == entity_type).ok_or_else(|| {
                anyhow::anyhow!("unknown entity type {entity_type:?}; deploy a component for it first")
            })?;
            out.print(&t, render::versions)?;
        }
        Command::DeadLetters { limit } => {
            let mut start_after = String::new();
            let mut all = pb::ListDeadLettersResponse::default();
            while (all.dead_letters.len() as u32) < limit {
                let shown = all.dead_letters.len() as u32;
                let req =
                    pb::ListDeadLettersRequest { start_after: start_after.clone(), limit: (limit - shown).min(1000) };
                let r = client.list_dead_letters(req).await.map_err(rpc_error)?.into_inner();
                all.dead_letters.extend(r.dead_letters);
                all.next_start_after = r.next_start_after.clone();
                if r.next_start_after.is_empty() {
                    break;
                }
                start_after = r.next_start_after;
            }
            out.print(&all, render::dead_letters)?;
        }
        Command::Rollback { entity_type, version } => {
            let r = client.rollback(pb::ActivateRequest { entity_type, version }).await.map_err(rpc_error)?;
            out.print(&r.into_inner(), render::activate)?;
        }
        Command::Promote { entity_type, version } => {
            let r = client.promote(pb::ActivateRequest { entity_type, version }).await.map_err(rpc_error)?;
            out.print(&r.into_inner(), render::activate)?;
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
            out.print(&r, render::invoke)?;
        }
        Command::Types => {
            let r = client.list_types(pb::ListTypesRequest {}).await.map_err(rpc_error)?.into_inner();
            out.print(&r, render::types)?;
        }
        Command::Status => {
            let s = client.status(pb::StatusRequest {}).await.map_err(rpc_error)?.into_inner();
            out.print(&s, render::status)?;
        }
        Command::Drain { node_id, no_wait, timeout_secs } => {
            let node = node_id.to_string();
            let r = client.drain(pb::DrainRequest { node_id: node.clone() }).await.map_err(rpc_error)?.into_inner();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(timeout_secs);
            let mut left = r.replicas;
            while !no_wait && left > 0 {
                if std::time::Instant::now() >= deadline {
                    anyhow::bail!("node {node} still holds {left} replicas after {timeout_secs} s; the drain goes on");
                }
                if !out.json {
                    note!("node {node}: {left} replicas to move");
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                let s = client.status(pb::StatusRequest {}).await.map_err(rpc_error)?.into_inner();
                left = s.nodes.iter().find(|n| n.node_id == node).map_or(0, |n| n.replicas);
            }
            let done = pb::DrainResponse { replicas: left };
            out.print(&done, |d| render::drain(&node, d))?;
        }
        Command::State { entity } => {
            let e = EntityRef::parse(&entity)?;
            let mut start_after = String::new();
            let mut all = pb::GetStateResponse::default();
            loop {
                let req = pb::GetStateRequest {
                    entity: Some(pb::EntityRef { entity_type: e.entity_type.clone(), id: e.id.clone() }),
                    start_after: start_after.clone(),
                    limit: 0,
                };
                let r = client.get_state(req).await.map_err(rpc_error)?.into_inner();
                all.entries.extend(r.entries);
                if r.next_start_after.is_empty() {
                    break;
                }
                start_after = r.next_start_after;
            }
            out.print(&all, render::state)?;
        }
        Command::Entities { entity_type, prefix, limit, start_after } => {
            let mut all = pb::ListEntitiesResponse::default();
            let mut cursor = start_after.unwrap_or_default();
            while (all.ids.len() as u32) < limit {
                let req = pb::ListEntitiesRequest {
                    entity_type: entity_type.clone(),
                    prefix: prefix.clone(),
                    start_after: cursor.clone(),
                    limit: (limit - all.ids.len() as u32).min(10_000),
                };
                let r = client.list_entities(req).await.map_err(rpc_error)?.into_inner();
                all.ids.extend(r.ids);
                all.next_start_after = r.next_start_after.clone();
                if r.next_start_after.is_empty() {
                    break;
                }
                cursor = r.next_start_after;
            }
            out.print(&all, |all| render::entities(&entity_type, all))?;
        }
        Command::Logs { entity, follow, tail } => {
            let (entity_type, id) = match &entity {
                None => (String::new(), String::new()),
                Some(e) => match e.split_once('/') {
                    Some((t, i)) => (t.to_owned(), i.to_owned()),
                    None => (e.clone(), String::new()),
                },
            };
            let req = pb::StreamLogsRequest { entity_type, id, follow, tail };
            let mut lines = client.stream_logs(req).await.map_err(rpc_error)?.into_inner();
            while let Some(line) = lines.next().await {
                let l = line.map_err(rpc_error)?;
                out.log_line(&l)?;
            }
        }
    }
    Ok(())
}

/// Components at least this large get a progress bar while uploading.
const PROGRESS_MIN_BYTES: usize = 1 << 20;

/// Streams a component to Deploy. On a terminal, large uploads get a progress
/// bar, and the wait for the server (compiling; for a dry run, also migrating
/// the sample) a spinner saying what it is doing.
async fn upload(client: &mut AuthClient, header: pb::DeployHeader, bytes: &[u8]) -> anyhow::Result<pb::DeployResponse> {
    use std::io::IsTerminal;
    let waiting_for = if header.dry_run {
        format!("dry run: compiling and migrating up to {} sampled entities…", header.dry_run_sample)
    } else {
        "validating and compiling…".to_owned()
    };
    let messages = conflux_client::deploy_messages(header, bytes);
    let bar = std::io::stderr().is_terminal().then(|| {
        if bytes.len() >= PROGRESS_MIN_BYTES {
            let bar = indicatif::ProgressBar::new(bytes.len() as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "uploading {bytes}/{total_bytes} [{bar:30}] {bytes_per_sec} {msg}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar
        } else {
            let spinner = indicatif::ProgressBar::new_spinner().with_message(waiting_for.clone());
            spinner.enable_steady_tick(std::time::Duration::from_millis(120));
            spinner
        }
    });
    let ticker = bar.clone().filter(|b| b.length().is_some());
    // A chunk counts as sent when tonic pulls the next one from the stream.
    let stream = futures::stream::iter(messages).inspect(move |m| {
        if let (Some(bar), Some(pb::deploy_request::Part::Chunk(c))) = (&ticker, &m.part) {
            bar.inc(c.len() as u64);
            if bar.position() == bar.length().unwrap_or(0) {
                // The server now validates and compiles before it answers.
                bar.set_message(format!("— {waiting_for}"));
            }
        }
    });
    let result = client.deploy(stream).await;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(result.map_err(rpc_error)?.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let e = rt
            .block_on(client_command("127.0.0.1:9", &ClientOptions::default(), bad_json, Output::default()))
            .unwrap_err();
        assert!(format!("{e:#}").contains("not valid JSON"), "{e:#}");
        let bad_ref = Command::State { entity: "noslash".into() };
        let e = rt
            .block_on(client_command("127.0.0.1:9", &ClientOptions::default(), bad_ref, Output::default()))
            .unwrap_err();
        assert!(format!("{e:#}").contains("TYPE/ID"), "{e:#}");
    }
}
