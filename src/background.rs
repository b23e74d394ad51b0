//! Work that an RPC causes but need not wait for, done in order on one
//! thread of its own: emptying a deleted local volume's directory out of
//! the trash (its record is gone already) and whatever start-up finds
//! left there or moves there (unfinished creates and copies; once the
//! socket is up: `Driver::start`), and making the
//! local kind's spare directories ahead of creates (`kinds::local::spares`).
//! Nothing here may be needed for an RPC's answer to be right.
//!
//! Off until `configure(true)` (the serving binary): then every job runs
//! where it is submitted, inside the RPC, as it did before this thread
//! existed, so that code that never configures it (the handler tests, the
//! state tools) keeps its order of calls. A queue longer than `MAX_QUEUED`
//! runs the next job where it is submitted, too (a burst of deletes holds
//! its callers back instead of growing the queue without bound), and so
//! does a thread that could not start. A job that panics is caught and
//! logged; the thread goes on with the next.
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

type Job = Box<dyn FnOnce() + Send>;

/// Jobs waiting beyond which the next runs in its caller.
pub const MAX_QUEUED: usize = 1024;

/// How long a create or an expansion refused for space waits for deleted
/// volumes' storage to be removed (a local volume's trash) before it is
/// refused (`after_space_freed`): well within the CO's call timeout
/// (external-provisioner's and external-resizer's default is 10 s).
const SPACE_FREED_WAIT: Duration = Duration::from_secs(3);

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns the background thread on (true) or off (every job then runs where
/// it is submitted).
pub fn configure(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether jobs go to the background thread.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    /// A job is running on the thread.
    running: bool,
}

struct Worker {
    queue: Mutex<Queue>,
    /// Signalled when a job is queued (for the thread) and when the queue
    /// empties (for `wait_idle`).
    changed: Condvar,
}

impl Worker {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The thread's queue, started on first use; None when it could not start.
fn worker() -> Option<&'static Worker> {
    static WORKER: OnceLock<Option<&'static Worker>> = OnceLock::new();
    *WORKER.get_or_init(start)
}

/// A new queue and its thread (leaked: the process keeps it).
fn start() -> Option<&'static Worker> {
    let w: &'static Worker = Box::leak(Box::new(Worker {
        queue: Mutex::new(Queue::default()),
        changed: Condvar::new(),
    }));
    match std::thread::Builder::new()
        .name("berth-background".into())
        .spawn(move || work(w))
    {
        Ok(_) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "no background thread; its work runs inside the RPCs");
            None
        }
    }
}

