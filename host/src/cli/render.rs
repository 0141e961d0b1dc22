//! How the CLI prints replies: for humans (tables, one-line summaries, UTC
//! dates, binary sizes) or, with `--json`, as the JSON views of
//! conflux-client's messages; and how a failed call reads (`CODE (kind):
//! message`).

use conflux_client::pb;

/// Turns a gRPC status into a one-line error: `CODE (kind): message`.
pub(super) fn rpc_error(s: tonic::Status) -> anyhow::Error {
    let kind = conflux_client::error_kind(&s).map(|k| format!(" ({k})"));
    anyhow::anyhow!("{:?}{}: {}", s.code(), kind.unwrap_or_default(), s.message())
}

/// How a client command prints its result.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Output {
    pub(super) json: bool,
}

impl Output {
    /// Prints `value` as JSON if asked to, else runs `human`.
    pub(super) fn print<T: serde::Serialize>(
        self,
        value: &T,
        human: impl FnOnce(&T) -> std::io::Result<()>,
    ) -> anyhow::Result<()> {
        if self.json {
            say!("{}", serde_json::to_string_pretty(value)?);
        } else {
            human(value)?;
        }
        Ok(())
    }

    /// Prints one streamed log line: a JSON object per line with `--json`.
    pub(super) fn log_line(self, l: &pb::LogLine) -> anyhow::Result<()> {
        if self.json {
            say!("{}", serde_json::to_string(l)?);
        } else {
            if l.dropped > 0 {
                say!("… {} line(s) dropped: this follower fell behind", l.dropped);
            }
            say!("{} {} [{}] {}: {}", format_utc(l.at_ms), entity_name(&l.entity), l.invocation_id, l.stream, l.line);
        }
        Ok(())
    }
}

fn entity_name(e: &Option<pb::EntityRef>) -> String {
    e.as_ref().map(|e| format!("{}/{}", e.entity_type, e.id)).unwrap_or_default()
}

/// `conflux deploy`: what was deployed (or, for a dry run, how the sample migrated).
pub(super) fn deploy(r: &pb::DeployResponse) -> std::io::Result<()> {
    if let Some(d) = &r.dry_run {
        say!(
            "dry run of {} as version {} (sha256:{}): compiled and validated; nothing was committed",
            r.entity_type,
            r.version,
            r.digest
        );
        if !d.has_migration {
            say!("the component exports no migration: existing entities would run it unchanged");
        }
        say!(
            "sampled {} entities: {} migrated, {} failed, {} already on this version",
            d.sampled,
            d.migrated,
            d.failed,
            d.up_to_date
        );
        for f in &d.failures {
            say!("  {}/{} (from version {}): {}", r.entity_type, f.id, f.from_version, f.error);
        }
    } else if r.unchanged {
        say!("{} version {} unchanged (digest sha256:{})", r.entity_type, r.version, r.digest);
    } else if !r.canary_ids.is_empty() {
        say!(
            "deployed {} version {} (sha256:{}) as a canary for {}; version {} stays active for the rest \
             (`conflux promote {} {}` to finish)",
            r.entity_type,
            r.version,
            r.digest,
            r.canary_ids.join(","),
            r.previous_active_version,
            r.entity_type,
            r.version
        );
    } else if r.reused {
        say!(
            "{} version {} is active again (sha256:{}; identical bytes, so its number was reused; was {})",
            r.entity_type,
            r.version,
            r.digest,
            r.previous_active_version
        );
    } else {
        say!("deployed {} version {} (sha256:{})", r.entity_type, r.version, r.digest);
    }
    Ok(())
}

/// `conflux rollback` / `promote`: which version is active now.
pub(super) fn activate(r: &pb::ActivateResponse) -> std::io::Result<()> {
    if r.unchanged {
        say!("{} version {} is already active", r.entity_type, r.active_version);
    } else {
        say!("{} version {} is active (was {})", r.entity_type, r.active_version, r.previous_active_version);
    }
    if let Some(c) = &r.ended_canary {
        say!("ended canary of version {} for {}", c.version, c.ids.join(","));
    }
    Ok(())
}

/// `conflux status`: the node's facts, then its cluster's members, shards and moves.
pub(super) fn status(s: &pb::StatusResponse) -> std::io::Result<()> {
    say!("conflux {}", s.version);
    say!("node             {}", s.node_id);
    say!("uptime           {:.1}s", s.uptime_ms as f64 / 1000.0);
    say!("data dir         {}", s.data_dir);
    say!("entity types     {}", s.entity_types);
    say!("active entities  {}", s.active_entities);
    say!("resident         {}", s.resident_instances);
    say!("in flight        {}", s.inflight_invocations);
    say!("turns ok/failed  {}/{}", s.turns_ok, s.turns_failed);
    say!(
        "outbox           {} waiting, {} delivered, {} dead letters",
        s.outbox_messages,
        s.messages_delivered,
        s.dead_letters
    );
    say!(
        "log entries      {} applied, {} durable, {} syncs (over this node's replicas)",
        s.applied_index,
        s.durable_index,
        s.log_sync_batches
    );
    say!("NODE\tADDRESS\tSTATE\tLEADS\tREPLICAS");
    for n in &s.nodes {
        say!("{}\t{}\t{}\t{}\t{}", n.node_id, n.address, n.state, n.shards_led, n.replicas);
    }
    say!("SHARD\tLEADER\tREPLICAS\tLAG");
    for sh in &s.shards {
        say!("{}\t{}\t{}\t{}", sh.shard_id, sh.leader, sh.replicas.join(","), sh.replication_lag);
    }
    if !s.moves.is_empty() {
        say!("MOVES IN PROGRESS");
        for m in &s.moves {
            say!("{m}");
        }
    }
    Ok(())
}

