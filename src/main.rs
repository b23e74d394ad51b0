//! The `berth` binary.
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use berth::config::{Cli, Command};
use berth::driver::Driver;
use berth::os::Os;
use berth::state::tools::{self, StateTool};

/// `berth state ...`: true when the tool found nothing wrong.
fn run_state_tool(cfg: &berth::config::Config, tool: StateTool) -> anyhow::Result<bool> {
    let os = Os::real();
    let mut out = std::io::stdout().lock();
    let r = match tool {
        StateTool::Check => tools::check(cfg, &os, &mut out),
        StateTool::Export => tools::export(cfg, os.files.as_ref(), &mut out),
        StateTool::Repair => tools::repair(&cfg.state_dir(), os.files.clone()).map(|report| {
            print!("{report}");
            true
        }),
        StateTool::Release { id } => {
            tools::release(&cfg.state_dir(), os.files.clone(), &id).map(|report| {
                print!("{report}");
                true
            })
        }
    };
    r.map_err(|e| anyhow::anyhow!(berth::error::Error::from(e).render()))
}

/// At a clean exit, a log of at least this many bytes is folded into a
/// snapshot (replaying 64 KiB of changes takes about a millisecond; a
/// snapshot of 10,000 volumes is written in a few).
const EXIT_CHECKPOINT_LOG_BYTES: u64 = 64 << 10;

