//! A bare axum "hello world", the yardstick the benchmarks compare Tollgate with
//! (`scripts/bench.sh`): same runtime, same machine, same load generator.

#[tokio::main]
async fn main() {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:18181".into());
    let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello" }));
    let listener = tokio::net::TcpListener::bind(&addr).await.expect("bind");
    axum::serve(listener, app).await.expect("serve");
}
