//! The gRPC server on a unix socket: private socket creation, the services
//! for the chosen mode, reflection, and graceful shutdown on SIGTERM/SIGINT
//! within a bound.
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error as ThisError;
use tokio::net::UnixListener;

use crate::controller::ControllerService;
use crate::csi::v1 as csi;
use crate::driver::Driver;
use crate::identity::IdentityService;
use crate::node::NodeService;
use crate::os::{Files, OsError};

#[derive(Debug, ThisError)]
pub enum ServeError {
    #[error("{0}")]
    Config(String),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("gRPC server")]
    Transport(#[from] tonic::transport::Error),
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> ServeError {
    move |source| ServeError::Io { context, source }
}

/// Refuses a socket path berth must not take, before anything else is
/// touched at start-up (and again when binding): one where a server answers
/// (another process serves there, a second berth: its socket is never taken
/// away from it), and one that exists and is not a socket (a file or a
/// symlink the endpoint was pointed at by mistake: never replaced). A
/// socket nobody answers on is a leftover of a process that died; it is
/// replaced when binding.
pub fn refuse_taken_socket(files: &dyn Files, path: &Path) -> Result<(), ServeError> {
    leftover_socket(files, path).map(|_| ())
}

/// `refuse_taken_socket`'s look at `path`: the device and inode of the
/// socket nobody answers on there, if there is one.
fn leftover_socket(files: &dyn Files, path: &Path) -> Result<Option<(u64, u64)>, ServeError> {
    match files.lstat(path).map_err(OsError::into_io) {
        Ok(m) if m.file_type().is_socket() => match files.socket_answers(path) {
            Ok(true) => Err(ServeError::Config(format!(
                "another process is serving on {}; refusing to start (two drivers on one socket)",
                path.display()
            ))),
            Ok(false) => Ok(Some((m.dev(), m.ino()))),
            Err(e) => Err(io(format!("connecting to {}", path.display()))(e)),
        },
        Ok(_) => Err(ServeError::Config(format!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(format!("inspecting {}", path.display()))(e)),
    }
}

/// The group `--socket-group` names (a gid, or a group name looked up
/// now, through `files`). Resolved at start-up before the driver touches
/// anything, so that a group that does not exist, or cannot be looked up,
/// stops berth having made nothing.
pub fn socket_gid(files: &dyn Files, group: &str) -> Result<nix::unistd::Gid, ServeError> {
    match group.parse::<u32>() {
        Ok(n) => Ok(nix::unistd::Gid::from_raw(n)),
        Err(_) => files
            .group_id(group)
            .map_err(|e| {
                ServeError::Config(format!(
                    "--socket-group: looking up group {group:?}: {}",
                    crate::error::chain(&e)
                ))
            })?
            .map(nix::unistd::Gid::from_raw)
            .ok_or_else(|| {
                ServeError::Config(format!("--socket-group: group {group:?} does not exist"))
            }),
    }
}

/// Binds the socket with mode 0600 (0660 and the group's ownership when
/// `group` is given). An existing path is removed only if it is a socket
/// that nobody answers on, and a socket placed at the path meanwhile (a
/// second berth starting at the same moment) is never replaced: berth
/// refuses to start. Every look and change at the path goes through
/// `files`.
pub fn bind_socket(
    files: &dyn Files,
    path: &Path,
    group: Option<&str>,
) -> Result<UnixListener, ServeError> {
    // Only the leftover found here, never what is at the path by the time
    // it is removed: a berth starting at the same moment may have placed
    // its socket there since (before, a second look at the path took that
    // live socket for the leftover, and removed it).
    let leftover = leftover_socket(files, path)?;
    // The leftover looked at again just before its removal: a look that
    // fails otherwise than ENOENT is a doubt, which stops the bind (it
    // read as "not the leftover": nothing was removed, and the bind then
    // failed, blaming another process).
    let still = match leftover {
        None => false,
        Some(id) => crate::os::files::lstat_present(files, path)
            .map_err(|e| io(format!("inspecting {}", path.display()))(e.into_io()))?
            .is_some_and(|m| (m.dev(), m.ino()) == id),
    };
    if still {
        // Gone already when another berth starting now removed it first.
        match files.remove_file(path) {
            Err(e) if e.errno() != Some(libc::ENOENT) => {
                return Err(io(format!("removing old socket {}", path.display()))(
                    e.into_io(),
                ))
            }
            _ => {}
        }
    }
    if let Some(parent) = path.parent() {
        crate::os::files::create_dir_all(files, parent)
            .map_err(|e| io(format!("creating {}", parent.display()))(e.into_io()))?;
    }
    // Bound and listening under a temporary name in the same directory,
    // then renamed into place: the socket's name appears only once it
    // accepts. Bound at its name, it existed between bind(2) and listen(2),
    // and a client that saw it there (kubelet's plugin watcher, the
    // node-driver-registrar, a script waiting for the file) was refused
    // (ECONNREFUSED). A path too long for a temporary name beside it is
    // bound in place.
    let tmp = temporary_name(path);
    let at = tmp.as_deref().unwrap_or(path);
    // The socket file is created with the umask's mode; `Files::bind_socket`
    // makes it private from the first moment (umask 0177), so nobody can
    // connect before the chmod below.
    let std_listener = files
        .bind_socket(at)
        .map_err(|e| io(format!("binding {}", at.display()))(e.into_io()))?;
    let shared = match group {
        Some(g) => socket_gid(files, g).and_then(|gid| {
            files
                .set_group(at, gid.as_raw())
                .map_err(|e| io(format!("chown {}", at.display()))(e.into_io()))?;
            files
                .set_mode(at, 0o660)
                .map_err(|e| io(format!("chmod {}", at.display()))(e.into_io()))
        }),
        None => Ok(()),
    };
    let placed = shared.and_then(|()| match &tmp {
        // Never over what is there now: the path was checked free above,
        // but another berth may have placed its socket since (rename(2)
        // replaced it, and both served, the first where nobody reached
        // it). A bind in place (no temporary name) fails there already.
        Some(t) => files.rename_noreplace(t, path).map_err(|e| match e.errno() {
            Some(libc::EEXIST) => ServeError::Config(format!(
                "another process placed a socket at {} while berth was binding it; refusing to start (two drivers on one socket)",
                path.display()
            )),
            _ => io(format!(
                "moving the socket {} to {}",
                t.display(),
                path.display()
            ))(e.into_io()),
        }),
        None => Ok(()),
    });
    if let Err(e) = placed {
        // Not left behind: the socket this call made and nobody serves.
        let _ = files.remove_file(at);
        return Err(e);
    }
    std_listener
        .set_nonblocking(true)
        .map_err(io("socket non-blocking".into()))?;
    UnixListener::from_std(std_listener).map_err(io("registering socket".into()))
}

/// A name for the socket `path` to be bound at before it is renamed into
/// place: beside it, unique to this process and call; None when it would
/// be longer than a unix socket's address allows (108 bytes with its NUL).
fn temporary_name(path: &Path) -> Option<PathBuf> {
    static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!(".berth-{}-{n}.sock", std::process::id());
    let tmp = path.with_file_name(name);
    (tmp.as_os_str().len() < 108).then_some(tmp)
}

/// Serves until `shutdown` completes, then waits at most `grace` for calls
/// in flight and their answers (`ANSWER_GRACE`), and removes the socket.
pub async fn serve(
    driver: Arc<Driver>,
    socket: PathBuf,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    grace: Duration,
    reflection: tonic::service::Routes,
) -> Result<(), ServeError> {
    let files = driver.os.files.clone();
    let listener = bind_socket(files.as_ref(), &socket, driver.cfg.socket_group.as_deref())?;
    let bound = files
        .lstat(&socket)
        .map(|m| (m.dev(), m.ino()))
        .map_err(|e| io(format!("inspecting {}", socket.display()))(e.into_io()))?;

    // Work that may wait for an NFS server runs once the socket is up.
    driver.start();
    let mode = driver.cfg.mode;
    let bounds = Bounds::of(&driver.cfg);
    let arrival = bounds.request_arrival;
    let mut router = tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .http2_keepalive_interval(Some(bounds.keepalive_interval))
        .http2_keepalive_timeout(Some(bounds.keepalive_timeout))
        .layer(tower::util::MapRequestLayer::new(
            move |req: tonic::codegen::http::Request<tonic::body::Body>| {
                budget_request_body(req, arrival)
            },
        ))
        .add_routes(reflection)
        .add_service(csi::identity_server::IdentityServer::new(IdentityService {
            driver: driver.clone(),
        }));
    if mode.controller() {
        router = router.add_service(csi::controller_server::ControllerServer::new(
            ControllerService {
                driver: driver.clone(),
            },
        ));
    }
    if mode.node() {
        router = router.add_service(csi::node_server::NodeServer::new(NodeService {
            driver: driver.clone(),
        }));
    }
    tracing::info!(
        socket = %socket.display(),
        driver = %driver.cfg.driver_name,
        node = %driver.node_id,
        mode = ?mode,
        volumes = driver.store.len(),
        "serving CSI"
    );
    // What is left half done (a delete whose disk was missing, a busy
    // mount) is retried without waiting for a restart.
    let retry = {
        let d = driver.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(crate::driver::RETRY_INTERVAL).await;
                // Off the async thread: it walks every record, and removes
                // what is left of a local snapshot in place.
                let d = d.clone();
                let _ = tokio::task::spawn_blocking(move || d.retry_pending(false)).await;
            }
        })
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    // A waiting RPC polls for its result only while no client has sent
    // anything on these sockets (`handoff`).
    crate::handoff::watch(&listener);
    let cap = connection_limit(crate::os::limits::open_files().unwrap_or(1024));
    let incoming = Incoming::new(listener, cap, bounds);
    let server = router.serve_with_incoming_shutdown(incoming, async move {
        shutdown.await;
        let _ = stop_tx.send(());
    });
    tokio::pin!(server);
    let result = tokio::select! {
        r = &mut server => r.map_err(ServeError::from),
        drained = async {
            let _ = stop_rx.await;
            // The work in flight first: a connection closes only once its
            // client has read its answers and the GOAWAY (an idle sidecar
            // does at once, but one that does not read would hold the
            // whole grace period).
            let deadline = tokio::time::Instant::now() + grace;
            while crate::rpc::in_flight() > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (crate::rpc::in_flight() == 0, deadline)
        } => {
            let (drained, deadline) = drained;
            if drained {
                // The calls are done, but their answers may still be on
                // their way out: each connection's task writes them, and
                // only while this thread serves (a large answer waits for
                // the client to open its flow-control window). Each
                // connection closes once its answers are out and its
                // client has seen the GOAWAY (the server finishes then),
                // for at most ANSWER_GRACE (within the grace).
                let until = deadline.min(tokio::time::Instant::now() + ANSWER_GRACE);
                match tokio::time::timeout_at(until, &mut server).await {
                    Ok(r) => r.map_err(ServeError::from),
                    Err(_) => {
                        tracing::info!(wait_ms = ANSWER_GRACE.as_millis() as u64, "client connections still open after the calls were answered; exiting");
                        Ok(())
                    }
                }
            } else {
                tracing::warn!(grace_secs = grace.as_secs(), in_flight = crate::rpc::in_flight(), "work still in flight after the shutdown grace period; exiting");
                Ok(())
            }
        }
    };
    retry.abort();
    // Only our own socket: a path replaced meanwhile belongs to someone else.
    if files
        .lstat(&socket)
        .is_ok_and(|m| (m.dev(), m.ino()) == bound)
    {
        let _ = files.remove_file(&socket);
    }
    tracing::info!("stopped");
    result
}

