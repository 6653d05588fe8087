//! Prometheus metrics: a request counter and a latency histogram per route (the
//! matched route pattern, never the raw path, so ids do not explode cardinality).

use axum::http::Method;
use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::collections::HashMap;
use std::sync::{LazyLock, OnceLock, RwLock};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder once (the `metrics` facade is global by design)
/// and returns the handle that renders it.
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5])
            .expect("static buckets are valid")
            .build_recorder();
        let handle = recorder.handle();
        // Fails only if another recorder was installed first (e.g. by an embedding
        // program); rendering then shows ours empty, which is harmless.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

pub fn render() -> String {
    install().render()
}

/// The counter and histogram of one (route, method, status), looked up once: building
/// a labelled key and finding it in the registry on every request cost more than the
/// rest of this layer together.
type Handles = (Method, u16, Counter, Histogram);

static HANDLES: LazyLock<RwLock<HashMap<String, Vec<Handles>>>> = LazyLock::new(Default::default);

pub fn handles(route: &str, method: &Method, status: u16) -> (Counter, Histogram) {
    let find = |entries: &[Handles]| {
        entries.iter().find(|(m, s, _, _)| m == method && *s == status).map(|(_, _, c, h)| (c.clone(), h.clone()))
    };
    if let Some(found) = HANDLES.read().unwrap_or_else(|e| e.into_inner()).get(route).and_then(|e| find(e)) {
        return found;
    }
    let labels = [("method", method.as_str().to_owned()), ("route", route.to_owned()), ("status", status.to_string())];
    let counter = metrics::counter!("http_requests_total", &labels);
    let histogram = metrics::histogram!("http_request_duration_seconds", &labels);
    let mut map = HANDLES.write().unwrap_or_else(|e| e.into_inner());
    let entries = map.entry(route.to_owned()).or_default();
    if find(entries).is_none() {
        entries.push((method.clone(), status, counter.clone(), histogram.clone()));
    }
    (counter, histogram)
}
