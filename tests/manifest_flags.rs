//! Every argument list the Kubernetes manifests and the Helm chart pass to
//! berth (extracted into tests/manifests/berth-args.json by
//! tests/manifests/validate.sh, which also fails when that file is stale) is
//! accepted by berth's own parser and by the checks berth makes at
//! start-up before it touches anything (mode and kinds, the node id as
//! kubelet passes it), and no two berths the node DaemonSet runs side by
//! side have a directory inside the other's (berth refuses to start so).
use std::path::PathBuf;

use berth::config::{Cli, Config, Mode};
use berth::state::Kind;
use clap::Parser;

fn lists() -> Vec<Vec<String>> {
    let text = include_str!("manifests/berth-args.json");
    serde_json::from_str(text).expect("berth-args.json is a JSON list of lists")
}

fn parsed(args: &[String]) -> Config {
    Cli::try_parse_from(std::iter::once("berth".to_string()).chain(args.iter().cloned()))
        .unwrap_or_else(|e| panic!("berth rejects {args:?}: {e}"))
        .config
}

#[test]
fn manifest_arguments_parse() {
    let lists = lists();
    assert!(
        lists.len() >= 3,
        "expected the node, NFS node and controller containers at least"
    );
    for args in &lists {
        let cfg = parsed(args);
        cfg.socket_path()
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        assert!(!cfg.kinds.is_empty());
        cfg.check_mode_and_kinds()
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        // kubelet's $(KUBE_NODE_NAME): a node name such as a cloud's.
        let with_node: Vec<String> = args
            .iter()
            .map(|a| a.replace("$(KUBE_NODE_NAME)", "ip-10-0-1-23.ec2.internal"))
            .collect();
        parsed(&with_node)
            .resolved_node_id()
            .unwrap_or_else(|e| panic!("{with_node:?}: {e}"));
    }
}

/// The state directory and the served kinds' roots of one berth.
fn dirs(cfg: &Config) -> Vec<PathBuf> {
    let mut v = vec![cfg.state_dir()];
    if cfg.serves(Kind::Local) {
        v.push(cfg.local_root());
    }
    if cfg.serves(Kind::Block) {
        v.push(cfg.block_root());
    }
    v
}

/// The node containers (every list of one rendering runs on every node,
/// and the lists of other renderings name other directories): none has a
/// directory at or inside another's.
#[test]
fn node_containers_keep_to_directories_of_their_own() {
    let node: Vec<(Vec<String>, Vec<PathBuf>)> = lists()
        .into_iter()
        .map(|a| {
            let c = parsed(&a);
            (a, c)
        })
        .filter(|(_, c)| c.mode != Mode::Controller)
        .map(|(a, c)| {
            let d = dirs(&c);
            (a, d)
        })
        .collect();
    assert!(node.len() >= 2, "{node:?}");
    for (i, (a, da)) in node.iter().enumerate() {
        for (b, db) in &node[i + 1..] {
            for x in da {
                for y in db {
                    assert!(
                        !x.starts_with(y) && !y.starts_with(x),
                        "{} of {a:?} and {} of {b:?} overlap",
                        x.display(),
                        y.display()
                    );
                }
            }
        }
    }
}

/// The flags tests/manifests/validate.py knows berth to accept
/// (`BERTH_FLAGS`) are exactly berth's own: a flag missing there made the
/// validator report a correct manifest as wrong (`--nfs-allowed-shares`,
/// `--local-spare-dirs`, `--busy-poll-us` and `--allow-missing-storage`
/// were missing), and one berth no longer has would let a manifest pass
/// that berth refuses.
#[test]
fn the_validators_flag_list_is_berths() {
    use clap::CommandFactory;
    let text = include_str!("manifests/validate.py");
    let start = text
        .find("BERTH_FLAGS = {")
        .expect("BERTH_FLAGS in validate.py");
    let body = &text[start..];
    let body = &body[..body.find('}').expect("end of BERTH_FLAGS")];
    let mut listed: Vec<&str> = body.split('"').skip(1).step_by(2).collect();
    listed.sort_unstable();
    let cmd = Cli::command();
    let mut ours: Vec<&str> = cmd
        .get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|l| !matches!(*l, "help" | "version"))
        .collect();
    ours.sort_unstable();
    assert_eq!(listed, ours);
}