/// How long SIGTERM waits, once no work is in flight, for the answers to
/// go out and the clients' connections to close (within the grace):
/// clients that read close theirs in milliseconds.
pub const ANSWER_GRACE: Duration = Duration::from_secs(2);

/// How long accepting pauses after it failed (`EMFILE`: every file
/// descriptor in use).
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The most connections to the CSI socket berth holds at once.
pub const MAX_CONNECTIONS: usize = 4096;

/// The connections berth holds at once with a soft limit of `open_files`
/// descriptors: half of them, at most `MAX_CONNECTIONS` (a node's kubelet
/// and sidecars use a handful). The other half is left to the work: the
/// journal, the commands' pipes, the disks claimed, the mounts' files.
pub fn connection_limit(open_files: u64) -> usize {
    ((open_files / 2) as usize).clamp(1, MAX_CONNECTIONS)
}

/// The connections accepted on the CSI socket, each watched by `handoff`.
/// A failed accept is logged and the next is tried after
/// `ACCEPT_BACKOFF`, never at once: tonic retries a failed accept at once,
/// and one that fails for want of file descriptors fails again at once
/// while the connection waits in the backlog, so the one async thread spun
/// (60% of a core and more, measured) for as long as they were short.
///
/// At most `cap` connections are held (`connection_limit`): with `cap`
/// open, the one whose client has been silent longest is closed before
/// the next is accepted.
/// Before, every connection that had sent the HTTP/2 preface was held for
/// as long as its client kept it open: enough of them (a client that
/// opens connections and never closes them) took every descriptor, and
/// then no new client could connect (Probe timed out) and calls on the
/// connections already open failed for want of descriptors (a
/// CreateVolume: INTERNAL).
struct Incoming {
    listener: UnixListener,
    paused: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// Failed accepts in a row (logged at the first, then every 100th).
    failures: u64,
    /// The connections accepted (those dropped since are dead entries,
    /// pruned when the limit is reached).
    open: Vec<std::sync::Weak<Heard>>,
    cap: usize,
    /// Connections closed to make room (logged at the first, then every
    /// 100th).
    closed: u64,
    /// The preface and write stall bounds of each connection.
    bounds: Bounds,
}

