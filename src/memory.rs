//! Keeping the resident set small: glibc malloc gives each thread that
//! allocates its own arena and rarely returns freed memory to the kernel.
//! Berth uses one arena (its threads mostly wait on the kernel, so
//! allocator contention does not show in `berth bench`) and, once a burst of
//! work is over, trims the heap.
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Work completed since the last trim (bumped at the server boundary).
static ACTIVITY: AtomicU64 = AtomicU64::new(0);

pub fn note_activity() {
    ACTIVITY.fetch_add(1, Ordering::Relaxed);
}

/// Call once, before any thread starts.
pub fn limit_arenas() {
    // SAFETY: mallopt only changes allocator tuning; called before threads.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Returns the heap's free memory to the system now (`trim_when_idle`:
/// a second after start, which read the whole state journal, then after
/// bursts of work).
fn trim() {
    // SAFETY: malloc_trim is thread-safe and only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Trims the heap once a second after start (what setting up the server
/// left behind: about 0.4 MiB measured), then after every quiet period that
/// followed some work.
pub async fn trim_when_idle(period: Duration) {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _ = tokio::task::spawn_blocking(trim).await;
    let mut seen = 0;
    loop {
        tokio::time::sleep(period).await;
        let now = ACTIVITY.load(Ordering::Relaxed);
        if now != seen && crate::rpc::in_flight() == 0 {
            seen = now;
            let _ = tokio::task::spawn_blocking(trim).await;
        }
    }
}
