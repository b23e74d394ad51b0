//! Command line and environment configuration (clap derive; every flag can
//! also be set from the environment variable named in its help).
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::kinds::nfs::allow::AllowedShare;
use crate::state::Kind;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Identity and Controller services.
    Controller,
    /// Identity and Node services.
    Node,
    /// Identity, Controller and Node services.
    All,
}

impl Mode {
    pub fn controller(self) -> bool {
        matches!(self, Mode::Controller | Mode::All)
    }
    pub fn node(self) -> bool {
        matches!(self, Mode::Node | Mode::All)
    }
}

/// What DeleteVolume does to a disk of the disk pool before it is free again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DiskWipe {
    /// Zero the whole disk (BLKZEROOUT: the device's write-zeroes offload
    /// where it has one, else the kernel writes zeros), so the next volume
    /// on it cannot read the last one's data.
    Zero,
    /// Erase the signatures (`wipefs -a`) and zero the sample the pool
    /// looks at (first and last MiB, spaced 4 KiB blocks), so the disk is
    /// offered again: instant, but a raw block user of the disk can read
    /// the previous volume's blocks between the sampled ones.
    Signatures,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "berth",
    version,
    about = "Berth CSI driver: local directory, block and NFS volumes"
)]
pub struct Cli {
    #[command(flatten)]
    pub config: Config,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Serve the CSI services (the default when no subcommand is given).
    Serve,
    /// Benchmark any CSI endpoint (given by --endpoint); the driver's
    /// flags do not apply.
    Bench(crate::bench::BenchArgs),
    /// Operator tools for the state directory: check, export, repair. The
    /// driver's flags (or their environment) come before `state`:
    /// `berth --data-dir /var/lib/berth state check`.
    State(crate::state::tools::StateArgs),
}

/// The most bytes of entries one ListVolumes or ListSnapshots page holds,
/// whatever `max_entries` asks: a gRPC client refuses an answer over 4 MiB
/// by default (grpc-go's and tonic's), and at about 11,000 NFS volumes a
/// ListVolumes without
/// `max_entries` was larger, so the CO's listing (external-attacher,
/// external-health-monitor) failed for good. The rest follows in the next
/// page (`next_token`), as the spec allows: `max_entries` only caps a page.
pub const LIST_PAGE_BYTES: usize = 3 << 20;

