//! NodeGetInfo: node id, volume limit and this node's topology segment
//! (`topology.<driver-name>/node` = node id) when node-local kinds are served.
use crate::convert::node_topology;
use crate::csi::v1 as csi;
use crate::driver::Driver;

pub fn handle(d: &Driver) -> csi::NodeGetInfoResponse {
    let local = d.kinds().any(|k| k.node_local());
    csi::NodeGetInfoResponse {
        node_id: d.node_id.clone(),
        max_volumes_per_node: d.cfg.max_volumes_per_node,
        accessible_topology: local.then(|| node_topology(&d.topology_key, &d.node_id)),
    }
}
