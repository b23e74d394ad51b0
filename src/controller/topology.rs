//! Where a node-local volume may be created. This controller creates volumes
//! only on its own node (external-provisioner's distributed mode runs one per
//! node), so it answers with the node or RESOURCE_EXHAUSTED:
//! 1. if `requisite` is given, this node must be in it (the spec: the volume
//!    must be accessible from at least one requisite topology), whatever
//!    `preferred` says (a preferred topology outside the requisite ones is
//!    the CO's mistake; a volume here would strand its pod);
//! 2. if `preferred[0]` names a node (the one the scheduler picked under
//!    WaitForFirstConsumer), that node wins: it must be this node;
//! 3. otherwise (no requirements, e.g. Immediate binding) this node.
use crate::csi::v1 as csi;
use crate::error::{Error, Result};

pub fn placement(key: &str, node: &str, req: Option<&csi::TopologyRequirement>) -> Result<()> {
    let Some(req) = req else { return Ok(()) };
    if !satisfies(key, node, Some(req)) {
        return Err(Error::WrongNode(format!(
            "node {node} is not among the requisite topologies"
        )));
    }
    if let Some(n) = req.preferred.first().and_then(|t| t.segments.get(key)) {
        if n != node {
            return Err(Error::WrongNode(format!(
                "the preferred node is {n}; this controller creates volumes only on node {node}"
            )));
        }
    }
    Ok(())
}

/// Whether a volume on `node` satisfies the request's requisite
/// topologies (is accessible from one of them); no requisite, or no
/// requirements, is satisfied by any node. Preferred topologies are only
/// preferences: a volume elsewhere still satisfies the request.
pub fn satisfies(key: &str, node: &str, req: Option<&csi::TopologyRequirement>) -> bool {
    req.is_none_or(|r| {
        r.requisite.is_empty()
            || r.requisite
                .iter()
                .any(|t| t.segments.get(key).map(String::as_str) == Some(node))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::node_topology;

    const K: &str = "topology.berth.csi.io/node";

    fn req(requisite: &[&str], preferred: &[&str]) -> csi::TopologyRequirement {
        csi::TopologyRequirement {
            requisite: requisite.iter().map(|n| node_topology(K, n)).collect(),
            preferred: preferred.iter().map(|n| node_topology(K, n)).collect(),
        }
    }

    #[test]
    fn rules() {
        assert!(placement(K, "a", None).is_ok());
        // WaitForFirstConsumer: selected node first in preferred.
        assert!(placement(K, "a", Some(&req(&["a", "b", "c"], &["a", "b", "c"]))).is_ok());
        assert!(matches!(
            placement(K, "b", Some(&req(&["a", "b", "c"], &["a", "b", "c"]))),
            Err(Error::WrongNode(_))
        ));
        // strict topology: only the selected node.
        assert!(placement(K, "a", Some(&req(&["a"], &["a"]))).is_ok());
        assert!(matches!(
            placement(K, "c", Some(&req(&["a"], &["a"]))),
            Err(Error::WrongNode(_))
        ));
        // requisite only.
        assert!(placement(K, "b", Some(&req(&["a", "b"], &[]))).is_ok());
        assert!(placement(K, "c", Some(&req(&["a", "b"], &[]))).is_err());
        // segments of other keys do not name this node.
        let other = csi::TopologyRequirement {
            requisite: vec![node_topology("zone", "z1")],
            preferred: vec![],
        };
        assert!(placement(K, "a", Some(&other)).is_err());
        assert!(placement(K, "a", Some(&req(&[], &[]))).is_ok());
        // preferred alone: the selected node.
        assert!(placement(K, "a", Some(&req(&[], &["a"]))).is_ok());
        assert!(placement(K, "a", Some(&req(&[], &["b", "a"]))).is_err());
        // a preferred node left out of requisite gets no volume there.
        assert!(placement(K, "a", Some(&req(&["b"], &["a"]))).is_err());
        assert!(placement(K, "a", Some(&req(&["b", "c"], &["a", "b"]))).is_err());
    }

    #[test]
    fn satisfied() {
        assert!(satisfies(K, "a", None));
        assert!(satisfies(K, "a", Some(&req(&[], &["b"]))));
        assert!(satisfies(K, "a", Some(&req(&["b", "a"], &["b"]))));
        assert!(!satisfies(K, "a", Some(&req(&["b"], &["b"]))));
        assert!(!satisfies(
            K,
            "a",
            Some(&csi::TopologyRequirement {
                requisite: vec![node_topology("zone", "a")],
                preferred: vec![],
            })
        ));
    }
}
