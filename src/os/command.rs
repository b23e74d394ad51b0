//! External commands (blkid, mkfs, mount.nfs, ...) under a timeout.
//!
//! Each command runs in its own process group; on timeout the whole group is
//! killed with SIGKILL, so a hung `mount` helper cannot outlive its call and
//! block later ones. Its output is read on the calling thread with poll(2)
//! under the same deadline: a process that left the group (setsid) and
//! keeps the pipes open cannot hold the call past it, and after the command
//! itself has exited its pipes get a short grace at most. At most
//! `MAX_OUTPUT` bytes of each stream are kept.
//!
//! The process groups of commands still running are known
//! (`kill_running`), so a process that must exit before they end (the
//! shutdown bound) kills them first.
//!
//! In its container berth is PID 1, so every process a command leaves
//! behind (a helper `mount.nfs` started, anything killed with its group)
//! becomes berth's child when its parent exits, and a zombie for ever
//! once it dies unless berth waits for it. `reap_orphans` does, and
//! never for a command of berth's own: their pids are in `RUNNING` from
//! the fork (taken under its lock) until their call has waited for them.
use std::collections::HashSet;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::OsError;

/// Bytes of each output stream kept; the rest is read and dropped.
pub const MAX_OUTPUT: usize = 1 << 20;

/// How long the pipes are still read once the command has exited (what a
/// process it left behind writes after that is not waited for).
const PIPE_GRACE: Duration = Duration::from_millis(200);

/// What a finished command printed and how it exited.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CmdOutput {
    /// Exit code; None when killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// Turns a non-zero exit into an error naming the program.
    pub fn check(self, program: &str) -> Result<CmdOutput, OsError> {
        if self.success() {
            Ok(self)
        } else {
            Err(OsError::Failed {
                program: program.to_string(),
                status: match self.code {
                    Some(c) => format!("exit {c}"),
                    None => "killed by signal".to_string(),
                },
                stderr: self.stderr.trim().chars().take(2000).collect(),
            })
        }
    }
}

/// Runs external commands. Real: `RealRunner`; fake: `fake::FakeOs`.
pub trait Runner: Send + Sync {
    fn run(&self, program: &str, args: &[String], timeout: Duration) -> Result<CmdOutput, OsError>;
}

/// Process groups of the commands running now; a group's id is the pid of
/// the command, which berth waits for itself. A pid is added under the
/// lock that was held across its fork, and removed once its call has
/// waited for it, so `reap_orphans` (under the same lock) never takes the
/// exit status of a command for an orphan's.
static RUNNING: Mutex<Option<HashSet<i32>>> = Mutex::new(None);

fn running() -> std::sync::MutexGuard<'static, Option<HashSet<i32>>> {
    RUNNING.lock().unwrap_or_else(|e| e.into_inner())
}

/// Keeps a process group in `RUNNING` until the command has been waited
/// for (dropped after its wait).
struct Tracked(i32);

impl Tracked {
    /// Spawns `cmd` and records its pid, both under the lock of
    /// `RUNNING`: a command that exits at once is never an unknown child.
    fn spawn(cmd: &mut Command) -> std::io::Result<(std::process::Child, Tracked)> {
        let mut running = running();
        let child = cmd.spawn()?;
        let pgid = child.id() as i32;
        running.get_or_insert_with(HashSet::new).insert(pgid);
        Ok((child, Tracked(pgid)))
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if let Some(set) = running().as_mut() {
            set.remove(&self.0);
        }
    }
}

/// Runs `f` while no command is being spawned: the lock that is held
/// across each spawn until its child has exec'd (`Tracked::spawn`; std's
/// spawn returns only then). A child between its fork and its exec holds
/// a copy of every descriptor of berth, O_CLOEXEC ones too (they close at
/// the exec), so what `f` closes is closed for good when it returns: for
/// the close of an exclusive open of a block device, which the kernel lets
/// go only at the last close (`blockdev::Exclusive`).
pub fn while_not_spawning<T>(f: impl FnOnce() -> T) -> T {
    let _no_spawn = running();
    f()
}

