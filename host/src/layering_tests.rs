//! The module house's invariants, stated as absences and checked against
//! the source (ARCHITECTURE.md, "Invariants"): the top-level modules, and
//! the parts of the cluster layer, form no cycle; the scheduler knows no Raft and no cluster; only `api` (and the
//! CLI, through `conflux-client`) knows protobuf; the cluster layer owns its
//! wire (it names neither `api` nor protobuf) and `api` only maps it (it
//! names the cluster's port and domain types, none of its workings); a node
//! started alone has no code path of its own. Test code is left out: it may
//! reach across layers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every non-test source file under `host/src`, with its text cut before its
/// inline test module.
fn sources() -> Vec<(PathBuf, String)> {
    fn walk(dir: &Path, out: &mut Vec<(PathBuf, String)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
                continue;
            }
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let test_file =
                matches!(name.as_str(), "tests.rs" | "conformance.rs" | "harness.rs") || name.ends_with("_tests.rs");
            if !name.ends_with(".rs") || test_file {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let code = match text.find("#[cfg(test)]\nmod tests") {
                Some(at) => &text[..at],
                None => &text,
            };
            // Comments name what they explain, not what the code uses.
            let code: String =
                code.lines().filter(|l| !l.trim_start().starts_with("//")).map(|l| format!("{l}\n")).collect();
            out.push((path, code));
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = Vec::new();
    walk(&root, &mut out);
    out.into_iter().map(|(p, t)| (p.strip_prefix(&root).unwrap().to_owned(), t)).collect()
}

/// The top-level module a file belongs to (`scheduler/turn.rs` → `scheduler`).
fn module_of(path: &Path) -> String {
    let first = path.components().next().unwrap().as_os_str().to_string_lossy();
    first.trim_end_matches(".rs").to_owned()
}

fn mentions(code: &str, what: &str) -> bool {
    code.lines().filter(|l| !l.trim_start().starts_with("//")).any(|l| l.contains(what))
}

/// The names that follow `prefix` in `code` (`crate::scheduler::Route` →
/// `scheduler` for `crate::`).
fn named_after<'a>(code: &'a str, prefix: &'a str) -> impl Iterator<Item = String> + 'a {
    code.match_indices(prefix).filter_map(move |(at, _)| {
        let rest = &code[at + prefix.len()..];
        let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        (!name.is_empty()).then_some(name)
    })
}

/// Which top-level modules each one's code names (`crate::x`). `config` is
/// left out as a user: it is the tree of every module's configuration slice,
/// and names each module's slice type and validation helpers by design.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (path, code) in sources() {
        let from = module_of(&path);
        let entry = graph.entry(from.clone()).or_default();
        if from == "config" {
            continue;
        }
        entry.extend(named_after(&code, "crate::").filter(|to| *to != from));
    }
    graph
}

/// Which parts of `cluster/` each part names (a part is a file or folder
/// directly under it: `raft/log_store.rs` is part `raft`).
fn cluster_graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (path, code) in sources() {
        let mut parts = path.components().map(|c| c.as_os_str().to_string_lossy().into_owned());
        if parts.next().as_deref() != Some("cluster") {
            continue;
        }
        let Some(part) = parts.next() else { continue };
        let nested = parts.next().is_some();
        let from = part.trim_end_matches(".rs").to_owned();
        if from == "mod" {
            continue;
        }
        let entry = graph.entry(from.clone()).or_default();
        // In a file directly under cluster/, `super::` is the cluster; in a
        // nested one it is the part itself.
        let prefixes: &[&str] = if nested { &["crate::cluster::"] } else { &["crate::cluster::", "super::"] };
        for prefix in prefixes {
            // A module's name, not an item's (`super::Peers`).
            let modules = named_after(&code, prefix).filter(|to| to.starts_with(|c: char| c.is_ascii_lowercase()));
            entry.extend(modules.filter(|to| *to != from));
        }
    }
    graph
}

