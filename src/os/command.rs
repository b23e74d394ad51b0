//! External commands (blkid, mkfs, mount -t nfs, ...) under a timeout.
//!
//! Each command runs in its own process group; on timeout the whole group is
//! killed with SIGKILL, so a hung `mount` helper cannot outlive its call and
//! block later ones.
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::OsError;

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

pub struct RealRunner;

impl Runner for RealRunner {
    fn run(&self, program: &str, args: &[String], timeout: Duration) -> Result<CmdOutput, OsError> {
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("LC_ALL", "C")
            .process_group(0)
            .spawn()
            .map_err(|e| OsError::sys("spawn", program, e))?;
        let pgid = child.id() as i32;
        let mut out_pipe = child.stdout.take();
        let mut err_pipe = child.stderr.take();
        let out_t = std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(p) = out_pipe.as_mut() {
                let _ = p.read_to_string(&mut s);
            }
            s
        });
        let err_t = std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(p) = err_pipe.as_mut() {
                let _ = p.read_to_string(&mut s);
            }
            s
        });
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(1);
        let status = loop {
            match child.try_wait() {
                Ok(Some(st)) => break Some(st),
                Ok(None) => {}
                Err(e) => {
                    kill_group(pgid);
                    let _ = child.wait();
                    return Err(OsError::sys("wait", program, e));
                }
            }
            if Instant::now() >= deadline {
                break None;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        };
        let Some(status) = status else {
            kill_group(pgid);
            let _ = child.wait();
            let _ = out_t.join();
            let _ = err_t.join();
            return Err(OsError::Timeout {
                program: program.to_string(),
                secs: timeout.as_secs(),
            });
        };
        // The leader is gone; anything it left in its group goes too.
        kill_group(pgid);
        Ok(CmdOutput {
            code: status.code(),
            stdout: out_t.join().unwrap_or_default(),
            stderr: err_t.join().unwrap_or_default(),
        })
    }
}

fn kill_group(pgid: i32) {
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pgid),
        nix::sys::signal::Signal::SIGKILL,
    );
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

    #[test]
    fn missing_program_is_an_error() {
        let r = RealRunner.run("/nonexistent/berth-prog", &[], Duration::from_secs(1));
        assert!(matches!(r, Err(OsError::Sys { .. })));
    }
}