/// Kills the process group of every command still running (SIGKILL);
/// returns how many there were. For a process about to exit without
/// waiting for its calls in flight.
pub fn kill_running() -> usize {
    let groups: Vec<i32> = running().iter().flatten().copied().collect();
    for g in &groups {
        kill_group(*g);
    }
    groups.len()
}

/// One output pipe of a child, read without blocking.
struct Pipe {
    fd: Option<File>,
    buf: Vec<u8>,
}

impl Pipe {
    fn new(fd: Option<OwnedFd>) -> Pipe {
        let fd = fd.and_then(|fd| {
            let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL).ok()?;
            let flags =
                nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
            nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags)).ok()?;
            Some(File::from(fd))
        });
        Pipe {
            fd,
            buf: Vec::new(),
        }
    }

    /// Reads what is there now; closes the pipe at end of file or error.
    fn drain(&mut self) {
        let Some(f) = self.fd.as_mut() else {
            return;
        };
        let mut chunk = [0u8; 8192];
        loop {
            match f.read(&mut chunk) {
                Ok(0) => {
                    self.fd = None;
                    return;
                }
                Ok(n) => {
                    let room = MAX_OUTPUT.saturating_sub(self.buf.len());
                    self.buf.extend_from_slice(&chunk[..n.min(room)]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.fd = None;
                    return;
                }
            }
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf).into_owned()
    }
}

/// Waits until one of the open pipes has something (or is closed), at
/// most `wait`.
fn wait_readable(pipes: &[&Pipe], wait: Duration) {
    let mut fds: Vec<PollFd> = pipes
        .iter()
        .filter_map(|p| p.fd.as_ref())
        .map(|f| PollFd::new(f.as_fd(), PollFlags::POLLIN))
        .collect();
    if fds.is_empty() {
        std::thread::sleep(wait);
        return;
    }
    let ms = u16::try_from(wait.as_millis()).unwrap_or(u16::MAX);
    let _ = poll(&mut fds, PollTimeout::from(ms));
}

/// The command is killed (SIGKILL) when berth dies, even by kill -9: an
/// mkfs must not go on writing to a device after the process that decided
/// to format it is gone (a restarted berth would find it busy, or half
/// made). The signal follows the spawning thread, which waits for the
/// command in `run` until it ends. The command also gets the limit of
/// open files berth was started with (`limits::restore_in_child`).
fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: runs in the child between fork and exec, and makes only
    // async-signal-safe system calls (prctl, getppid, setrlimit); nothing
    // allocates.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // Berth died before the prctl: the signal would never come.
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            super::limits::restore_in_child()
        });
    }
}

pub struct RealRunner;

impl Runner for RealRunner {
    fn run(&self, program: &str, args: &[String], timeout: Duration) -> Result<CmdOutput, OsError> {
        let deadline = Instant::now() + timeout;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("LC_ALL", "C")
            .process_group(0);
        die_with_parent(&mut cmd);
        let (mut child, tracked) =
            Tracked::spawn(&mut cmd).map_err(|e| OsError::sys("spawn", program, e))?;
        let pgid = tracked.0;
        let mut out = Pipe::new(child.stdout.take().map(OwnedFd::from));
        let mut err = Pipe::new(child.stderr.take().map(OwnedFd::from));
        let mut status = None;
        let mut exited = None;
        loop {
            if status.is_none() {
                match child.try_wait() {
                    Ok(Some(st)) => {
                        // The leader is gone; anything it left in its group
                        // goes too.
                        kill_group(pgid);
                        status = Some(st);
                        exited = Some(Instant::now());
                    }
                    Ok(None) => {}
                    Err(e) => {
                        kill_group(pgid);
                        reap(child, tracked, program);
                        return Err(OsError::sys("wait", program, e));
                    }
                }
            }
            let open = out.fd.is_some() || err.fd.is_some();
            let now = Instant::now();
            if (status.is_some() && !open)
                || now >= deadline
                || exited.is_some_and(|t| now >= t + PIPE_GRACE)
            {
                break;
            }
            // Short waits: the exit of the command is noticed by try_wait.
            wait_readable(
                &[&out, &err],
                (deadline - now).min(Duration::from_millis(20)),
            );
            out.drain();
            err.drain();
        }
        let Some(status) = status else {
            kill_group(pgid);
            reap(child, tracked, program);
            return Err(OsError::Timeout {
                program: program.to_string(),
                secs: timeout.as_secs(),
            });
        };
        out.drain();
        err.drain();
        Ok(CmdOutput {
            code: status.code(),
            stdout: out.text(),
            stderr: err.text(),
        })
    }
}

