//! The server boundary shared by every handler: one tracing span per call
//! (method, volume id), the duration and result logged on completion, domain
//! errors turned into `tonic::Status` in one place. Requests are never
//! logged whole, so secrets cannot reach a log line.
use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
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
    let _count = InFlight::start();
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
                let msg = e.render();
                match code {
                    tonic::Code::Internal | tonic::Code::DeadlineExceeded => {
                        tracing::error!(micros, ?code, error = %msg, "rpc failed")
                    }
                    _ => tracing::info!(micros, ?code, error = %msg, "rpc failed"),
                }
                Err(Status::new(code, msg))
            }
        }
    }
    .instrument(span)
    .await
}