#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// CSI endpoint, unix:// only. Default: unix://<data-dir>/csi.sock.
    #[arg(long, env = "CSI_ENDPOINT")]
    pub endpoint: Option<String>,

    /// This node's id. Default: $NODE_ID, then $KUBE_NODE_NAME, then the host name.
    #[arg(long, env = "NODE_ID")]
    pub node_id: Option<String>,

    /// CSI driver name (at most 63 characters, starts and ends with a letter).
    #[arg(long, env = "BERTH_DRIVER_NAME", default_value = "berth.csi.io", value_parser = parse_driver_name)]
    pub driver_name: String,

    /// Which CSI services to serve.
    #[arg(long, env = "BERTH_MODE", value_enum, default_value = "all")]
    pub mode: Mode,

    /// Volume kinds this instance serves (comma separated).
    #[arg(long, env = "BERTH_KINDS", value_delimiter = ',', default_value = "local", value_parser = parse_kind)]
    pub kinds: Vec<Kind>,

    /// Base directory for the defaults of --state-dir, --local-root, --block-root and the endpoint.
    #[arg(long, env = "BERTH_DATA_DIR", default_value = "/var/lib/berth", value_parser = parse_dir)]
    pub data_dir: PathBuf,

    /// Where volume records are kept. Default: <data-dir>/state.
    #[arg(long, env = "BERTH_STATE_DIR", value_parser = parse_dir)]
    pub state_dir: Option<PathBuf>,

    /// Where local directory volumes live. Default: <data-dir>/local.
    #[arg(long, env = "BERTH_LOCAL_ROOT", value_parser = parse_dir)]
    pub local_root: Option<PathBuf>,

    /// Where loop-backed block volume files live. Default: <data-dir>/block.
    #[arg(long, env = "BERTH_BLOCK_ROOT", value_parser = parse_dir)]
    pub block_root: Option<PathBuf>,

    /// Whole disks offered as volumes (device paths or globs, comma separated).
    #[arg(long, env = "BERTH_DISK_POOL", value_delimiter = ',', value_parser = parse_disk_pool_entry)]
    pub disk_pool: Vec<String>,

    /// How DeleteVolume erases a disk of the disk pool before it is free
    /// again.
    #[arg(
        long,
        env = "BERTH_DISK_WIPE",
        value_enum,
        default_value_t = DiskWipe::Zero,
    )]
    pub disk_wipe: DiskWipe,

    /// Seconds every NFS mount and umount may take before its process
    /// group is killed (a dead server); statvfs of NFS volumes waits at most
    /// 5 s or this, if shorter.
    #[arg(
        long,
        env = "BERTH_NFS_TIMEOUT",
        default_value_t = 30,
        value_parser = clap::value_parser!(u64).range(1..=3600),
    )]
    pub nfs_timeout: u64,

    /// NFS exports Berth may use, comma separated: `server:/path` or
    /// `/path` (any server); a share at or below a listed path is allowed.
    /// Empty: any share except `/`, which must be listed explicitly.
    #[arg(long, env = "BERTH_NFS_ALLOWED_SHARES", value_delimiter = ',', value_parser = parse_allowed_share)]
    pub nfs_allowed_shares: Vec<AllowedShare>,

    /// Maximum volumes published on this node (0 = no limit; never
    /// negative, which kubelet cannot put on the node's CSINode).
    #[arg(long, env = "BERTH_MAX_VOLUMES_PER_NODE", default_value_t = 0,
          value_parser = clap::value_parser!(i64).range(0..=i64::from(i32::MAX)))]
    pub max_volumes_per_node: i64,

    /// Group that may use the socket (mode 0660); without it the socket is 0600.
    #[arg(long, env = "BERTH_SOCKET_GROUP")]
    pub socket_group: Option<String>,

    /// Log format.
    #[arg(long, env = "BERTH_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Log level or tracing filter (e.g. info, debug, berth=trace).
    #[arg(long, env = "BERTH_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Address for /metrics and /healthz (off when unset).
    #[arg(long, env = "BERTH_METRICS_ADDRESS")]
    pub metrics_address: Option<String>,

    /// Start even when the local or block root holds none of the volumes
    /// recorded for it (berth refuses by default: the root is the wrong
    /// directory or its filesystem is not mounted yet), or when the state
    /// holds no record of the volumes in the local root (they are then kept
    /// aside). Only when their storage, or records, are gone for good.
    #[arg(long, env = "BERTH_ALLOW_MISSING_STORAGE")]
    pub allow_missing_storage: bool,

    /// Seconds to wait for in-flight calls on SIGTERM/SIGINT before exiting.
    #[arg(long, env = "BERTH_SHUTDOWN_TIMEOUT", default_value_t = 10)]
    pub shutdown_timeout: u64,

    /// Seconds a new connection to the CSI socket may take to send the
    /// HTTP/2 preface (the 24 bytes every gRPC client sends first) before
    /// it is closed.
    #[arg(long, env = "BERTH_PREFACE_TIMEOUT",
          default_value_t = crate::server::PREFACE_TIMEOUT.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub preface_timeout: u64,

    /// Seconds a connection to the CSI socket may send nothing before
    /// berth sends it an HTTP/2 PING.
    #[arg(long, env = "BERTH_KEEPALIVE_INTERVAL",
          default_value_t = crate::server::KEEPALIVE_INTERVAL.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub keepalive_interval: u64,

    /// Seconds berth waits for the answer to that PING before it closes
    /// the connection.
    #[arg(long, env = "BERTH_KEEPALIVE_TIMEOUT",
          default_value_t = crate::server::KEEPALIVE_TIMEOUT.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub keepalive_timeout: u64,

    /// Seconds a write to a connection to the CSI socket may wait for its
    /// client to take any bytes before the connection is closed.
    #[arg(long, env = "BERTH_WRITE_STALL_TIMEOUT",
          default_value_t = crate::server::WRITE_STALL_TIMEOUT.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub write_stall_timeout: u64,

    /// Seconds a call's request may take to arrive whole, from its
    /// headers, before the call is DEADLINE_EXCEEDED.
    #[arg(long, env = "BERTH_REQUEST_ARRIVAL_TIMEOUT",
          default_value_t = crate::server::REQUEST_ARRIVAL_TIMEOUT.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub request_arrival_timeout: u64,

    /// Microseconds a thread may poll instead of sleeping while one request
    /// is served at a time: the operation thread for the next operation,
    /// the RPC for its operation's result (0, the default: never; see
    /// README, "Performance": on two CPUs the polls starved the client now
    /// and then, and a cycle's p99 tripled).
    #[arg(long, env = "BERTH_BUSY_POLL_US", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub busy_poll_us: u64,

    /// New local volumes' directories to keep made and flushed ahead, so
    /// that a CreateVolume waits for its record's write only (0: none; each
    /// create then makes and flushes its own). Start-up removes those left
    /// unused.
    #[arg(long, env = "BERTH_LOCAL_SPARE_DIRS", default_value_t = 16,
          value_parser = clap::value_parser!(u64).range(0..=1024))]
    pub local_spare_dirs: u64,

    /// The most bytes of entries a ListVolumes or ListSnapshots page holds
    /// (`LIST_PAGE_BYTES`). Not a flag: tests lower it
    /// to page a few volumes as many would be.
    #[arg(skip = LIST_PAGE_BYTES)]
    pub list_page_bytes: usize,
}