/// How long a killed command is waited for before it is left to a thread
/// of its own.
const KILL_GRACE: Duration = Duration::from_secs(2);

/// Waits for a command just killed, at most `KILL_GRACE`. A process in
/// uninterruptible sleep (I/O to a disk that stopped answering, a write to
/// a frozen filesystem) dies of SIGKILL only when that sleep ends, which
/// may be never: its call must not wait for it (it held the volume's guard
/// for as long, and every retry was ABORTED). Such a process is waited for
/// on a thread of its own (no zombie is left once it dies), its process
/// group still known to `kill_running` meanwhile.
fn reap(mut child: std::process::Child, tracked: Tracked, program: &str) {
    let until = Instant::now() + KILL_GRACE;
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return,
            Ok(None) if Instant::now() >= until => break,
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    tracing::warn!(
        program,
        pid = child.id(),
        "a command killed at its deadline has not exited (uninterruptible sleep: a device that does not answer, a frozen filesystem?); its call returns without it"
    );
    let _ = std::thread::Builder::new()
        .name("berth-reap".into())
        .spawn(move || {
            let _tracked = tracked;
            let _ = child.wait();
        });
}

fn kill_group(pgid: i32) {
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pgid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// Whether berth is PID 1 of its PID namespace (the entrypoint of its
/// container): the processes its commands leave behind are then its
/// children, which nobody else waits for. Outside a container they go to
/// the host's init (berth sets no `PR_SET_CHILD_SUBREAPER`).
pub fn is_init() -> bool {
    std::process::id() == 1
}

/// What one `reap_orphans` round did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reaped {
    /// Exited children that were no command of berth's own, waited for.
    pub orphans: usize,
    /// The round stopped at an exited command of berth's own, which its
    /// call waits for within milliseconds; exited orphans may be left for
    /// the next round.
    pub stopped_at_own: bool,
}

/// Waits for every exited child of this process that is not a command
/// berth runs (`RUNNING`), without blocking: looks at the next exited
/// child without waiting for it (`waitid` with `WNOWAIT`), and waits for
/// exactly that pid if it is not berth's own, all under the lock of
/// `RUNNING`, so the exit status of a command is left to its call.
pub fn reap_orphans() -> Reaped {
    use nix::errno::Errno;
    use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag};
    let mut done = Reaped::default();
    loop {
        let running = running();
        let peek = waitid(
            Id::All,
            WaitPidFlag::WEXITED
                | WaitPidFlag::WNOHANG
                | WaitPidFlag::WNOWAIT
                | WaitPidFlag::__WALL,
        );
        let pid = match peek {
            Ok(status) => match status.pid() {
                Some(pid) => pid,
                // Children, none of them exited.
                None => return done,
            },
            Err(Errno::EINTR) => continue,
            // ECHILD: no child at all.
            Err(_) => return done,
        };
        if running
            .as_ref()
            .is_some_and(|set| set.contains(&pid.as_raw()))
        {
            done.stopped_at_own = true;
            return done;
        }
        match waitpid(pid, Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL)) {
            Ok(_) => done.orphans += 1,
            Err(Errno::EINTR) => continue,
            Err(_) => return done,
        }
    }
}

/// How often orphans are looked for without a SIGCHLD.
const REAP_EVERY: Duration = Duration::from_secs(5);

/// How soon a round that stopped at a command of berth's own is done
/// again (its call waits for it within 20 ms).
const REAP_AGAIN: Duration = Duration::from_millis(50);

