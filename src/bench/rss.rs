//! Resident memory of a process, from /proc/<pid>/status.
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// VmRSS of `pid` in KiB, if the process exists.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Samples a process's RSS in the background, keeping the peak.
pub struct Sampler {
    pub pid: u32,
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Sampler {
    pub fn start(pid: u32) -> Sampler {
        let peak = Arc::new(AtomicU64::new(rss_kib(pid).unwrap_or(0)));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                if let Some(r) = rss_kib(pid) {
                    p.fetch_max(r, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        Sampler { pid, peak, stop }
    }

    /// (peak, final) in KiB.
    pub fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let last = rss_kib(self.pid).unwrap_or(0);
        (self.peak.load(Ordering::Relaxed).max(last), last)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn own_rss_is_readable() {
        let r = super::rss_kib(std::process::id()).unwrap();
        assert!(r > 100, "{r}");
        assert!(super::rss_kib(u32::MAX).is_none());
    }
}
