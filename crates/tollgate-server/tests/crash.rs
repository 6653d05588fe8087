//! Nothing acknowledged is lost: a storm of requests (consumes, credit spends) against
//! the real binary, a `kill -9` in the middle of it, a restart on the same SQLite
//! file, and then every request that was answered 200 must be counted.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

struct Server {
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn tollgate(data: &std::path::Path, port: u16) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    let plans = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/plans.toml");
    cmd.env("TOLLGATE_DATA_DIR", data)
        .env("TOLLGATE_LISTEN", format!("127.0.0.1:{port}"))
        .env("TOLLGATE_PLANS_FILE", plans)
        .env("TOLLGATE_LOG", "error")
        .env_remove("TOLLGATE_DATABASE_URL")
        .env_remove("TOLLGATE_REDIS_URL");
    cmd
}

async fn start(data: &std::path::Path, port: u16, client: &reqwest::Client) -> Server {
    let child = tollgate(data, port).arg("serve").stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let server = Server { child };
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if client.get(format!("http://127.0.0.1:{port}/readyz")).send().await.is_ok_and(|r| r.status().is_success()) {
            return server;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("server did not become ready");
}

/// A server on a fresh data directory with an `admin:*` service key.
struct Setup {
    dir: tempfile::TempDir,
    port: u16,
    key: String,
    client: reqwest::Client,
    base: String,
}

impl Setup {
    async fn new() -> (Self, Server) {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let out = tollgate(dir.path(), port)
            .args(["keys", "create", "--name", "crash", "--scopes", "admin:*"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let key = String::from_utf8(out.stdout).unwrap().lines().last().unwrap().trim().to_owned();
        let client = reqwest::Client::new();
        let server = start(dir.path(), port, &client).await;
        let base = format!("http://127.0.0.1:{port}");
        (Self { dir, port, key, client, base }, server)
    }

    async fn post(&self, path: &str, body: serde_json::Value) -> reqwest::Response {
        self.client.post(format!("{}{path}", self.base)).bearer_auth(&self.key).json(&body).send().await.unwrap()
    }

    async fn get(&self, path: &str) -> serde_json::Value {
        let r = self.client.get(format!("{}{path}", self.base)).bearer_auth(&self.key).send().await.unwrap();
        r.json().await.unwrap()
    }

    /// 32 clients POST `body` to `path` as fast as they can; the server is killed
    /// (SIGKILL) after 1.5 s, then started again on the same files. Returns how many
    /// requests were answered 2xx before the kill.
    async fn storm_kill_restart(&self, server: Server, path: &str, body: serde_json::Value) -> (u64, Server) {
        let mut server = server;
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let (client, url, key, body) =
                (self.client.clone(), format!("{}{path}", self.base), self.key.clone(), body.clone());
            tasks.push(tokio::spawn(async move {
                let mut acknowledged = 0u64;
                loop {
                    match client.post(&url).bearer_auth(&key).json(&body).send().await {
                        Ok(res) if res.status().is_success() => acknowledged += 1,
                        Ok(res) => panic!("unexpected {}", res.status()),
                        Err(_) => return acknowledged,
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        server.child.kill().unwrap(); // SIGKILL
        server.child.wait().unwrap();
        let mut acknowledged = 0;
        for t in tasks {
            acknowledged += t.await.unwrap();
        }
        assert!(acknowledged > 0, "the storm did get answers before the kill");
        drop(server);
        (acknowledged, start(self.dir.path(), self.port, &self.client).await)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_consumes_survive_kill_9() {
    let (setup, server) = Setup::new().await;
    assert!(setup.post("/v1/accounts", json!({ "external_id": "storm" })).await.status().is_success());
    let body = json!({ "account": "ext:storm", "meter": "requests" });
    let (acknowledged, _restarted) = setup.storm_kill_restart(server, "/v1/usage/consume", body).await;
    let r = setup.get("/v1/accounts/ext:storm/entitlements").await;
    let used = r["meters"][0]["windows"][0]["used"].as_u64().unwrap();
    eprintln!("acknowledged {acknowledged}, counted after restart {used}");
    // In-flight consumes may have committed without their answer arriving, never the
    // other way round.
    assert!(used >= acknowledged, "acknowledged {acknowledged}, counted {used}");
    assert!(used <= acknowledged + 32 * 512, "counted {used} of {acknowledged} acknowledged");
}

/// The same for credits: spends answered 200 before a `kill -9` are all in the
/// balance after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_spends_survive_kill_9() {
    const GRANTED: i64 = 1_000_000;
    let (setup, server) = Setup::new().await;
    assert!(setup.post("/v1/accounts", json!({ "external_id": "spender" })).await.status().is_success());
    let r = setup.post("/v1/accounts/ext:spender/credits/grant", json!({ "amount": GRANTED })).await;
    assert!(r.status().is_success());
    let path = "/v1/accounts/ext:spender/credits/spend";
    let (acknowledged, _restarted) = setup.storm_kill_restart(server, path, json!({ "amount": 1 })).await;
    let r = setup.get("/v1/accounts/ext:spender/credits").await;
    let spent = GRANTED - r["balance"].as_i64().unwrap();
    eprintln!("acknowledged {acknowledged}, spent after restart {spent}");
    assert_eq!(r["used"].as_i64().unwrap(), spent, "the totals agree with the balance");
    let acknowledged = acknowledged as i64;
    assert!(spent >= acknowledged, "acknowledged {acknowledged}, spent {spent}");
    assert!(spent <= acknowledged + 32, "spent {spent}, acknowledged {acknowledged}: at most one in flight each");
}