/// Reaps orphans (`reap_orphans`) for as long as the async runtime runs:
/// at every SIGCHLD, and every few seconds. For berth as PID 1
/// (`is_init`). The rounds run on a blocking thread: the lock they take
/// is held across a fork.
pub async fn reap_orphans_while_serving() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigchld = match signal(SignalKind::child()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "no SIGCHLD handler; orphaned processes are reaped every few seconds");
            None
        }
    };
    loop {
        let round = tokio::task::spawn_blocking(reap_orphans)
            .await
            .unwrap_or_default();
        if round.orphans > 0 {
            tracing::debug!(
                orphans = round.orphans,
                "reaped processes that commands left behind"
            );
        }
        let wait = if round.stopped_at_own {
            REAP_AGAIN
        } else {
            REAP_EVERY
        };
        let ended = match sigchld.as_mut() {
            Some(s) => tokio::select! {
                got = s.recv() => got.is_none(),
                _ = tokio::time::sleep(wait) => false,
            },
            None => {
                tokio::time::sleep(wait).await;
                false
            }
        };
        if ended {
            sigchld = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_output_and_code() {
        let o = RealRunner
            .run(
                "sh",
                &["-c".into(), "echo out; echo err >&2; exit 3".into()],
                Duration::from_secs(10),
            )
            .unwrap();
        assert_eq!(o.code, Some(3));
        assert_eq!(o.stdout, "out\n");
        assert_eq!(o.stderr, "err\n");
        assert!(o.check("sh").is_err());
    }

    #[test]
    fn timeout_kills_the_whole_group() {
        // A unique sleep length marks the processes this test starts.
        let marker = format!("sleep 987.{}", std::process::id());
        let start = Instant::now();
        // The child spawns a grandchild that would outlive a plain kill.
        let r = RealRunner.run(
            "sh",
            &["-c".into(), format!("{marker} & {marker}")],
            Duration::from_millis(300),
        );
        assert!(matches!(r, Err(OsError::Timeout { .. })), "{r:?}");
        assert!(start.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(100));
        let ps = Command::new("pgrep")
            .args(["-f", &marker])
            .output()
            .unwrap();
        assert!(ps.stdout.is_empty(), "process survived: {:?}", ps);
    }

    fn running(pattern: &str) -> bool {
        let ps = Command::new("pgrep")
            .args(["-f", pattern])
            .output()
            .unwrap();
        !ps.stdout.is_empty()
    }

    /// Berth killed with SIGKILL while a command runs: the command goes
    /// with it. The test binary runs itself as the berth that is killed.
    #[test]
    fn a_command_dies_with_berth() {
        const ROLE: &str = "BERTH_TEST_DIES_WITH";
        if let Ok(len) = std::env::var(ROLE) {
            let _ = RealRunner.run("sleep", &[len], Duration::from_secs(60));
            return;
        }
        let len = format!("984.{}", std::process::id());
        let pattern = format!("^sleep {len}$");
        let mut berth = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "os::command::tests::a_command_dies_with_berth"])
            .env(ROLE, &len)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let until = |want: bool| {
            let end = Instant::now() + Duration::from_secs(20);
            while running(&pattern) != want && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(20));
            }
            running(&pattern) == want
        };
        assert!(until(true), "the command never started");
        berth.kill().unwrap();
        berth.wait().unwrap();
        assert!(until(false), "the command outlived the berth that ran it");
    }

    /// A grandchild that leaves the group (setsid) keeps the pipes open
    /// long after the command exited: the call returns at once with what
    /// the command printed, and one that does not exit is bounded by its
    /// deadline although its pipes stay open.
    #[test]
    fn pipes_held_open_by_an_escaped_grandchild_hang_nothing() {
        let marker = format!("sleep 986.{}", std::process::id());
        let start = Instant::now();
        let o = RealRunner
            .run(
                "sh",
                &["-c".into(), format!("setsid {marker} & echo done")],
                Duration::from_secs(20),
            )
            .unwrap();
        let took = start.elapsed();
        assert_eq!(o.stdout, "done\n");
        assert_eq!(o.code, Some(0));
        assert!(took < Duration::from_secs(5), "{took:?}");
        let start = Instant::now();
        let r = RealRunner.run(
            "sh",
            &["-c".into(), format!("setsid {marker} & exec sleep 30")],
            Duration::from_millis(500),
        );
        assert!(matches!(r, Err(OsError::Timeout { .. })), "{r:?}");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        // The escaped sleeps are this test's own: end them.
        let ps = Command::new("pgrep")
            .args(["-f", &marker])
            .output()
            .unwrap();
        for pid in String::from_utf8_lossy(&ps.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }

    /// Exited children of this process that nobody has waited for.
    fn zombie_children() -> Vec<String> {
        let me = std::process::id().to_string();
        let mut zombies = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let Some((_, rest)) = stat.rsplit_once(") ") else {
                continue;
            };
            let mut fields = rest.split(' ');
            if fields.next() == Some("Z") && fields.next() == Some(me.as_str()) {
                zombies.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        zombies
    }

    /// Berth as PID 1, played by a subreaper: the test binary runs itself
    /// with `PR_SET_CHILD_SUBREAPER`, so what its commands leave behind
    /// becomes its child, as it becomes berth's in a container. Commands
    /// run from 8 threads, half of them leaving a process behind (killed
    /// with their group), while `reap_orphans` runs in a loop: every
    /// command still reports its own exit status (none taken by the
    /// reaper: a wait error), and every orphan is reaped, no zombie left.
    #[test]
    fn orphans_are_reaped_and_commands_keep_their_exit_status() {
        const ROLE: &str = "BERTH_TEST_REAPER";
        const NAME: &str =
            "os::command::tests::orphans_are_reaped_and_commands_keep_their_exit_status";
        if std::env::var_os(ROLE).is_some() {
            reap_beside_commands();
            return;
        }
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
            .env(ROLE, "1")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{text}");
        assert!(text.contains("1 passed"), "{text}");
    }

    fn reap_beside_commands() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        // SAFETY: a plain prctl on this process (run for this test alone).
        let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        let stop = Arc::new(AtomicBool::new(false));
        let reaper = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut reaped = 0;
                while !stop.load(Ordering::Relaxed) {
                    reaped += reap_orphans().orphans;
                    std::thread::sleep(Duration::from_micros(200));
                }
                reaped
            })
        };
        const THREADS: usize = 8;
        const RUNS: usize = 24;
        let workers: Vec<_> = (0..THREADS)
            .map(|_| {
                std::thread::spawn(|| {
                    for i in 0..RUNS {
                        // One exits at once; the other leaves a sleep
                        // behind, killed with its group once it exited.
                        let script = if i % 2 == 0 {
                            "exit 7"
                        } else {
                            "sleep 0.01 & exit 7"
                        };
                        let r = RealRunner.run(
                            "sh",
                            &["-c".into(), script.into()],
                            Duration::from_secs(30),
                        );
                        assert!(matches!(&r, Ok(o) if o.code == Some(7)), "{script}: {r:?}");
                    }
                })
            })
            .collect();
        let mut failed = Vec::new();
        for w in workers {
            if let Err(e) = w.join() {
                failed.push(e);
            }
        }
        stop.store(true, Ordering::Relaxed);
        let mut reaped = reaper.join().unwrap();
        if let Some(e) = failed.pop() {
            std::panic::resume_unwind(e);
        }
        // One orphan per command that left one; the last may die after
        // the loop's last round.
        let want = THREADS * RUNS / 2;
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            reaped += reap_orphans().orphans;
            let zombies = zombie_children();
            if reaped >= want && zombies.is_empty() {
                break;
            }
            assert!(
                Instant::now() < end,
                "{reaped} of {want} orphans reaped; zombies left: {zombies:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(reaped, want, "orphans reaped");
    }

    #[test]
    fn output_is_capped() {
        let o = RealRunner
            .run(
                "sh",
                &[
                    "-c".into(),
                    "head -c 3000000 /dev/zero; echo err >&2".into(),
                ],
                Duration::from_secs(20),
            )
            .unwrap();
        assert_eq!(o.stdout.len(), MAX_OUTPUT);
        assert_eq!(o.stderr, "err\n");
        assert!(o.success());
    }

    #[test]
    fn missing_program_is_an_error() {
        let r = RealRunner.run("/nonexistent/berth-prog", &[], Duration::from_secs(1));
        assert!(matches!(r, Err(OsError::Sys { .. })));
    }
}