/// `conflux versions`: one line per version, marking the active one and any canary.
pub(super) fn versions(t: &pb::TypeInfo) -> std::io::Result<()> {
    say!("VERSION\tACTIVE\tSIZE\tDEPLOYED\tDIGEST");
    for v in &t.versions {
        let mark = match &t.canary {
            _ if v.version == t.active_version => "active".to_owned(),
            Some(c) if c.version == v.version => format!("canary({})", c.ids.join(",")),
            _ => "-".to_owned(),
        };
        say!(
            "{}\t{}\t{}\t{}\tsha256:{}",
            v.version,
            mark,
            human_bytes(v.size_bytes),
            format_utc(v.deployed_at_ms),
            v.digest
        );
    }
    Ok(())
}

/// `conflux invoke`: the reply as the entity wrote it.
pub(super) fn invoke(r: &pb::InvokeResponse) -> std::io::Result<()> {
    say!("{}", String::from_utf8_lossy(&r.reply));
    Ok(())
}

/// `conflux types`: one line per entity type.
pub(super) fn types(r: &pb::ListTypesResponse) -> std::io::Result<()> {
    if r.types.is_empty() {
        say!("no entity types deployed");
    }
    for t in &r.types {
        let active = t.versions.iter().find(|v| v.version == t.active_version);
        say!(
            "{}\tversion {}\t{} versions\tsha256:{}",
            t.name,
            t.active_version,
            t.versions.len(),
            active.map(|v| v.digest.as_str()).unwrap_or("?")
        );
    }
    Ok(())
}

/// `conflux drain`: whether the member still holds replicas.
pub(super) fn drain(node: &str, d: &pb::DrainResponse) -> std::io::Result<()> {
    if d.replicas == 0 {
        say!("node {node} holds no replicas: it is safe to stop");
    } else {
        say!("node {node} is draining: {} replicas to move", d.replicas);
    }
    Ok(())
}

/// `conflux state`: one `key<TAB>value` line per state key.
pub(super) fn state(all: &pb::GetStateResponse) -> std::io::Result<()> {
    for entry in &all.entries {
        say!("{}\t{}", entry.key, String::from_utf8_lossy(&entry.value));
    }
    if all.entries.is_empty() {
        say!("(no state)");
    }
    Ok(())
}

/// `conflux entities`: one id per line; where to go on (on stderr).
pub(super) fn entities(entity_type: &str, all: &pb::ListEntitiesResponse) -> std::io::Result<()> {
    for id in &all.ids {
        say!("{id}");
    }
    if !all.next_start_after.is_empty() {
        note!("(more: --start-after {})", all.next_start_after);
    } else if all.ids.is_empty() {
        note!("(no entities of type {entity_type} have state)");
    }
    Ok(())
}

/// `conflux dead-letters`: one line per undelivered message.
pub(super) fn dead_letters(all: &pb::ListDeadLettersResponse) -> std::io::Result<()> {
    for d in &all.dead_letters {
        say!(
            "{}\t{} #{} -> {} {}\t{} attempt(s)\t{}\tpayload {}",
            format_utc(d.at_ms),
            entity_name(&d.sender),
            d.seq,
            entity_name(&d.target),
            d.operation,
            d.attempts,
            d.reason,
            String::from_utf8_lossy(&d.payload)
        );
    }
    if all.dead_letters.is_empty() {
        say!("no dead letters");
    }
    Ok(())
}

fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / (1 << 10) as f64),
        n => format!("{n} B"),
    }
}

/// `YYYY-MM-DD HH:MM:SS UTC` from Unix milliseconds (civil-from-days, proleptic Gregorian).
fn format_utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_sizes_print_readably() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_utc(1_795_000_000_000), "2026-11-18 11:06:40 UTC");
        assert_eq!(format_utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
    }

    #[test]
    fn failed_calls_read_code_kind_message() {
        let mut s = tonic::Status::unavailable("no leader for shard 3");
        s.metadata_mut().insert(conflux_client::ERROR_KIND_HEADER, "no-leader".parse().unwrap());
        assert_eq!(rpc_error(s).to_string(), "Unavailable (no-leader): no leader for shard 3");
        assert_eq!(rpc_error(tonic::Status::internal("x")).to_string(), "Internal: x");
    }
}
