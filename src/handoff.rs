//! Hands an RPC's blocking work to another thread and takes its result
//! back, without paying for two sleeping threads' wake-ups when requests
//! come one at a time.
//!
//! The async thread never runs a syscall that touches a volume (one stuck
//! on a dead disk or server would stop every RPC, Probe included), so each
//! operation goes to a blocking thread and its result comes back. A
//! sleeping thread's wake-up is the dearest part of that on a virtual
//! machine whose idle CPUs halt: 40 to 140 µs each way, measured (README,
//! "Performance"). So, bounded by `--busy-poll-us`:
//! - one dedicated worker thread takes the operations while it is free
//!   (any other goes to tokio's blocking pool, as before), and after one
//!   it polls for the next instead of sleeping at once;
//! - the RPC waiting for its operation polls for the result instead of
//!   parking its thread, and stops at once when a client has sent
//!   anything on any of the server's sockets (the async thread must then
//!   read it).
//!
//! Both polls run only while requests come one at a time: nothing else in
//! flight, and no RPC started beside other work in the last 100 ms
//! (`rpc::recently_alone`); under concurrent load they never start. Each
//! turn of a poll yields the CPU (`sched_yield`) to any other thread that
//! can run on it: a poll that kept its CPU from the client or from the
//! thread it waits for added a scheduler tick to the latency it was to
//! save (NodePublish p99 1.1 ms instead of 0.16 ms, measured). Both polls
//! end early and the threads then sleep as they would have without them;
//! with `--busy-poll-us 0` everything goes to the blocking pool. A hung
//! operation holds the worker, and every later one then goes to the pool.
//! A panic in an operation is caught; its RPC gets an error.
use std::os::fd::AsFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use thiserror::Error as ThisError;

#[derive(Debug, ThisError, PartialEq, Eq)]
pub enum HandoffError {
    #[error("the operation panicked or its thread was lost")]
    Lost,
}

type Job = Box<dyn FnOnce() + Send>;

/// Microseconds each poll may last; 0 until `configure` (so code that never
/// configures it, such as the handler tests, always uses the pool).
static BUSY_POLL_US: AtomicU64 = AtomicU64::new(0);

/// Sets how long the worker and a waiting RPC may poll (0: never).
pub fn configure(busy_poll: Duration) {
    BUSY_POLL_US.store(busy_poll.as_micros() as u64, Ordering::Relaxed);
}

fn busy_poll() -> Duration {
    Duration::from_micros(BUSY_POLL_US.load(Ordering::Relaxed))
}

/// True while the worker waits for an operation; an RPC claims it by
/// setting it false, the worker sets it back when the operation is done.
static FREE: AtomicBool = AtomicBool::new(true);

/// True while this is the only work in flight besides `others` (the RPC
/// just served, or the waiting RPC and its operation) and no RPC started
/// beside other work lately: requests come one at a time.
fn alone(others: i64) -> bool {
    crate::rpc::in_flight() <= others && crate::rpc::recently_alone()
}

/// The worker thread's queue, started on first use; None when it could not
/// start.
fn worker() -> Option<&'static mpsc::Sender<Job>> {
    static WORKER: OnceLock<Option<mpsc::Sender<Job>>> = OnceLock::new();
    WORKER
        .get_or_init(|| {
            let (jobs, rx) = mpsc::channel::<Job>();
            match std::thread::Builder::new()
                .name("berth-op".into())
                .spawn(move || work(rx))
            {
                Ok(_) => Some(jobs),
                Err(e) => {
                    tracing::warn!(error = %e, "no operation worker thread; using the blocking pool only");
                    None
                }
            }
        })
        .as_ref()
}

fn work(rx: mpsc::Receiver<Job>) {
    while let Some(job) = next_job(&rx) {
        // A panic drops the job's result sender: its RPC gets `Lost`.
        let _ = catch_unwind(AssertUnwindSafe(job));
        FREE.store(true, Ordering::Release);
    }
}

/// The next operation: polled for while nothing else is in flight (the
/// RPC just served may still count as one) and the bound lasts, then
/// waited for asleep. None once no sender is left.
fn next_job(rx: &mpsc::Receiver<Job>) -> Option<Job> {
    let until = Instant::now() + busy_poll();
    while alone(1) && Instant::now() < until {
        match rx.try_recv() {
            Ok(job) => return Some(job),
            Err(mpsc::TryRecvError::Disconnected) => return None,
            Err(mpsc::TryRecvError::Empty) => std::thread::yield_now(),
        }
    }
    rx.recv().ok()
}