impl Incoming {
    fn new(listener: UnixListener, cap: usize, bounds: Bounds) -> Incoming {
        Incoming {
            listener,
            paused: None,
            failures: 0,
            open: Vec::new(),
            cap,
            closed: 0,
            bounds,
        }
    }

    /// Whether there is room for one more connection (fewer than `cap`
    /// open). When there is none, the one whose client has been silent
    /// longest is told to close (unless one is closing already): its task
    /// drops it in a moment.
    fn room(&mut self) -> bool {
        use std::sync::atomic::Ordering;
        if self.open.len() < self.cap {
            return true;
        }
        self.open.retain(|w| w.strong_count() > 0);
        if self.open.len() < self.cap {
            return true;
        }
        let live: Vec<std::sync::Arc<Heard>> = self
            .open
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .collect();
        if live.iter().any(|h| h.closing.load(Ordering::Relaxed)) {
            return false;
        }
        if let Some(oldest) = live.iter().min_by_key(|h| h.last.load(Ordering::Relaxed)) {
            if self.closed % 100 == 0 {
                tracing::warn!(
                    limit = self.cap,
                    closed = self.closed + 1,
                    "connections to the CSI socket at their limit; closing the one whose client has been silent longest"
                );
            }
            self.closed += 1;
            oldest.close();
        }
        false
    }
}

/// How long accepting waits for a connection told to close to be gone.
const ROOM_WAIT: Duration = Duration::from_millis(1);

/// Milliseconds since the first call (the clock of `Heard::last`).
fn now_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    EPOCH
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// What `Incoming` knows of a connection it accepted: when its client
/// last sent anything, and whether it was told to close.
struct Heard {
    last: std::sync::atomic::AtomicU64,
    closing: std::sync::atomic::AtomicBool,
    /// The connection's task, woken to close it.
    waker: std::sync::Mutex<Option<std::task::Waker>>,
}

impl Heard {
    fn close(&self) {
        self.closing
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(w) = self.waker.lock().ok().and_then(|mut w| w.take()) {
            w.wake();
        }
    }
}