/// The environment variables among `names` that look like berth's
/// (`BERTH_...`) but are none of its flags' (a misspelt
/// `BERTH_LOCALROOT`, which would leave the default in force without a
/// word). Kubernetes' service links (`BERTH_X_SERVICE_HOST`,
/// `BERTH_X_PORT_80_TCP`, ... of a Service named `berth-x`) are not
/// counted.
pub fn unknown_env_vars(names: impl IntoIterator<Item = std::ffi::OsString>) -> Vec<String> {
    use clap::CommandFactory;
    let cmd = Cli::command();
    let known: Vec<String> = cmd
        .get_arguments()
        .filter_map(|a| a.get_env())
        .filter_map(|e| e.to_str().map(str::to_string))
        .collect();
    let service_link = |n: &str| {
        n.contains("_SERVICE_HOST")
            || n.contains("_SERVICE_PORT")
            || n.ends_with("_PORT")
            || n.contains("_PORT_")
    };
    let mut out: Vec<String> = names
        .into_iter()
        .filter_map(|n| n.into_string().ok())
        .filter(|n| n.starts_with("BERTH_") && !known.contains(n) && !service_link(n))
        .collect();
    out.sort();
    out
}

/// A directory flag's value: not empty, and neither beginning nor ending
/// with white space. Such a value is a quoting slip (`BERTH_LOCAL_ROOT:
/// " "`, `"/var/lib/berth "` in a manifest), and was taken as a directory
/// of that name: a local root `<working directory>/ `, or a second, empty
/// state beside the real one whose volumes then did not exist.
fn parse_dir(s: &str) -> Result<PathBuf, String> {
    if s.trim().is_empty() {
        return Err(format!(
            "{s:?} is empty or only white space: give a directory"
        ));
    }
    if s.trim() != s {
        return Err(format!(
            "{s:?} begins or ends with white space (a quoting slip?): berth would use a directory named so, not {:?}",
            s.trim()
        ));
    }
    Ok(PathBuf::from(s))
}

/// A `--disk-pool` entry: an absolute path, glob or directory (an empty
/// one, as `a,,b` or a trailing comma gives, stands for nothing). A
/// relative entry was taken, then ignored with a warning each time the
/// pool was looked at: the pool stayed empty and its claims Pending.
fn parse_disk_pool_entry(s: &str) -> Result<String, String> {
    let t = s.trim();
    if !t.is_empty() && !t.starts_with('/') {
        return Err(format!(
            "{t:?} is not an absolute path: --disk-pool takes device paths, globs or directories such as /dev/disk/by-id/nvme-*"
        ));
    }
    Ok(s.to_string())
}

fn parse_driver_name(s: &str) -> Result<String, String> {
    crate::validate::driver_name(s).map(|_| s.to_string())
}

fn parse_allowed_share(s: &str) -> Result<AllowedShare, String> {
    AllowedShare::parse(s)
}

fn parse_kind(s: &str) -> Result<Kind, String> {
    Kind::parse(s.trim())
        .ok_or_else(|| format!("unknown volume kind {s:?} (expected local, block or nfs)"))
}

