//! gRPC server reflection (grpcurl and similar tools), both versions: v1,
//! and v1alpha for older tools. Each is built on its first call, not at
//! start-up: decoding the descriptors leaves about half a MiB resident
//! (heap and the code that decodes them) and costs millions of
//! instructions, for a service no CO calls.
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::NamedService;
use tonic_reflection::server::{v1, v1alpha, Builder, Error};

/// The routes of both reflection services.
pub fn routes() -> tonic::service::Routes {
    tonic::service::Routes::new(Lazy::new(build_v1)).add_service(Lazy::new(build_v1alpha))
}

fn build_v1() -> Result<v1::ServerReflectionServer<impl v1::ServerReflection>, Error> {
    Builder::configure()
        .register_encoded_file_descriptor_set(crate::csi::FILE_DESCRIPTOR_SET)
        .build_v1()
}

fn build_v1alpha() -> Result<v1alpha::ServerReflectionServer<impl v1alpha::ServerReflection>, Error>
{
    Builder::configure()
        .register_encoded_file_descriptor_set(crate::csi::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
}

/// A service built by `make` on its first call and kept. If building fails
/// (the descriptors are compiled in: a unit test builds both), each call is
/// answered UNAVAILABLE and the failure logged once.
struct Lazy<S> {
    built: Arc<OnceLock<Option<S>>>,
    make: fn() -> Result<S, Error>,
}

impl<S> Clone for Lazy<S> {
    fn clone(&self) -> Self {
        Lazy {
            built: self.built.clone(),
            make: self.make,
        }
    }
}

impl<S> Lazy<S> {
    fn new(make: fn() -> Result<S, Error>) -> Self {
        Lazy {
            built: Arc::new(OnceLock::new()),
            make,
        }
    }
}

impl<S: NamedService> NamedService for Lazy<S> {
    const NAME: &'static str = S::NAME;
}

type Answer = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

impl<S> tower::Service<http::Request<Body>> for Lazy<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + NamedService
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Answer;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The built service is always ready (tonic's generated servers are).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Answer {
        let built = self.built.get_or_init(|| match (self.make)() {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(service = S::NAME, error = %e, "building the reflection service failed");
                None
            }
        });
        match built.clone() {
            Some(s) => Box::pin(tower::ServiceExt::oneshot(s, req)),
            None => {
                let resp = tonic::Status::unavailable("the reflection service could not be built")
                    .into_http();
                Box::pin(std::future::ready(Ok(resp)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn both_reflection_services_build_from_the_compiled_in_descriptors() {
        assert!(super::build_v1().is_ok());
        assert!(super::build_v1alpha().is_ok());
    }
}
