//! Every argument list the Kubernetes manifests and the Helm chart pass to
//! berth (extracted into tests/manifests/berth-args.json by
//! tests/manifests/validate.sh, which also fails when that file is stale) is
//! accepted by berth's own parser.
use berth::config::Cli;
use clap::Parser;

#[test]
fn manifest_arguments_parse() {
    let text = include_str!("manifests/berth-args.json");
    let lists: Vec<Vec<String>> =
        serde_json::from_str(text).expect("berth-args.json is a JSON list of lists");
    assert!(
        lists.len() >= 3,
        "expected the node, NFS node and controller containers at least"
    );
    for args in &lists {
        let cli =
            Cli::try_parse_from(std::iter::once("berth".to_string()).chain(args.iter().cloned()))
                .unwrap_or_else(|e| panic!("berth rejects {args:?}: {e}"));
        cli.config
            .socket_path()
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        assert!(!cli.config.kinds.is_empty());
    }
}