impl tokio_stream::Stream for Incoming {
    type Item = std::io::Result<Conn>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        loop {
            if let Some(p) = self.paused.as_mut() {
                if std::future::Future::poll(p.as_mut(), cx).is_pending() {
                    return Poll::Pending;
                }
                self.paused = None;
            }
            if !self.room() {
                self.paused = Some(Box::pin(tokio::time::sleep(ROOM_WAIT)));
                continue;
            }
            match self.listener.poll_accept(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok((c, _))) => {
                    if self.failures > 0 {
                        tracing::info!(failures = self.failures, "accepting connections again");
                        self.failures = 0;
                    }
                    crate::handoff::watch(&c);
                    let conn = Conn::new(c, &self.bounds);
                    self.open.push(std::sync::Arc::downgrade(&conn.heard));
                    return Poll::Ready(Some(Ok(conn)));
                }
                Poll::Ready(Err(e)) => {
                    if self.failures % 100 == 0 {
                        tracing::warn!(error = %e, failures = self.failures + 1, "accepting a connection failed; retrying in 100 ms");
                    }
                    self.failures += 1;
                    self.paused = Some(Box::pin(tokio::time::sleep(ACCEPT_BACKOFF)));
                }
            }
        }
    }
}

/// The time bounds of the connections to the CSI socket and of their
/// calls' requests: `--preface-timeout`, `--keepalive-interval`,
/// `--keepalive-timeout`, `--write-stall-timeout` and
/// `--request-arrival-timeout` (seconds each), whose defaults are
/// `PREFACE_TIMEOUT`, `KEEPALIVE_INTERVAL`, `KEEPALIVE_TIMEOUT`,
/// `WRITE_STALL_TIMEOUT` and `REQUEST_ARRIVAL_TIMEOUT`. Before
/// 2026-12-07 they were fixed, and the tests of each waited for the
/// whole default (45 s of CI's critical path for the keep-alive's alone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub preface: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    pub write_stall: Duration,
    pub request_arrival: Duration,
}

impl Default for Bounds {
    fn default() -> Bounds {
        Bounds {
            preface: PREFACE_TIMEOUT,
            keepalive_interval: KEEPALIVE_INTERVAL,
            keepalive_timeout: KEEPALIVE_TIMEOUT,
            write_stall: WRITE_STALL_TIMEOUT,
            request_arrival: REQUEST_ARRIVAL_TIMEOUT,
        }
    }
}

impl Bounds {
    /// The bounds `cfg`'s flags give.
    pub fn of(cfg: &crate::config::Config) -> Bounds {
        Bounds {
            preface: Duration::from_secs(cfg.preface_timeout),
            keepalive_interval: Duration::from_secs(cfg.keepalive_interval),
            keepalive_timeout: Duration::from_secs(cfg.keepalive_timeout),
            write_stall: Duration::from_secs(cfg.write_stall_timeout),
            request_arrival: Duration::from_secs(cfg.request_arrival_timeout),
        }
    }
}

/// How long a new connection to the CSI socket may take to send the
/// HTTP/2 preface (the 24 bytes every gRPC client sends first, at once),
/// by default (`--preface-timeout`).
pub const PREFACE_TIMEOUT: Duration = Duration::from_secs(10);

/// The bytes of the HTTP/2 client preface.
const PREFACE_LEN: usize = 24;

/// How long a connection to the CSI socket may go without sending
/// anything before berth sends it an HTTP/2 PING (which every HTTP/2
/// client's stack answers, whatever its calls are doing: a kubelet
/// waiting 2 minutes for a NodeStageVolume answers it too), by default
/// (`--keepalive-interval`).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// How long berth waits for the answer to that PING; a connection that
/// has not answered by then is closed (hyper's keep-alive), and what it
/// held (its calls' answers not yet taken, its descriptor) is given back;
/// by default (`--keepalive-timeout`).
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a write to a connection may wait for its client to take any
/// bytes (the socket's buffer full all along) before the connection is
/// closed: a client's HTTP/2 stack reads its socket whenever bytes come,
/// whatever its calls do with them (flow control keeps the answers it has
/// not asked for yet on berth's side), so one that took nothing for this
/// long is stopped or gone. Without it, a connection whose client stopped
/// reading was never closed: its keep-alive timed out, but hyper then
/// waits to write its GOAWAY, for ever. By default
/// (`--write-stall-timeout`).
pub const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(20);

/// An accepted connection that is closed (a read error) when it has not
/// sent the HTTP/2 preface within `Bounds::preface`: hyper waits for it
/// without a bound, so a connection that sent nothing, or part of it,
/// held its file descriptor and about 17 KiB for ever (enough of them took
/// every descriptor, and then nobody could connect).
///
/// A connection `Incoming` closes to make room fails its next read or
/// write, and hyper drops it.
pub struct Conn {
    io: tokio::net::UnixStream,
    /// Until the preface is in: its deadline and the bytes read so far.
    preface: Option<(std::pin::Pin<Box<tokio::time::Sleep>>, usize)>,
    heard: std::sync::Arc<Heard>,
    /// Since a write has been waiting for the client to take bytes: its
    /// `write_stall` deadline (made only once a write has had to wait).
    stall: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// How long writes may wait for the client to take any bytes
    /// (`Bounds::write_stall`).
    write_stall: Duration,
    /// The waker last handed to `heard` (`closed`).
    given: Option<std::task::Waker>,
}

impl Conn {
    fn new(io: tokio::net::UnixStream, bounds: &Bounds) -> Conn {
        Conn {
            io,
            preface: Some((Box::pin(tokio::time::sleep(bounds.preface)), 0)),
            heard: std::sync::Arc::new(Heard {
                last: std::sync::atomic::AtomicU64::new(now_ms()),
                closing: std::sync::atomic::AtomicBool::new(false),
                waker: std::sync::Mutex::new(None),
            }),
            stall: None,
            write_stall: bounds.write_stall,
            given: None,
        }
    }