impl Config {
    /// Makes every directory absolute and resolves it as the kernel does
    /// (symlinks, `..`): mount decisions compare the roots with mountinfo,
    /// which shows where a link leads (a `--local-root` or a data
    /// directory named through a symlink made every published volume look
    /// unmounted). Names each kind once (`--kinds local,local` is `local`).
    /// Resolved through `files` (`resolved_fully`): a directory that
    /// cannot be resolved (an error other than "not there yet") is an
    /// error.
    pub fn absolutize(&mut self, files: &dyn crate::os::Files) -> Result<(), crate::os::OsError> {
        let mut seen = Vec::new();
        self.kinds.retain(|k| {
            let new = !seen.contains(k);
            seen.push(*k);
            new
        });
        let resolved = |p: &std::path::Path| {
            let a =
                std::path::absolute(p).map_err(|e| crate::os::OsError::sys("absolute", p, e))?;
            crate::node::paths::resolved_fully(files, &a)
        };
        self.data_dir = resolved(&self.data_dir)?;
        // The defaults under the data directory are resolved too (a
        // `<data-dir>/local` that is itself a link).
        self.state_dir = Some(resolved(&self.state_dir())?);
        self.local_root = Some(resolved(&self.local_root())?);
        self.block_root = Some(resolved(&self.block_root())?);
        Ok(())
    }