fn work(w: &'static Worker) {
    loop {
        let job = {
            let mut q = w.lock();
            q.running = false;
            loop {
                if let Some(j) = q.jobs.pop_front() {
                    q.running = true;
                    break j;
                }
                w.changed.notify_all();
                q = w.changed.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        };
        if catch_unwind(AssertUnwindSafe(job)).is_err() {
            tracing::error!("a background job panicked; the thread goes on");
        }
    }
}

/// Runs `job` on the background thread (see the module comment for when it
/// runs in the caller instead).
pub fn submit(job: impl FnOnce() + Send + 'static) {
    match if enabled() { worker() } else { None } {
        Some(w) => submit_to(w, Box::new(job)),
        None => job(),
    }
}

fn submit_to(w: &Worker, job: Job) {
    let mut q = w.lock();
    if q.jobs.len() >= MAX_QUEUED {
        drop(q);
        return job();
    }
    q.jobs.push_back(job);
    drop(q);
    w.changed.notify_all();
}

/// `first`, the answer to a request for space, or, when it is a refusal
/// (`refused`) while the background thread is at work, `again()` asked
/// once that work is done (waited for at most `SPACE_FREED_WAIT`); still
/// `first` if that is refused too. Deleted volumes whose storage the
/// thread is still removing (a local volume's trash) hold space their
/// records gave back already: so a create or an expansion right after a
/// delete finds the space the delete freed, as it did when the delete
/// removed the storage before answering.
pub fn after_space_freed<T>(
    first: crate::error::Result<T>,
    refused: impl Fn(&crate::error::Error) -> bool,
    again: impl FnOnce() -> crate::error::Result<T>,
) -> crate::error::Result<T> {
    match first {
        Err(e) if refused(&e) && busy() => {
            wait_idle(SPACE_FREED_WAIT);
            match again() {
                Err(later) if refused(&later) => Err(e),
                r => r,
            }
        }
        r => r,
    }
}

/// Whether jobs are queued or running on the background thread.
pub fn busy() -> bool {
    match if enabled() { worker() } else { None } {
        Some(w) => busy_on(w),
        None => false,
    }
}

fn busy_on(w: &Worker) -> bool {
    let q = w.lock();
    !q.jobs.is_empty() || q.running
}

/// Waits until nothing is queued or running, for at most `timeout`; true
/// when that happened (also when the thread is off or never started).
pub fn wait_idle(timeout: Duration) -> bool {
    match if enabled() { worker() } else { None } {
        Some(w) => wait_idle_on(w, timeout),
        None => true,
    }
}

fn wait_idle_on(w: &Worker, timeout: Duration) -> bool {
    let until = Instant::now().checked_add(timeout);
    let mut q = w.lock();
    while !q.jobs.is_empty() || q.running {
        let left = until.map_or(Duration::from_secs(3600), |u| {
            u.saturating_duration_since(Instant::now())
        });
        if left.is_zero() {
            return false;
        }
        q = w
            .changed
            .wait_timeout(q, left)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    #[test]
    fn off_runs_in_the_caller() {
        // Nothing in this test binary turns it on (`configure` is
        // process-wide; the thread's own test uses a queue of its own).
        assert!(!enabled());
        let here = std::thread::current().id();
        let ran_on = Arc::new(Mutex::new(Vec::new()));
        let r = ran_on.clone();
        submit(move || r.lock().unwrap().push(std::thread::current().id()));
        assert_eq!(*ran_on.lock().unwrap(), vec![here]);
        assert!(wait_idle(Duration::ZERO));
        assert!(!busy());
        // Nothing at work: a refusal stands, asked again never.
        let refused = || Err::<(), _>(crate::error::Error::NoSpace("full".into()));
        let r = after_space_freed(
            refused(),
            |e| matches!(e, crate::error::Error::NoSpace(_)),
            || panic!("asked again"),
        );
        assert!(matches!(r, Err(crate::error::Error::NoSpace(_))));
    }

    /// A job that waits for `gate` to open.
    fn gated(gate: &Arc<(Mutex<bool>, Condvar)>) -> Job {
        let g = gate.clone();
        Box::new(move || {
            let mut open = g.0.lock().unwrap();
            while !*open {
                open = g.1.wait(open).unwrap();
            }
        })
    }

    fn open(gate: &Arc<(Mutex<bool>, Condvar)>) {
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
    }

    #[test]
    fn the_thread_runs_jobs_in_order_past_a_panic_and_a_full_queue_runs_in_the_caller() {
        let w = start().expect("a thread");
        let here = std::thread::current().id();
        let order = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        // The first job waits for the gate: the others queue behind it.
        submit_to(w, gated(&gate));
        for i in 0..4 {
            let o = order.clone();
            submit_to(w, Box::new(move || o.lock().unwrap().push(i)));
        }
        submit_to(w, Box::new(|| panic!("a job that panics")));
        let after = Arc::new(AtomicUsize::new(0));
        let a = after.clone();
        submit_to(
            w,
            Box::new(move || {
                a.store(1, Ordering::SeqCst);
            }),
        );
        assert!(
            !wait_idle_on(w, Duration::from_millis(50)),
            "the gate holds the first job"
        );
        assert!(busy_on(w));
        assert!(order.lock().unwrap().is_empty());
        open(&gate);
        assert!(wait_idle_on(w, Duration::from_secs(10)));
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3], "in order");
        assert_eq!(
            after.load(Ordering::SeqCst),
            1,
            "a panic does not stop the thread"
        );
        assert!(!busy_on(w));

        // A full queue runs the next job in the caller.
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        submit_to(w, gated(&gate));
        // The gated job may still be queued, not yet taken by the thread:
        // the queue is full after these either way.
        for _ in 0..MAX_QUEUED {
            submit_to(w, Box::new(|| {}));
        }
        let ran_on = Arc::new(Mutex::new(None));
        let r = ran_on.clone();
        submit_to(
            w,
            Box::new(move || *r.lock().unwrap() = Some(std::thread::current().id())),
        );
        assert_eq!(
            *ran_on.lock().unwrap(),
            Some(here),
            "a full queue: in the caller"
        );
        open(&gate);
        assert!(wait_idle_on(w, Duration::from_secs(10)));
    }
}
