//! The server boundary shared by every handler: one tracing span per call
//! (method, volume id), the duration and result logged on completion, domain
//! errors turned into `tonic::Status` in one place (`Error::status_in`).
//! Requests are never logged whole, so secrets cannot reach a log line.

use std::future::Future;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use tonic::{Response, Status};
use tracing::Instrument;

use crate::error::Error;

/// RPCs and spawned operations currently running. Shutdown waits for this to
/// reach zero (within its grace period) instead of waiting for clients, which
/// keep idle connections open, to go away.
static IN_FLIGHT: AtomicI64 = AtomicI64::new(0);

/// Counts one unit of work in flight while alive.
pub struct InFlight(());

impl InFlight {
    pub fn start() -> InFlight {
        IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
        InFlight(())
    }

    /// Counts an RPC; one that starts while anything else is in flight
    /// marks the server as serving several at once (`recently_alone`).
    fn start_rpc() -> InFlight {
        if IN_FLIGHT.fetch_add(1, Ordering::SeqCst) > 0 {
            LAST_OVERLAP_MS.store(since_start_ms(), Ordering::Relaxed);
        }
        InFlight(())
    }
}

/// When an RPC last started while other work was in flight, in
/// milliseconds since `since_start_ms`'s epoch (0: never).
static LAST_OVERLAP_MS: AtomicU64 = AtomicU64::new(0);

fn since_start_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    // +1: 0 means "never".
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// True when no RPC has started beside other work for the last 100 ms: the
/// server is being asked one thing at a time (`handoff` polls only then).
pub fn recently_alone() -> bool {
    let last = LAST_OVERLAP_MS.load(Ordering::Relaxed);
    last == 0 || since_start_ms().saturating_sub(last) > 100
}

impl Drop for InFlight {
    fn drop(&mut self) {
        crate::memory::note_activity();
        IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
    }
}

pub fn in_flight() -> i64 {
    IN_FLIGHT.load(Ordering::SeqCst)
}

/// `s` with its control characters escaped (`\n`, `\r`, `\t`, `\u{1b}`):
/// for a log line that shows text from a request.
pub fn escape_controls(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Runs one RPC handler body inside its span and maps its result.
pub async fn serve<T, F>(
    method: &'static str,
    volume_id: &str,
    fut: F,
) -> Result<Response<T>, Status>
where
    F: Future<Output = Result<T, Error>>,
{
    // Only an id that passed validation goes into the span (and so into
    // every log line of the call); anything else is named by its length.
    let shown;
    let volume_id = if volume_id.is_empty() || crate::validate::volume_id(volume_id).is_ok() {
        volume_id
    } else {
        shown = format!("<invalid id, {} bytes>", volume_id.len());
        shown.as_str()
    };
    let span = tracing::info_span!("rpc", method, volume_id = %volume_id);
    let _count = InFlight::start_rpc();
    async move {
        let start = Instant::now();
        let r = fut.await;
        let elapsed = start.elapsed();
        let micros = elapsed.as_micros() as u64;
        crate::metrics::observe_rpc(
            method,
            match &r {
                Ok(_) => tonic::Code::Ok,
                Err(e) => e.code_in(method),
            },
            elapsed,
        );
        match r {
            Ok(v) => {
                tracing::debug!(micros, code = "OK", "rpc done");
                Ok(Response::new(v))
            }
            Err(e) => {
                let code = e.code_in(method);
                // Control characters escaped: the message may hold a
                // request's text (a name may have LF, CR and tab), which
                // would otherwise start a line of the text log of its own.
                let rendered = e.render();
                let msg = escape_controls(&rendered);
                if flood::may_log(method, code) {
                    match code {
                        tonic::Code::Internal | tonic::Code::DeadlineExceeded => {
                            tracing::error!(micros, ?code, error = %msg, "rpc failed")
                        }
                        _ => tracing::info!(micros, ?code, error = %msg, "rpc failed"),
                    }
                }
                // The message cut to `MAX_MESSAGE` bytes (the log line
                // above keeps it whole).
                Err(e.status_in(method))
            }
        }
    }
    .instrument(span)
    .await
}

/// The most "rpc failed" lines logged in a second for one RPC and code.
pub const FAILED_LINES_PER_SECOND: u32 = 10;

/// A bound on the "rpc failed" lines: a client calling again and again
/// with a request berth refuses (a loop without back-off, a hostile one)
/// made berth log one line per call, as fast as it called, and the log
/// (a node's disk, a log shipper) took all of it. At most
/// `FAILED_LINES_PER_SECOND` lines a second are logged for one RPC and
/// code; the calls past them are counted, and once that second is over
/// one line says how many were not logged. The first failure of another
/// RPC or code is logged whatever floods beside it; so is the first of
/// every second.
mod flood {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    const WINDOW: Duration = Duration::from_secs(1);

    type Key = (&'static str, tonic::Code);

    /// One RPC and code's lines in the second that began at `began`.
    struct Window {
        began: Instant,
        logged: u32,
        suppressed: u64,
    }

    static WINDOWS: Mutex<Option<HashMap<Key, Window>>> = Mutex::new(None);

    /// Whether the failure of a call of `method` with `code` is logged
    /// now; if not, it is counted. Only failed calls come here.
    pub fn may_log(method: &'static str, code: tonic::Code) -> bool {
        let now = Instant::now();
        let Ok(mut windows) = WINDOWS.lock() else {
            return true;
        };
        let w = windows
            .get_or_insert_with(HashMap::new)
            .entry((method, code))
            .or_insert(Window {
                began: now,
                logged: 0,
                suppressed: 0,
            });
        let mut report = 0;
        if now.duration_since(w.began) >= WINDOW {
            report = std::mem::take(&mut w.suppressed);
            w.began = now;
            w.logged = 0;
        }
        let log = w.logged < super::FAILED_LINES_PER_SECOND;
        if log {
            w.logged += 1;
        } else {
            w.suppressed += 1;
            if w.suppressed == 1 {
                // Told once the second is over, even when no call of
                // this kind comes after it.
                let at = w.began + WINDOW;
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move {
                        tokio::time::sleep_until(at.into()).await;
                        flush(method, code);
                    });
                }
            }
        }
        drop(windows);
        if report > 0 {
            suppressed(method, code, report);
        }
        log
    }

    /// Reports and forgets the failures of `method` with `code` not
    /// logged, once their second is over.
    fn flush(method: &'static str, code: tonic::Code) {
        let report = {
            let Ok(mut windows) = WINDOWS.lock() else {
                return;
            };
            let Some(map) = windows.as_mut() else {
                return;
            };
            match map.get(&(method, code)) {
                Some(w) if w.began.elapsed() >= WINDOW => {
                    map.remove(&(method, code)).map_or(0, |w| w.suppressed)
                }
                _ => 0,
            }
        };
        if report > 0 {
            suppressed(method, code, report);
        }
    }

    fn suppressed(method: &'static str, code: tonic::Code, calls: u64) {
        // Not within the span of the call that happened to come next.
        tracing::warn!(
            parent: None,
            method,
            ?code,
            calls,
            per_second = super::FAILED_LINES_PER_SECOND,
            "failed calls not logged: more than the lines logged in a second for one RPC and code"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_rpc_started_beside_other_work_ends_the_quiet() {
        let _op = InFlight::start();
        let _rpc = InFlight::start_rpc();
        // Within the 100 ms window (a slow machine would have to stall
        // that long between the two lines above and this one).
        assert!(!recently_alone());
        assert!(in_flight() >= 2);
    }
}
