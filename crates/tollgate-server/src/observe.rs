//! What every request passes through before its route: a request id (the caller's
//! `X-Request-Id` when it sends a sane one, else a fresh UUID), echoed in the answer;
//! `Authorization` and `Cookie` marked sensitive so no `Debug` output shows them; a
//! tracing span carrying the id; a panic turned into a 500; and the route's request
//! counter and latency histogram.
//!
//! One hand-written layer instead of five tower-http ones: each stacked layer cost a
//! boxed future and a clone of the route per request, and together they took a third
//! of the throughput of a trivial route (BENCHMARKS.md).

use std::convert::Infallible;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt;
use tower::{Layer, Service};
use tracing::Instrument;

use crate::error::ApiError;

pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Longest caller-supplied request id kept; a longer one is replaced.
const MAX_REQUEST_ID: usize = 128;

#[derive(Clone, Copy, Default)]
pub struct ObserveLayer;

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe { inner }
    }
}

#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
}

impl<S> Service<Request> for Observe<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        let started = Instant::now();
        let id = request_id(&request);
        let headers = request.headers_mut();
        headers.insert(REQUEST_ID.clone(), id.clone());
        for name in [header::AUTHORIZATION, header::COOKIE] {
            if let Some(value) = headers.get_mut(name) {
                value.set_sensitive(true);
            }
        }
        // Any token is a valid method: unknown ones share one label.
        let method = match *request.method() {
            Method::GET
            | Method::POST
            | Method::PUT
            | Method::PATCH
            | Method::DELETE
            | Method::HEAD
            | Method::OPTIONS => request.method().clone(),
            _ => Method::from_bytes(b"OTHER").unwrap_or_default(),
        };
        let route = request.extensions().get::<MatchedPath>().cloned();
        // The path only: query strings can carry tokens.
        let span = tracing::info_span!("request", method = %method, path = %request.uri().path(), request_id = ?id);
        // The route's future is created here, so `inner` need not be cloned.
        let future = std::panic::catch_unwind(AssertUnwindSafe(|| self.inner.call(request))).ok();
        Box::pin(
            async move {
                let response = match future {
                    Some(future) => {
                        AssertUnwindSafe(future).catch_unwind().await.ok().map(|r| r.unwrap_or_else(|e| match e {}))
                    }
                    None => None,
                };
                let mut response =
                    response.unwrap_or_else(|| ApiError::Internal("handler panicked".into()).into_response());
                let status = response.status();
                let elapsed = started.elapsed();
                let route = route.as_ref().map_or("unmatched", |p| p.as_str());
                let (counter, histogram) = crate::metrics::handles(route, &method, status.as_u16());
                counter.increment(1);
                histogram.record(elapsed.as_secs_f64());
                if status.is_server_error() {
                    tracing::error!(
                        status = status.as_u16(),
                        latency_ms = elapsed.as_millis() as u64,
                        "request failed"
                    );
                } else {
                    tracing::debug!(status = status.as_u16(), latency_us = elapsed.as_micros() as u64, "request done");
                }
                response.headers_mut().insert(REQUEST_ID.clone(), id);
                Ok(response)
            }
            .instrument(span),
        )
    }
}

/// The caller's id when it is short printable ASCII, else a new UUID.
fn request_id(request: &Request) -> HeaderValue {
    if let Some(value) = request.headers().get(&REQUEST_ID)
        && !value.is_empty()
        && value.len() <= MAX_REQUEST_ID
        && value.as_bytes().iter().all(|b| b.is_ascii_graphic())
    {
        return value.clone();
    }
    let mut buffer = uuid::Uuid::encode_buffer();
    let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buffer);
    HeaderValue::from_str(id).expect("a UUID is a valid header value")
}

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::body::Body;
    use axum::routing::get;
    use tower::ServiceExt;

    use super::*;

    async fn boom() -> &'static str {
        panic!("boom")
    }

    fn app() -> Router {
        Router::new().route("/ok", get(|| async { "ok" })).route("/panic", get(boom)).layer(ObserveLayer)
    }

    #[tokio::test]
    async fn answers_carry_a_request_id_and_keep_a_sane_one() {
        let response = app().oneshot(Request::get("/ok").body(Body::empty()).unwrap()).await.unwrap();
        let id = response.headers().get(&REQUEST_ID).unwrap().to_str().unwrap();
        assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");

        let request = Request::get("/ok").header("x-request-id", "trace-42").body(Body::empty()).unwrap();
        let response = app().oneshot(request).await.unwrap();
        assert_eq!(response.headers().get(&REQUEST_ID).unwrap(), "trace-42");

        let request = Request::get("/ok").header("x-request-id", "a".repeat(200)).body(Body::empty()).unwrap();
        let response = app().oneshot(request).await.unwrap();
        assert_eq!(response.headers().get(&REQUEST_ID).unwrap().len(), 36);
    }

    #[tokio::test]
    async fn a_panicking_handler_answers_500_with_the_error_shape() {
        let response = app().oneshot(Request::get("/panic").body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(response.status(), 500);
        assert!(response.headers().contains_key(&REQUEST_ID));
        let body = axum::body::to_bytes(response.into_body(), 1 << 16).await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"]["code"], "internal_error");
    }
}
