//! The `berth` binary.
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use berth::config::{Cli, Command};
use berth::driver::Driver;
use berth::os::Os;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let cfg = cli.config;
    berth::logging::init(cfg.log_format, &cfg.log_level).map_err(anyhow::Error::msg)?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(async move {
                let socket = cfg.socket_path().map_err(anyhow::Error::msg)?;
                if let Some(addr) = &cfg.metrics_address {
                    tracing::warn!(%addr, "--metrics-address is not served yet in this version");
                }
                let grace = Duration::from_secs(cfg.shutdown_timeout);
                let driver = Driver::new(cfg, Os::real())
                    .map_err(|e| anyhow::anyhow!(e.render()))
                    .context("starting the driver")?;
                berth::server::serve(driver, socket, berth::server::shutdown_signal(), grace)
                    .await
                    .context("serving")
            })
        }
    }
}
