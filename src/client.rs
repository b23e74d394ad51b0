//! A CSI client over a unix socket, for the tests, the examples and
//! `berth bench`.
use std::path::Path;

use tonic::transport::{Channel, Endpoint};

use crate::csi::v1::controller_client::ControllerClient;
use crate::csi::v1::identity_client::IdentityClient;
use crate::csi::v1::node_client::NodeClient;

/// Clients of the three CSI services sharing one connection.
#[derive(Clone)]
pub struct CsiClient {
    pub identity: IdentityClient<Channel>,
    pub controller: ControllerClient<Channel>,
    pub node: NodeClient<Channel>,
    pub channel: Channel,
}

/// Connects to `unix://<path>` (or a plain path).
pub async fn connect(endpoint: &str) -> Result<CsiClient, tonic::transport::Error> {
    let path = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
    let path = Path::new(path).to_path_buf();
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let s = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await?;
    Ok(CsiClient {
        identity: IdentityClient::new(channel.clone()),
        controller: ControllerClient::new(channel.clone()),
        node: NodeClient::new(channel.clone()),
        channel,
    })
}