fn main() -> anyhow::Result<()> {
    berth::memory::limit_arenas();
    let cli = Cli::parse();
    let cfg = cli.config;
    berth::logging::init(cfg.log_format, &cfg.log_level).map_err(anyhow::Error::msg)?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Bench(args) => {
            // One thread: the client's own share of a round trip stays
            // small (a multi-threaded runtime hands each call between its
            // workers and tonic's buffer task, which cost 60-80 us of every
            // round trip on 2 cores), so what is measured is the driver.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let code = rt.block_on(berth::bench::run(args))?;
            std::process::exit(code);
        }
        Command::State(args) => {
            let mut cfg = cfg;
            cfg.absolutize(&berth::os::RealFiles)
                .context("resolving the data directories")?;
            let ok = run_state_tool(&cfg, args.tool)?;
            std::process::exit(if ok { 0 } else { 1 });
        }
        Command::Serve => {
            match berth::os::limits::raise_open_files() {
                Ok((before, now)) if before != now => {
                    tracing::debug!(
                        before,
                        now,
                        "soft limit of open files raised to the hard one"
                    )
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "could not raise the soft limit of open files to the hard one")
                }
            }
            let unknown = berth::config::unknown_env_vars(std::env::vars_os().map(|(k, _)| k));
            if !unknown.is_empty() {
                tracing::warn!(
                    variables = %unknown.join(", "),
                    "environment variables named like berth's are none of its flags' and have no effect (misspelt?); README, Flags, lists them"
                );
            }
            // One async thread, as for the bench client: the gRPC framing
            // of a call is microseconds, and every blocking step (syscalls,
            // commands, fsyncs) runs on a blocking thread anyway, so more
            // async workers only added hand-offs between them to each call
            // (interleaved on 2 cores, 8 rounds: 393 against 361 cycles/s
            // one at a time on average, the same at 16 in flight; README,
            // Performance).
            // Nothing may block this thread: handlers do their work through
            // `Driver::run` (`handoff`) or `spawn_blocking`.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let exit_grace = Duration::from_secs(cfg.shutdown_timeout);
            let served = rt.block_on(async move {
                // PID 1 of its container: what its commands leave behind
                // is berth's to wait for (README, State and concurrency).
                if berth::os::command::is_init() {
                    tokio::spawn(berth::os::command::reap_orphans_while_serving());
                }
                let socket = cfg.socket_path().map_err(anyhow::Error::msg)?;
                let metrics_addr = match &cfg.metrics_address {
                    Some(a) => Some(
                        a.parse::<std::net::SocketAddr>()
                            .with_context(|| format!("--metrics-address {a:?} is not host:port"))?,
                    ),
                    None => None,
                };
                let grace = Duration::from_secs(cfg.shutdown_timeout);
                berth::handoff::configure(Duration::from_micros(cfg.busy_poll_us));
                berth::background::configure(true);
                cfg.check_mode_and_kinds().map_err(anyhow::Error::msg)?;
                // Before the driver touches anything: a second berth on a
                // live socket, or an endpoint that is a file, stops here.
                berth::server::refuse_taken_socket(&berth::os::RealFiles, &socket)?;
                if let Some(g) = &cfg.socket_group {
                    berth::server::socket_gid(&berth::os::RealFiles, g)?;
                }
                if let Some(dir) = std::path::absolute(&socket)?.parent() {
                    berth::os::files::check_dir_usable(dir)
                        .map_err(|why| anyhow::anyhow!("the socket's directory: {why}"))?;
                }
                // Bound before the driver touches anything: an address in
                // use stops berth having made nothing. Served once the
                // driver is up (a scrape meanwhile waits).
                let metrics_listener = match metrics_addr {
                    Some(addr) => Some(
                        berth::metrics::bind(addr)
                            .await
                            .with_context(|| format!("binding --metrics-address {addr}"))?,
                    ),
                    None => None,
                };
                // The state is read on a blocking thread; the heap is
                // trimmed of what reading it left a second after start
                // (`trim_when_idle`). Reflection is built on its first call.
                let opening = tokio::task::spawn_blocking(move || Driver::new(cfg, Os::real()));
                let reflection = berth::reflection::routes();
                let driver = opening
                    .await
                    .context("starting the driver")?
                    .map_err(|e| anyhow::anyhow!(e.render()))
                    .context("starting the driver")?;
                if let Some(listener) = metrics_listener {
                    tokio::spawn(berth::metrics::serve(driver.clone(), listener));
                }
                tokio::spawn(berth::memory::trim_when_idle(Duration::from_secs(5)));
                let kept = driver.clone();
                berth::server::serve(
                    driver,
                    socket,
                    berth::server::shutdown_signal(),
                    grace,
                    reflection,
                )
                .await
                .context("serving")?;
                Ok::<_, anyhow::Error>(kept)
            });
            // serve waited --shutdown-timeout for the calls in flight. Any
            // still running (a hung NFS server, a long disk zeroing) are
            // abandoned: their commands are killed and the process exits
            // without waiting for their threads; what they left half done
            // is recorded as intent and reconciled at the next start.
            let left = berth::rpc::in_flight();
            if left > 0 {
                let killed = berth::os::command::kill_running();
                // A copy abandoned now would leave its source's filesystem
                // frozen (every write of its pod waiting) until the next
                // start thaws it.
                let thawed = berth::os::files::thaw_frozen();
                tracing::warn!(
                    in_flight = left,
                    commands_killed = killed,
                    filesystems_thawed = thawed,
                    "exiting with work in flight after --shutdown-timeout; the next start reconciles it"
                );
                rt.shutdown_background();
            } else if let Ok(driver) = &served {
                // What the RPCs left to the background thread is finished
                // (or left to the next start after the grace), and the
                // spare directories are removed.
                driver.before_exit(exit_grace);
                let store = &driver.store;
                // Nothing in flight: the log since the last snapshot is
                // folded into a new one, so the next start reads records
                // without replaying changes (a crash during it leaves the
                // old generation, as any compaction does).
                match store.checkpoint(EXIT_CHECKPOINT_LOG_BYTES) {
                    Ok(true) => tracing::info!("wrote a snapshot of the state for the next start"),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(error = %berth::error::chain(&e), "could not write a snapshot of the state at exit; the next start replays the log")
                    }
                }
            }
            served.map(|_| ())
        }
    }
}