/// The modules of `graph` that sit on a cycle (Kahn's algorithm: whatever
/// cannot be ordered).
fn on_cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> BTreeMap<String, BTreeSet<String>> {
    let mut left = graph.clone();
    loop {
        let leaves: Vec<String> = left
            .iter()
            .filter(|(_, uses)| uses.iter().all(|u| !left.contains_key(u)))
            .map(|(m, _)| m.clone())
            .collect();
        if leaves.is_empty() {
            return left;
        }
        for leaf in leaves {
            left.remove(&leaf);
        }
    }
}

#[test]
fn the_parts_of_the_cluster_layer_form_no_cycle() {
    let graph = cluster_graph();
    assert!(graph.contains_key("raft") && graph.contains_key("meta"), "{graph:#?}");
    let left = on_cycles(&graph);
    assert!(left.is_empty(), "cluster parts on a cycle (part -> what it uses): {left:#?}");
}

#[test]
fn the_top_level_modules_form_no_cycle() {
    let left = on_cycles(&module_graph());
    assert!(left.is_empty(), "modules on a cycle (module -> what it uses): {left:#?}");
}

#[test]
fn the_scheduler_knows_no_raft_and_no_cluster() {
    for (path, code) in sources().iter().filter(|(p, _)| module_of(p) == "scheduler") {
        for word in ["openraft", "crate::cluster", "raft::"] {
            assert!(!mentions(code, word), "{} names {word}", path.display());
        }
    }
}

#[test]
fn only_the_api_and_the_cli_know_protobuf() {
    for (path, code) in sources() {
        if matches!(module_of(&path).as_str(), "api" | "cli") {
            continue;
        }
        for word in ["pb::", "prost", "tonic::Request", "tonic::Status"] {
            assert!(!mentions(&code, word), "{} names {word}", path.display());
        }
    }
}

#[test]
fn a_node_started_alone_has_no_code_path_of_its_own() {
    // Only where a node is configured and assembled is "alone" known: the
    // configuration's defaults (node id, shard count, optional secret) and
    // the node's identity, secret file and warnings. Nothing downstream
    // branches on it, and nothing is optional for want of a cluster.
    for (path, code) in sources() {
        let allowed = path.to_str() == Some("config.rs") || module_of(&path) == "node";
        if !allowed {
            assert!(!mentions(&code, "started_alone"), "{} branches on a node started alone", path.display());
        }
        for word in ["Option<Arc<dyn Router>>", "single-node mode", "not-clustered"] {
            assert!(!mentions(&code, word), "{} still has {word:?}", path.display());
        }
    }
}

#[test]
fn the_cluster_layer_names_no_api_and_no_protobuf() {
    // The node-to-node port (`cluster/wire.rs`) and everything behind it are
    // in domain terms; `api::cluster` implements and serves them over gRPC.
    let cluster: Vec<_> = sources().into_iter().filter(|(p, _)| module_of(p) == "cluster").collect();
    assert!(cluster.iter().any(|(p, _)| p.ends_with("wire.rs")), "cluster/wire.rs is the cluster's port");
    for (path, code) in cluster {
        for word in ["crate::api", "super::super::api", "pb::", "tonic", "prost", "include_proto"] {
            assert!(!mentions(&code, word), "{} names {word}", path.display());
        }
    }
}

#[test]
fn the_api_only_maps_the_cluster() {
    // What `api` may name of the cluster layer: the port it implements and
    // its errors (`wire`), what a member does when called (`service`), the
    // operator's view (`view`), and the domain types it maps (`raft`'s ids
    // and encoded messages, `shards`' reports). Members, moves, handoffs,
    // the metadata group and Raft itself are the cluster's own.
    const MAPPED: [&str; 5] = ["raft", "service", "shards", "view", "wire"];
    for (path, code) in sources().iter().filter(|(p, _)| module_of(p) == "api") {
        for part in named_after(code, "crate::cluster::") {
            assert!(MAPPED.contains(&part.as_str()), "{} names cluster::{part}", path.display());
        }
        for word in ["openraft", "META_SHARD", "add_learner", "leader_of"] {
            assert!(!mentions(code, word), "{} names {word}", path.display());
        }
    }
}