    /// `r`, the result of a write (or flush) to the socket; an error once
    /// writes have waited `write_stall` for the client to take anything.
    fn stalled<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        r: std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>> {
        if r.is_ready() {
            self.stall = None;
            return r;
        }
        let wait = self.write_stall;
        let stall = self
            .stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(wait)));
        if std::future::Future::poll(stall.as_mut(), cx).is_ready() {
            return std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client took nothing written to it within the write stall timeout",
            )));
        }
        r
    }

    /// An error when `Incoming` closed this connection; otherwise the
    /// task's waker is kept for it to do so. The waker is handed over (a
    /// lock) only when it is not the one handed over last: once for a
    /// connection, whose reads and writes all come from its one task.
    /// Before, every read and write took the lock.
    fn closed(&mut self, cx: &std::task::Context<'_>) -> Option<std::io::Error> {
        use std::sync::atomic::Ordering;
        if !self.heard.closing.load(Ordering::Relaxed) {
            if self.given.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                return None;
            }
            if let Ok(mut w) = self.heard.waker.lock() {
                *w = Some(cx.waker().clone());
                self.given = Some(cx.waker().clone());
            }
            // Told meanwhile: its wake-up may have missed the waker.
            if !self.heard.closing.load(Ordering::Relaxed) {
                return None;
            }
        }
        Some(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "closed to make room for a new connection",
        ))
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = <tokio::net::UnixStream as tonic::transport::server::Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl tokio::io::AsyncRead for Conn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        if let Some(e) = self.closed(cx) {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        let this = &mut *self;
        let r = std::pin::Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r {
            if buf.filled().len() > before {
                this.heard
                    .last
                    .store(now_ms(), std::sync::atomic::Ordering::Relaxed);
            }
        }
        if let Some((deadline, got)) = this.preface.as_mut() {
            if let Poll::Ready(Ok(())) = &r {
                *got += buf.filled().len() - before;
                if *got >= PREFACE_LEN {
                    this.preface = None;
                    return r;
                }
            }
            if r.is_pending() && std::future::Future::poll(deadline.as_mut(), cx).is_ready() {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no HTTP/2 preface within the preface timeout",
                )));
            }
        }
        r
    }
}