/// The server's sockets (the listener and every accepted connection),
/// readable when a client has sent something the async thread must read.
fn sockets() -> Option<&'static Epoll> {
    static SOCKETS: OnceLock<Option<Epoll>> = OnceLock::new();
    SOCKETS
        .get_or_init(|| Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).ok())
        .as_ref()
}

/// Watches one of the server's sockets: while it has something to read, no
/// RPC polls for its result. The kernel drops it from the set when it is
/// closed. Failing to watch turns the polling off for good (it could hide
/// a request).
pub fn watch(fd: impl AsFd) {
    let ok = sockets().is_some_and(|ep| {
        ep.add(
            fd,
            EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP, 0),
        )
        .is_ok()
    });
    if !ok && !busy_poll().is_zero() {
        tracing::warn!("cannot watch a client socket; busy polling is off from now on");
        configure(Duration::ZERO);
    }
}

/// True when a watched socket has something to read (or when that cannot be
/// told).
fn incoming() -> bool {
    let mut ev = [EpollEvent::empty()];
    match sockets() {
        Some(ep) => !matches!(ep.wait(&mut ev, nix::poll::PollTimeout::ZERO), Ok(0)),
        None => true,
    }
}

/// Runs `f` on another thread and returns its result (see the module
/// comment). The caller counts as one unit in flight and `f` as another
/// (`Driver::run`), so "alone" is at most two.
pub async fn run<T, F>(f: F) -> Result<T, HandoffError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let poll = busy_poll();
    let claimed = if poll.is_zero() {
        None
    } else {
        worker().filter(|_| {
            FREE.compare_exchange(true, false, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        })
    };
    let Some(w) = claimed else {
        return tokio::task::spawn_blocking(f)
            .await
            .map_err(|_| HandoffError::Lost);
    };
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move || {
        let _ = tx.send(f());
    });
    if let Err(mpsc::SendError(job)) = w.send(job) {
        // The worker is gone (it cannot be, short of a bug): the pool.
        tokio::task::spawn_blocking(job);
        return rx.await.map_err(|_| HandoffError::Lost);
    }
    let until = Instant::now() + poll;
    while alone(2) && Instant::now() < until && !incoming() {
        match rx.try_recv() {
            Ok(v) => return Ok(v),
            Err(tokio::sync::oneshot::error::TryRecvError::Closed) => {
                return Err(HandoffError::Lost)
            }
            Err(tokio::sync::oneshot::error::TryRecvError::Empty) => std::thread::yield_now(),
        }
    }
    rx.await.map_err(|_| HandoffError::Lost)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Barrier};

    fn on() {
        configure(Duration::from_micros(500));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn returns_the_result_from_another_thread() {
        on();
        let here = std::thread::current().id();
        for i in 0..50u32 {
            let (v, there) = run(move || (i * 2, std::thread::current().id()))
                .await
                .expect("ran");
            assert_eq!(v, i * 2);
            assert_ne!(there, here, "the operation ran on the async thread");
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_held_worker_sends_the_next_operation_to_the_pool() {
        on();
        // Hold whichever thread takes the first operation until the second
        // one has run: if the second waited for the first's thread, this
        // would never finish (the test would hang, then time out below).
        let gate = Arc::new(Barrier::new(2));
        let g1 = gate.clone();
        let first = tokio::spawn(run(move || {
            g1.wait();
            1
        }));
        tokio::task::yield_now().await;
        let g2 = gate.clone();
        let second = tokio::time::timeout(
            Duration::from_secs(10),
            run(move || {
                g2.wait();
                2
            }),
        )
        .await
        .expect("the second operation waited for the first one's thread");
        assert_eq!(second, Ok(2));
        assert_eq!(first.await.expect("joined"), Ok(1));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_panic_is_an_error_and_the_worker_lives_on() {
        on();
        let r: Result<u8, _> = run(|| panic!("deliberate")).await;
        assert_eq!(r, Err(HandoffError::Lost));
        for _ in 0..5 {
            assert_eq!(run(|| 7u8).await, Ok(7));
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_readable_socket_stops_the_wait() {
        on();
        let (a, mut b) = std::os::unix::net::UnixStream::pair().expect("pair");
        watch(&a);
        assert!(!incoming(), "nothing sent yet");
        std::io::Write::write_all(&mut b, b"x").expect("write");
        assert!(incoming(), "a sent byte is not seen");
        drop(a);
        drop(b);
        assert!(!incoming(), "a closed socket stays in the set");
    }
}