    /// `--mode node` serves NFS volumes only: a local or block volume's
    /// record lives in the process that created it (`--mode all` on its
    /// node, in the node DaemonSet), so a node-only process would answer
    /// NOT_FOUND to every node call for one. Refused at start-up instead,
    /// naming what to run (the default `--kinds local` included). So does
    /// `--mode controller`: it would make such volumes where no node's
    /// berth has their records.
    pub fn check_mode_and_kinds(&self) -> Result<(), String> {
        let local: Vec<&str> = self
            .kinds
            .iter()
            .filter(|k| matches!(k, Kind::Local | Kind::Block))
            .map(|k| k.as_str())
            .collect();
        if self.mode == Mode::Node && !local.is_empty() {
            return Err(format!(
                "--mode node serves NFS volumes only (--kinds nfs), not {}: local and block volumes keep their records in the process that creates them, so each node serves them with --mode all (the shipped node DaemonSet does)",
                local.join(", ")
            ));
        }
        if self.mode == Mode::Controller && !local.is_empty() {
            return Err(format!(
                "--mode controller serves NFS volumes only (--kinds nfs), not {}: a local or block volume is made on the node that stages it, by that node's own berth (--mode all, the shipped node DaemonSet), whose records no other process shares; a controller-only berth would make volumes in its own directories that no node can stage",
                local.join(", ")
            ));
        }
        Ok(())
    }

    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("state"))
    }

    pub fn local_root(&self) -> PathBuf {
        self.local_root
            .clone()
            .unwrap_or_else(|| self.data_dir.join("local"))
    }

    pub fn block_root(&self) -> PathBuf {
        self.block_root
            .clone()
            .unwrap_or_else(|| self.data_dir.join("block"))
    }

    /// Berth's directories besides the block root: the state dir and the
    /// local root. No loop device of a file under them is ever a disk of
    /// the pool. (Not the whole data dir: it only holds them by default,
    /// and other files kept there, stand-in disks say, are not Berth's.)
    pub fn own_dirs(&self) -> Vec<PathBuf> {
        vec![self.state_dir(), self.local_root()]
    }

    /// The socket path from --endpoint (unix:// only).
    pub fn socket_path(&self) -> Result<PathBuf, String> {
        let ep = match &self.endpoint {
            Some(e) => e.clone(),
            None => format!("unix://{}", self.data_dir.join("csi.sock").display()),
        };
        if ep.trim() != ep {
            return Err(format!(
                "endpoint {ep:?} begins or ends with white space (a quoting slip?): the socket would be named so, where no client looks"
            ));
        }
        let path = ep
            .strip_prefix("unix://")
            .ok_or_else(|| format!("endpoint {ep:?} must start with unix://"))?;
        // unix:///abs and unix://rel are both seen in the wild.
        let p = PathBuf::from(path);
        if p.as_os_str().is_empty() {
            return Err(format!("endpoint {ep:?} has no path"));
        }
        if p.as_os_str().len() >= 108 {
            return Err(format!("socket path {path:?} is longer than 107 bytes"));
        }
        Ok(p)
    }

    /// The node id: --node-id/$NODE_ID, then $KUBE_NODE_NAME, then the host
    /// name. An empty value given is refused (it never stands for "the
    /// next source"). Where a node-local kind is served the id is this
    /// node's topology value (`topology.<driver-name>/node`, which kubelet
    /// puts on the node as a label), so it must be one
    /// (`validate::topology_value`), wherever it came from.
    pub fn resolved_node_id(&self) -> Result<String, String> {
        let (id, from) = match &self.node_id {
            Some(n) if n.is_empty() => {
                return Err("the node id given by --node-id (or $NODE_ID) is empty: give this node's id, or leave both unset to use $KUBE_NODE_NAME or else the host name".into())
            }
            Some(n) => (n.clone(), "--node-id (or $NODE_ID)"),
            None => match std::env::var_os("KUBE_NODE_NAME") {
                Some(n) if n.is_empty() => {
                    return Err("$KUBE_NODE_NAME is set but empty, and no --node-id (or $NODE_ID) is given: give this node's id with --node-id or $NODE_ID".into())
                }
                Some(n) => (
                    n.into_string()
                        .map_err(|n| format!("$KUBE_NODE_NAME {n:?} is not UTF-8: give this node's id with --node-id or $NODE_ID"))?,
                    "$KUBE_NODE_NAME",
                ),
                None => (
                    nix::unistd::gethostname()
                        .map_err(|e| format!("no node id given and no host name: {e}"))?
                        .to_string_lossy()
                        .into_owned(),
                    "the host name (no --node-id, $NODE_ID or $KUBE_NODE_NAME given)",
                ),
            },
        };
        crate::validate::node_id(&id)
            .map_err(|e| format!("the node id {id:?} from {from}: {}", e.render()))?;
        if self
            .kinds
            .iter()
            .any(|k| matches!(k, Kind::Local | Kind::Block))
        {
            crate::validate::topology_value(&id).map_err(|why| {
                format!(
                    "the node id {id:?} from {from} cannot be this node's topology value ({}=<node id>, served for local and block volumes; kubelet puts it on the node as a label): {why}. Pass a valid one explicitly with --node-id or $NODE_ID, unique to this node{}",
                    self.topology_key(),
                    if id.len() > crate::validate::MAX_TOPOLOGY_VALUE {
                        " (a Kubernetes node name may be up to 253 characters, a topology value only 63: where the node name is longer, give the node a shorter id of its own; it need not be the node name)"
                    } else {
                        ""
                    }
                )
            })?;
        }
        Ok(id)
    }

    /// The topology key this driver reports: topology.<driver-name>/node.
    pub fn topology_key(&self) -> String {
        format!("topology.{}/node", self.driver_name)
    }

    pub fn serves(&self, kind: Kind) -> bool {
        self.kinds.contains(&kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("berth").chain(args.iter().copied()))
    }

    #[test]
    fn defaults() {
        let c = parse(&[]).unwrap().config;
        assert_eq!(c.mode, Mode::All);
        assert_eq!(c.driver_name, "berth.csi.io");
        assert_eq!(c.state_dir(), PathBuf::from("/var/lib/berth/state"));
        assert_eq!(c.kinds, vec![Kind::Local]);
    }

    #[test]
    fn endpoint_rules() {
        let c = parse(&["--endpoint", "unix:///tmp/x.sock"]).unwrap().config;
        assert_eq!(c.socket_path().unwrap(), PathBuf::from("/tmp/x.sock"));
        let c = parse(&["--endpoint", "tcp://1.2.3.4:5"]).unwrap().config;
        assert!(c.socket_path().is_err());
        let long = format!("unix:///{}", "a".repeat(120));
        let c = parse(&["--endpoint", &long]).unwrap().config;
        assert!(c.socket_path().is_err());
    }

    #[test]
    fn driver_name_is_validated() {
        assert!(parse(&["--driver-name", "9bad"]).is_err());
        assert!(parse(&["--driver-name", "local.berth.csi.io"]).is_ok());
    }

    #[test]
    fn kinds_and_modes() {
        assert!(parse(&["--kinds", "local"]).is_ok());
        assert!(parse(&["--kinds", "tape"]).is_err());
        assert_eq!(
            parse(&["--kinds", "local,block,nfs"]).unwrap().config.kinds,
            vec![Kind::Local, Kind::Block, Kind::Nfs]
        );
        assert!(parse(&["--mode", "node"]).is_ok());
        let check = |args: &[&str]| parse(args).unwrap().config.check_mode_and_kinds();
        // The default kind (local) and any node-local kind: refused.
        for args in [
            &["--mode", "node"][..],
            &["--mode", "node", "--kinds", "nfs,block"],
            &["--mode", "node", "--kinds", "local"],
        ] {
            let e = check(args).unwrap_err();
            assert!(e.contains("--mode all"), "{args:?}: {e}");
        }
        assert!(check(&["--mode", "node", "--kinds", "nfs"]).is_ok());
        assert!(check(&["--mode", "all"]).is_ok());
        // A controller-only berth with a node-local kind (the default
        // one included) makes volumes no node's berth can stage: refused.
        for args in [
            &["--mode", "controller"][..],
            &["--mode", "controller", "--kinds", "local,nfs"],
            &["--mode", "controller", "--kinds", "block"],
        ] {
            let e = check(args).unwrap_err();
            assert!(
                e.contains("--mode all") && e.contains("--kinds nfs"),
                "{args:?}: {e}"
            );
        }
        assert!(check(&["--mode", "controller", "--kinds", "nfs"]).is_ok());
        assert!(parse(&["--mode", "both"]).is_err());
        let mut c = parse(&["--kinds", "local,block,local"]).unwrap().config;
        c.absolutize(&crate::os::RealFiles).unwrap();
        assert_eq!(c.kinds, vec![Kind::Local, Kind::Block]);
    }

    /// Where local or block volumes are served the node id is the
    /// topology value; from the flag, the environment or the host name
    /// alike, one that is not a valid value is refused, as is an empty
    /// one. NFS-only instances report no topology: the id's own limit
    /// applies there.
    #[test]
    fn node_ids() {
        let id = |args: &[&str]| parse(args).unwrap().config.resolved_node_id();
        assert_eq!(id(&["--node-id", "node-1"]).unwrap(), "node-1");
        let max = "a".repeat(63);
        assert_eq!(id(&["--node-id", &max]).unwrap(), max);
        for bad in ["bad/node", "node 1", "-node", "node.", "nöde"] {
            let e = id(&[&format!("--node-id={bad}")]).unwrap_err();
            assert!(
                e.contains("topology value") && e.contains("--node-id"),
                "{bad}: {e}"
            );
        }
        let long = "x".repeat(100);
        let e = id(&["--node-id", &long]).unwrap_err();
        assert!(e.contains("63") && e.contains("253"), "{e}");
        let e = id(&["--node-id", ""]).unwrap_err();
        assert!(e.contains("empty"), "{e}");
        for k in ["block", "local,nfs"] {
            assert!(id(&["--kinds", k, "--node-id", "bad/node"]).is_err(), "{k}");
        }
        assert_eq!(
            id(&["--kinds", "nfs", "--node-id", &long]).unwrap(),
            long,
            "no topology: the node id's own limit"
        );
        assert!(id(&["--kinds", "nfs", "--node-id", &"x".repeat(129)]).is_err());
        assert!(id(&["--kinds", "nfs", "--node-id", ""]).is_err());
    }

    #[test]
    fn nfs_timeout() {
        assert_eq!(parse(&[]).unwrap().config.nfs_timeout, 30);
        assert_eq!(
            parse(&["--nfs-timeout", "5"]).unwrap().config.nfs_timeout,
            5
        );
        assert!(parse(&["--nfs-timeout", "0"]).is_err());
        assert!(parse(&["--nfs-timeout", "x"]).is_err());
    }

    #[test]
    fn busy_poll() {
        assert_eq!(parse(&[]).unwrap().config.busy_poll_us, 0);
        for ok in ["0", "10000"] {
            assert_eq!(
                parse(&["--busy-poll-us", ok]).unwrap().config.busy_poll_us,
                ok.parse::<u64>().unwrap()
            );
        }
        for bad in ["10001", "-1", "x"] {
            assert!(parse(&["--busy-poll-us", bad]).is_err(), "{bad}");
        }
    }

    /// The CSI socket's connection bounds: the defaults are the server's
    /// constants, each flag sets its own bound, and
    /// zero (no bound: hyper would wait for ever), a negative value or one
    /// over an hour is refused.
    #[test]
    fn connection_bounds() {
        use crate::server::Bounds;
        use std::time::Duration;
        assert_eq!(Bounds::of(&parse(&[]).unwrap().config), Bounds::default());
        assert_eq!(
            Bounds::default(),
            Bounds {
                preface: Duration::from_secs(10),
                keepalive_interval: Duration::from_secs(10),
                keepalive_timeout: Duration::from_secs(10),
                write_stall: Duration::from_secs(20),
                request_arrival: Duration::from_secs(10),
            }
        );
        let b = Bounds::of(
            &parse(&[
                "--preface-timeout=1",
                "--keepalive-interval=2",
                "--keepalive-timeout=3",
                "--write-stall-timeout=4",
                "--request-arrival-timeout=3600",
            ])
            .unwrap()
            .config,
        );
        assert_eq!(
            b,
            Bounds {
                preface: Duration::from_secs(1),
                keepalive_interval: Duration::from_secs(2),
                keepalive_timeout: Duration::from_secs(3),
                write_stall: Duration::from_secs(4),
                request_arrival: Duration::from_secs(3600),
            }
        );
        for flag in [
            "preface-timeout",
            "keepalive-interval",
            "keepalive-timeout",
            "write-stall-timeout",
            "request-arrival-timeout",
        ] {
            for bad in ["0", "-1", "3601", "1.5", "x"] {
                assert!(
                    parse(&[&format!("--{flag}={bad}")]).is_err(),
                    "--{flag}={bad}"
                );
            }
        }
    }

    /// A negative limit was taken (NodeGetInfo reported it to kubelet,
    /// ControllerPublishVolume took it for no limit); so was one above
    /// what a CSINode's count holds (int32).
    #[test]
    fn max_volumes_per_node() {
        assert_eq!(parse(&[]).unwrap().config.max_volumes_per_node, 0);
        for ok in ["0", "1", "2147483647"] {
            assert_eq!(
                parse(&[&format!("--max-volumes-per-node={ok}")])
                    .unwrap()
                    .config
                    .max_volumes_per_node,
                ok.parse::<i64>().unwrap()
            );
        }
        for bad in ["-1", "-5", "2147483648", "x"] {
            assert!(
                parse(&[&format!("--max-volumes-per-node={bad}")]).is_err(),
                "{bad}"
            );
        }
    }

    /// A misspelt variable is named; berth's own, Kubernetes' service
    /// links and other programs' variables are not.
    #[test]
    fn unknown_env_vars_are_named() {
        let names = [
            "BERTH_LOCALROOT",
            "BERTH_LOCAL_ROOT",
            "BERTH_ALLOW_MISSING_STORAGE",
            "BERTH_KIND",
            "BERTH_METRICS_SERVICE_HOST",
            "BERTH_METRICS_PORT",
            "BERTH_METRICS_PORT_9810_TCP_ADDR",
            "CSI_ENDPOINT",
            "PATH",
        ]
        .map(std::ffi::OsString::from);
        assert_eq!(
            unknown_env_vars(names),
            ["BERTH_KIND".to_string(), "BERTH_LOCALROOT".to_string()]
        );
    }

    /// Every flag of the driver can come from the environment, and the
    /// README's flag table names each flag with its variable.
    #[test]
    fn every_flag_has_an_environment_variable_in_the_readme() {
        use clap::CommandFactory;
        let readme = include_str!("../README.md");
        let cmd = Cli::command();
        let mut seen = 0;
        for a in cmd.get_arguments() {
            let Some(long) = a.get_long() else { continue };
            if matches!(long, "help" | "version") {
                continue;
            }
            let env = a
                .get_env()
                .and_then(|e| e.to_str())
                .unwrap_or_else(|| panic!("--{long} has no environment variable"));
            let row = format!("| `--{long}` | `{env}`");
            assert!(readme.contains(&row), "README has no row {row:?}");
            seen += 1;
        }
        assert!(seen >= 20, "{seen}");
    }

    #[test]
    fn disk_pool_entries_are_absolute() {
        let c = parse(&["--disk-pool", "/dev/sdb,/dev/disk/by-id/nvme-*,"])
            .unwrap()
            .config;
        assert_eq!(c.disk_pool.len(), 3);
        for bad in ["dev/sdb", "/dev/sdb,sdc", "./disks", "*"] {
            let e = parse(&["--disk-pool", bad]).unwrap_err().to_string();
            assert!(e.contains("absolute"), "{bad}: {e}");
        }
    }

    #[test]
    fn nfs_allowed_shares() {
        assert!(parse(&[]).unwrap().config.nfs_allowed_shares.is_empty());
        let c = parse(&["--nfs-allowed-shares", "h:/e,/data"])
            .unwrap()
            .config;
        assert_eq!(c.nfs_allowed_shares.len(), 2);
        assert!(parse(&["--nfs-allowed-shares", "h:e"]).is_err());
    }
}