impl tokio::io::AsyncWrite for Conn {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if let Some(e) = self.closed(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        let r = std::pin::Pin::new(&mut self.io).poll_write(cx, buf);
        self.stalled(cx, r)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if let Some(e) = self.closed(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        let r = std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.stalled(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if let Some(e) = self.closed(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        let r = std::pin::Pin::new(&mut self.io).poll_flush(cx);
        self.stalled(cx, r)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The calls one connection to the CSI socket may have open at once
/// (HTTP/2's `SETTINGS_MAX_CONCURRENT_STREAMS`; a gRPC client queues the
/// rest, and a stream past it is refused). tonic passes hyper no limit
/// unless given one, which lifts hyper's own (200): one connection opened
/// any number of calls, about 8 KiB each (10 connections of 2,000 calls
/// whose request never came: 160 MB).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 128;

/// The request bytes berth holds at once, over every connection, for calls
/// whose message has not arrived whole (`budget_request_body`).
pub const REQUEST_BYTES_IN_TRANSIT: usize = 64 << 20;

/// The first bytes of each call's request that `REQUEST_BYTES_IN_TRANSIT`
/// does not count: the requests kubelet and the sidecars send are this
/// small (Probe's and NodeGetInfo's are 5 bytes), and a client holding the
/// whole budget never makes them wait.
pub const REQUEST_BYTES_FREE: usize = 4 << 10;

/// How long a call's request may take to arrive whole (its message and
/// the end of its stream), from its headers: a client sends a request of
/// at most gRPC's 4 MiB over the local socket in milliseconds. A call
/// still waiting for its bytes then is `DEADLINE_EXCEEDED`, and what it
/// held of `REQUEST_BYTES_IN_TRANSIT` is given back. By default
/// (`--request-arrival-timeout`).
pub const REQUEST_ARRIVAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Request bytes counted against `REQUEST_BYTES_IN_TRANSIT` now.
static IN_TRANSIT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Every call's request body, counted while it arrives: tonic reads a
/// call's message into memory as it comes, up to gRPC's 4 MiB, and holds
/// it until the last byte is in, for as long as that takes. Before, a
/// client that began many calls and never finished their messages made
/// berth hold all of it (one connection, 64 calls of 3.9 MB each: 265 MB
/// resident). A call whose bytes beyond the first `REQUEST_BYTES_FREE`
/// would take the bytes in transit past `REQUEST_BYTES_IN_TRANSIT` is
/// `RESOURCE_EXHAUSTED`; its bytes are given back when its body is dropped
/// (once decoded, or with the call). Only the CSI services' calls, which
/// are unary (one message, then the body ends): a reflection stream's
/// requests would add up for as long as it stays open. A body that has
/// not ended `arrival` (`Bounds::request_arrival`) after the call began is
/// `DEADLINE_EXCEEDED`: before, a client that stopped sending part way (or
/// sent its whole message and never ended its stream, which tonic waits
/// for before the handler runs) held its bytes of the budget for as long
/// as its connection stayed open, and with 64 MiB so held every request
/// over 4 KiB was `RESOURCE_EXHAUSTED` for as long.
fn budget_request_body(
    req: tonic::codegen::http::Request<tonic::body::Body>,
    arrival: Duration,
) -> tonic::codegen::http::Request<tonic::body::Body> {
    if !req.uri().path().starts_with("/csi.v1.") {
        return req;
    }
    req.map(|b| {
        tonic::body::Body::new(Budgeted {
            inner: b,
            seen: 0,
            held: 0,
            began: tokio::time::Instant::now(),
            arrival,
            late: None,
            over: false,
            framing: Framing::default(),
        })
    })
}

struct Budgeted {
    inner: tonic::body::Body,
    /// Bytes of this body received so far.
    seen: usize,
    /// Of them, those counted in `IN_TRANSIT`.
    held: usize,
    /// When the call began (`arrival` counts from here).
    began: tokio::time::Instant,
    /// How long its request may take to arrive whole
    /// (`Bounds::request_arrival`).
    arrival: Duration,
    /// The timer of that deadline, made only once the body has had to
    /// wait for its bytes (a small request is usually in whole at once).
    late: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// The body was ended early, and the call was told why: its deadline
    /// passed, or it ended cut short (`Framing`).
    over: bool,
    /// Where the body's gRPC messages begin and end.
    framing: Framing,
}

/// A request body's gRPC framing (each message: a flag byte, its length in
/// 4 bytes, then its bytes), followed as the body arrives: whether it
/// ended with no message, or part way through one. tonic answers both
/// INTERNAL before berth's code sees the call ("Missing request message.",
/// "Unexpected EOF decoding stream."), which says berth failed; a request
/// the client cut short is a bad argument of the caller's, INVALID_ARGUMENT,
/// as berth's codec answers a message that does not decode.
#[derive(Default)]
struct Framing {
    /// Of the current message's 5-byte prefix, the bytes seen.
    prefix: [u8; 5],
    prefix_seen: usize,
    /// The current message's bytes still to come after its prefix.
    left: u64,
    /// Messages begun.
    messages: u64,
}

impl Framing {
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.left > 0 {
                let n = (self.left.min(data.len() as u64)) as usize;
                self.left -= n as u64;
                data = &data[n..];
                continue;
            }
            if self.prefix_seen == 0 {
                self.messages += 1;
            }
            let n = (5 - self.prefix_seen).min(data.len());
            self.prefix[self.prefix_seen..self.prefix_seen + n].copy_from_slice(&data[..n]);
            self.prefix_seen += n;
            data = &data[n..];
            if self.prefix_seen == 5 {
                let p = self.prefix;
                self.left = u32::from_be_bytes([p[1], p[2], p[3], p[4]]).into();
                self.prefix_seen = 0;
            }
        }
    }

    /// Whether a body that ended here was cut short (`at_end`'s question,
    /// without its message).
    fn cut_short(&self) -> bool {
        self.prefix_seen > 0 || self.left > 0 || self.messages == 0
    }

    /// What is wrong with a body that ended here, if anything.
    fn at_end(&self) -> Option<String> {
        if self.prefix_seen > 0 {
            Some(format!(
                "the request ended within a message's 5-byte gRPC prefix ({} of its bytes)",
                self.prefix_seen
            ))
        } else if self.left > 0 {
            Some(format!(
                "the request ended {} bytes short of the end of its message",
                self.left
            ))
        } else if self.messages == 0 {
            Some("the request ended with no message (a call of the CSI services takes one)".into())
        } else {
            None
        }
    }
}

impl Budgeted {
    /// Counts `n` more bytes; false when the budget has no room for them.
    fn take(&mut self, n: usize) -> bool {
        use std::sync::atomic::Ordering;
        let seen = self.seen.saturating_add(n);
        let counted = seen.saturating_sub(REQUEST_BYTES_FREE) - self.held;
        if counted > 0 {
            let room = IN_TRANSIT.fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
                now.checked_add(counted)
                    .filter(|&t| t <= REQUEST_BYTES_IN_TRANSIT)
            });
            if room.is_err() {
                return false;
            }
            self.held += counted;
        }
        self.seen = seen;
        true
    }
}

impl Drop for Budgeted {
    fn drop(&mut self) {
        IN_TRANSIT.fetch_sub(self.held, std::sync::atomic::Ordering::AcqRel);
    }
}

impl tonic::codegen::Body for Budgeted {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, tonic::Status>>> {
        use std::task::Poll;
        if self.over {
            return Poll::Ready(None);
        }
        let r = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if r.is_pending() {
            let until = self.began + self.arrival;
            let late = self
                .late
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
            if std::future::Future::poll(late.as_mut(), cx).is_ready() {
                self.over = true;
                // Its bytes go back now, not when the call is dropped.
                IN_TRANSIT.fetch_sub(
                    std::mem::take(&mut self.held),
                    std::sync::atomic::Ordering::AcqRel,
                );
                return Poll::Ready(Some(Err(tonic::Status::deadline_exceeded(format!(
                    "the request did not arrive whole within {} s of the call's start",
                    self.arrival.as_secs()
                )))));
            }
            return Poll::Pending;
        }
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    if !self.take(d.len()) {
                        return Poll::Ready(Some(Err(tonic::Status::resource_exhausted(format!(
                            "berth is receiving {} MiB of requests that have not arrived whole; try again",
                            REQUEST_BYTES_IN_TRANSIT >> 20
                        )))));
                    }
                    self.framing.feed(d);
                }
            }
            Poll::Ready(None) => {
                if let Some(why) = self.framing.at_end() {
                    // Once: the body has ended for whoever polls again.
                    self.over = true;
                    return Poll::Ready(Some(Err(tonic::Status::invalid_argument(why))));
                }
            }
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        // Not while its end is still to be told to be cut short (an
        // empty body taken for ended is never polled: tonic answered
        // "Missing request message.").
        self.over || (self.inner.is_end_stream() && !self.framing.cut_short())
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Completes on SIGTERM or SIGINT.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{signal, SignalKind};
    // Registered now, not when the future is first polled: a SIGTERM that
    // arrives as soon as the socket accepts must not meet the default
    // disposition (which kills the process without any clean-up).
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = int.recv() => tracing::info!("SIGINT: shutting down"),
            },
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM/SIGINT");
                std::future::pending::<()>().await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::os::RealFiles;

    /// The socket's name appears only once it accepts: a client that
    /// connects as soon as it sees the file (kubelet's plugin watcher, a
    /// script) is never refused. Bound at its name, the file existed
    /// between bind(2) and listen(2).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_socket_appears_only_once_it_accepts() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let d = tempfile::tempdir().unwrap();
        let mut refused = 0;
        for i in 0..300 {
            let path = d.path().join(format!("s{i}.sock"));
            let stop = Arc::new(AtomicBool::new(false));
            let watcher = {
                let (path, stop) = (path.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if std::fs::symlink_metadata(&path).is_ok() {
                            return std::os::unix::net::UnixStream::connect(&path).err();
                        }
                        std::hint::spin_loop();
                    }
                    None
                })
            };
            let listener = bind_socket(&RealFiles, &path, None).unwrap();
            // Let the watcher see it whatever happened.
            std::thread::sleep(std::time::Duration::from_millis(1));
            stop.store(true, Ordering::Relaxed);
            if let Some(e) = watcher.join().unwrap() {
                assert_eq!(e.raw_os_error(), Some(libc::ECONNREFUSED), "{e}");
                refused += 1;
            }
            drop(listener);
        }
        assert_eq!(
            refused, 0,
            "connections refused by a socket not yet listening"
        );
        // Nothing left under a temporary name.
        let left: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".berth-"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    /// Two berths binding one socket path at the same moment (one
    /// process's threads here, as two processes would): never both. The
    /// path was checked free, then the socket renamed into place, which
    /// replaced whatever had appeared there meanwhile: both succeeded, and
    /// the first served on a socket nobody could reach any more.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_binds_of_one_path_at_once_never_both_succeed() {
        let d = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Handle::current();
        let mut both = 0;
        for i in 0..300 {
            let path = d.path().join(format!("s{i}.sock"));
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
            let binds: Vec<_> = (0..2)
                .map(|_| {
                    let (path, barrier, rt) = (path.clone(), barrier.clone(), rt.clone());
                    std::thread::spawn(move || {
                        let _rt = rt.enter();
                        barrier.wait();
                        bind_socket(&RealFiles, &path, None)
                            .map(|l| l.into_std().unwrap())
                            .map_err(|e| e.to_string())
                    })
                })
                .collect();
            let results: Vec<_> = binds.into_iter().map(|t| t.join().unwrap()).collect();
            let bound: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
            if bound.len() == 2 {
                both += 1;
            }
            assert!(!bound.is_empty(), "{results:?}");
            for r in &results {
                if let Err(e) = r {
                    assert!(e.contains("two drivers on one socket"), "{e}");
                }
            }
            // The one that succeeded serves at the path.
            assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
        }
        assert_eq!(both, 0, "rounds of 300 where both binds succeeded");
    }

    /// A connection's reads take no lock once its task's waker has been
    /// handed over (the lock is held here, and a read still returns), and
    /// `Incoming` closing it wakes that task and fails its next read.
    /// Before, every read and write took the lock (here: waited for it).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connections_reads_take_no_lock_once_its_waker_is_handed_over() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::task::{Context, Poll, Wake, Waker};
        struct Count(AtomicUsize);
        impl Wake for Count {
            fn wake(self: std::sync::Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let woken = std::sync::Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(woken.clone());
        let (a, _peer) = tokio::net::UnixStream::pair().unwrap();
        let mut conn = Conn::new(a, &Bounds::default());
        let heard = conn.heard.clone();
        let read = |conn: &mut Conn, waker: &Waker| {
            let mut buf = [0u8; 16];
            let mut buf = tokio::io::ReadBuf::new(&mut buf);
            let mut cx = Context::from_waker(waker);
            match tokio::io::AsyncRead::poll_read(std::pin::Pin::new(conn), &mut cx, &mut buf) {
                Poll::Pending => None,
                Poll::Ready(r) => Some(r.map_err(|e| e.kind())),
            }
        };
        assert_eq!(read(&mut conn, &waker), None);
        let held = heard.waker.lock().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let w = waker.clone();
        std::thread::spawn(move || {
            let r = read(&mut conn, &w);
            let _ = tx.send((r, conn));
        });
        let got = rx.recv_timeout(std::time::Duration::from_secs(5));
        drop(held);
        let (r, mut conn) = got.expect("a read waited for the lock of the connection's waker");
        assert_eq!(r, None);
        heard.close();
        assert_eq!(woken.0.load(Ordering::SeqCst), 1);
        assert_eq!(
            read(&mut conn, &waker),
            Some(Err(std::io::ErrorKind::ConnectionAborted))
        );
    }

    /// The socket's path is looked at, made, replaced and removed through
    /// the OS layer (`Files`): a look that fails, a rename into place that
    /// fails and a leftover that cannot be removed each stop the bind and
    /// leave no socket of its own behind.
    #[tokio::test]
    async fn the_socket_is_bound_through_the_os_layer() {
        let d = tempfile::tempdir().unwrap();
        let sub = d.path().join("sub");
        let path = sub.join("csi.sock");
        let (os, fake) = crate::os::Os::fake();
        let files = os.files.as_ref();
        let err = |r: Result<UnixListener, ServeError>| match r {
            Ok(_) => panic!("bound"),
            Err(e) => crate::error::chain(&e),
        };
        fake.fail_next("lstat", libc::EIO);
        let e = err(bind_socket(files, &path, None));
        assert!(e.contains("inspecting"), "{e}");
        assert!(!sub.exists());
        fake.fail_op_under("rename", d.path(), libc::EIO);
        let e = err(bind_socket(files, &path, None));
        assert!(e.contains("moving the socket"), "{e}");
        assert_eq!(std::fs::read_dir(&sub).unwrap().count(), 0);
        fake.clear_file_faults();
        let ops = |fake: &crate::os::fake::FakeOs| -> Vec<&'static str> {
            fake.file_ops().into_iter().map(|o| o.op).collect()
        };
        assert_eq!(ops(&fake), ["mkdir", "bind", "rename", "unlink"]);
        fake.clear_file_ops();
        drop(bind_socket(files, &path, None).unwrap());
        assert_eq!(ops(&fake), ["mkdir", "bind", "rename"]);
        // A leftover nobody answers on: removed through the OS layer.
        fake.clear_file_ops();
        fake.fail_op_under("unlink", &path, libc::EACCES);
        let e = err(bind_socket(files, &path, None));
        assert!(e.contains("removing old socket"), "{e}");
        fake.clear_file_faults();
        drop(bind_socket(files, &path, None).unwrap());
        assert_eq!(ops(&fake), ["unlink", "unlink", "mkdir", "bind", "rename"]);
        assert!(refuse_taken_socket(files, &path).is_ok());
        fake.fail_next("lstat", libc::EIO);
        assert!(refuse_taken_socket(files, &path).is_err());
    }

    /// Start-up's looks at the socket's path go through the OS layer, and
    /// one that fails stops the bind, removing nothing: the connect that
    /// asks whether a process serves on a socket there, the second look at
    /// a leftover just before its removal (a failure read as "not the
    /// leftover": nothing was removed, and the bind then failed blaming
    /// another process), and the lookup of `--socket-group`'s name.
    #[tokio::test]
    async fn a_look_at_the_socket_that_fails_stops_the_bind() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("csi.sock");
        let (os, fake) = crate::os::Os::fake();
        let files = os.files.as_ref();
        let err = |r: Result<UnixListener, ServeError>| match r {
            Ok(_) => panic!("bound"),
            Err(e) => crate::error::chain(&e),
        };
        let names = || -> Vec<String> {
            std::fs::read_dir(d.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        };
        // A leftover nobody answers on.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        fake.fail_next("connect", libc::EIO);
        let e = err(bind_socket(files, &path, None));
        assert!(e.contains("connecting to"), "{e}");
        fake.fail_next("connect", libc::EIO);
        assert!(refuse_taken_socket(files, &path).is_err());
        fake.fail_op_under_after("lstat", &path, 1, libc::EIO);
        let e = err(bind_socket(files, &path, None));
        fake.clear_file_faults();
        assert!(e.contains("inspecting"), "{e}");
        assert_eq!(names(), ["csi.sock"]);
        assert!(fake.file_ops().is_empty(), "{:?}", fake.file_ops());
        fake.fail_next("getgrnam", libc::EIO);
        let e = socket_gid(files, "root").unwrap_err().to_string();
        assert!(e.contains("looking up group \"root\""), "{e}");
        assert_eq!(socket_gid(files, "root").unwrap().as_raw(), 0);
        fake.fail_next("getgrnam", libc::EIO);
        let e = err(bind_socket(files, &path, Some("root")));
        assert!(e.contains("looking up group"), "{e}");
        assert_eq!(names(), Vec::<String>::new());
        drop(bind_socket(files, &path, Some("root")).unwrap());
        assert_eq!(names(), ["csi.sock"]);
    }

    /// A socket whose listener stopped accepting and whose backlog is full
    /// (a hung berth) is taken, and telling so does not wait: a blocking
    /// connect waited until the listener accepted, so a new berth's
    /// start-up hung for as long as the old one did.
    #[test]
    fn a_listener_with_a_full_backlog_is_taken_without_waiting() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("csi.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        // Fill the backlog: connects that never wait, until one would.
        let mut held = Vec::new();
        loop {
            let fd = nix::sys::socket::socket(
                nix::sys::socket::AddressFamily::Unix,
                nix::sys::socket::SockType::Stream,
                nix::sys::socket::SockFlag::SOCK_NONBLOCK,
                None,
            )
            .unwrap();
            let addr = nix::sys::socket::UnixAddr::new(&path).unwrap();
            match nix::sys::socket::connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr) {
                Ok(()) => held.push(fd),
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(e) => panic!("filling the backlog: {e}"),
            }
            assert!(held.len() < 100_000, "the backlog never filled");
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.clone();
        std::thread::spawn(move || {
            let _ = tx.send(refuse_taken_socket(&RealFiles, &p).map_err(|e| e.to_string()));
        });
        let r = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("the check still waits on a listener that does not accept");
        let e = r.expect_err("a socket with a listener is taken");
        assert!(e.contains("another process is serving"), "{e}");
        // Nobody listening any more: a leftover, replaced.
        drop(listener);
        drop(held);
        assert!(refuse_taken_socket(&RealFiles, &path).is_ok());
    }
}
