//! Prometheus metrics and /healthz on `--metrics-address` (off by default):
//! per-RPC request counts and latency histograms by method and gRPC code,
//! volumes by kind and phase, capacity and allocation per pool, whether
//! volume sizes are enforced, operations in flight and build info.
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::driver::Driver;
use crate::state::Phase;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    pub method: &'static str,
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VolumeLabels {
    pub kind: &'static str,
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
}

/// RPC metrics, recorded at the server boundary (`rpc::serve`).
pub struct RpcMetrics {
    pub requests: Family<RpcLabels, Counter>,
    pub duration: Family<RpcLabels, Histogram>,
}

fn rpc_metrics() -> &'static RpcMetrics {
    static M: OnceLock<RpcMetrics> = OnceLock::new();
    M.get_or_init(|| RpcMetrics {
        requests: Family::default(),
        duration: Family::new_with_constructor(|| {
            // 50 µs .. ~100 s
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.00005, 2.5, 16,
            ))
        }),
    })
}

/// Records one finished RPC.
pub fn observe_rpc(method: &'static str, code: tonic::Code, elapsed: Duration) {
    let m = rpc_metrics();
    let labels = RpcLabels {
        method,
        code: code_name(code),
    };
    m.requests.get_or_create(&labels).inc();
    m.duration
        .get_or_create(&labels)
        .observe(elapsed.as_secs_f64());
}

pub fn code_name(c: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match c {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Renders the whole registry, sampling the driver's state now.
pub fn render(d: &Driver) -> Result<String, std::fmt::Error> {
    let mut reg = Registry::with_prefix("berth");
    let m = rpc_metrics();
    reg.register(
        "rpc_requests",
        "CSI requests by method and gRPC code",
        m.requests.clone(),
    );
    reg.register(
        "rpc_duration_seconds",
        "CSI request latency by method and gRPC code",
        m.duration.clone(),
    );
    let in_flight: Gauge = Gauge::default();
    in_flight.set(crate::rpc::in_flight());
    reg.register(
        "operations_in_flight",
        "RPCs and volume operations running now",
        in_flight,
    );
    let build: Family<BuildLabels, Gauge> = Family::default();
    build
        .get_or_create(&BuildLabels {
            version: env!("CARGO_PKG_VERSION"),
        })
        .set(1);
    reg.register("build_info", "Build information", build);

    let volumes: Family<VolumeLabels, Gauge> = Family::default();
    for rec in d.store.filter(|_| true) {
        volumes
            .get_or_create(&VolumeLabels {
                kind: rec.kind.as_str(),
                phase: match rec.phase {
                    // A pool disk held for an operator (`block::hold_disk`)
                    // is no ready volume.
                    _ if rec.id.starts_with(crate::kinds::block::HELD_PREFIX) => "held",
                    Phase::Creating => "creating",
                    Phase::Ready => "ready",
                    Phase::Deleting => "deleting",
                },
            })
            .inc();
    }
    reg.register("volumes", "Volumes by kind and phase", volumes);

    let enforced: Family<PoolLabels, Gauge> = Family::default();
    for k in d.kinds() {
        if let Some(e) = k.sizes_enforced() {
            enforced
                .get_or_create(&PoolLabels {
                    kind: k.kind().as_str(),
                })
                .set(i64::from(e));
        }
    }
    reg.register(
        "volume_sizes_enforced",
        "1 when volumes of the kind are held to their size (local: project quotas on the local root), 0 when a size is only a promise",
        enforced,
    );

    let free: Family<PoolLabels, Gauge> = Family::default();
    let allocated: Family<PoolLabels, Gauge> = Family::default();
    for k in d.kinds() {
        let labels = PoolLabels {
            kind: k.kind().as_str(),
        };
        // Kinds without a pool of their own (NFS) report no free space.
        if let Ok(p) = k.pool_capacity() {
            if k.node_local() && p.free_bytes < i64::MAX {
                free.get_or_create(&labels).set(p.free_bytes);
            }
        }
        allocated
            .get_or_create(&labels)
            .set(d.store.promised(k.kind()));
    }
    reg.register(
        "pool_free_bytes",
        "Free bytes of each volume kind's pool",
        free,
    );
    reg.register(
        "pool_allocated_bytes",
        "Bytes promised to volumes of each kind",
        allocated,
    );
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &reg)?;
    Ok(out)
}

fn reply(status: StatusCode, ctype: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

async fn handle(d: Arc<Driver>, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/metrics" => {
            let d2 = d.clone();
            match tokio::task::spawn_blocking(move || render(&d2)).await {
                Ok(Ok(text)) => reply(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text,
                ),
                _ => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    "metrics encoding failed\n".into(),
                ),
            }
        }
        "/healthz" => {
            let c = d.clone();
            match tokio::task::spawn_blocking(move || crate::identity::probe_check(&c)).await {
                Ok(Ok(())) => reply(StatusCode::OK, "text/plain", "ok\n".into()),
                Ok(Err(e)) => reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("{}\n", e.render()),
                ),
                Err(_) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    "probe failed\n".into(),
                ),
            }
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// Binds the metrics listener (so a bad address fails start-up).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// Connections served at once; more wait in the kernel's backlog (they
/// hold no file descriptor of berth's until accepted). The endpoint is
/// usually on the node's network (`0.0.0.0`), so anyone who can reach it
/// could otherwise open connections until berth runs out of file
/// descriptors, and then the CSI socket accepts nobody (Probe times out).
pub const MAX_CONNECTIONS: usize = 32;

/// How long a connection may take to send a request's headers, and how
/// long it may stay idle between requests, before it is closed. A scrape
/// sends its headers at once.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one connection is served at most (a client that sends a body
/// forever, or reads the answer a byte at a time); a scraper reconnects.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Serves /metrics and /healthz until the process ends: at most
/// `MAX_CONNECTIONS` connections at once, each closed when its headers
/// are late (`HEADER_TIMEOUT`) or its lifetime is over
/// (`CONNECTION_LIFETIME`).
pub async fn serve(d: Arc<Driver>, listener: tokio::net::TcpListener) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving metrics and healthz");
    }
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        // A slot first: past the bound, connections stay in the backlog.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let d = d.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let svc = hyper::service::service_fn(move |req| {
                let d = d.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(d, req).await) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(io, svc);
            match tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
                Ok(Err(e)) => tracing::debug!(error = %e, "metrics connection ended"),
                Ok(Ok(())) => {}
                Err(_) => tracing::debug!("metrics connection closed at the end of its lifetime"),
            }
        });
    }
}
