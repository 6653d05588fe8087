//! A minimal SMTP server on 127.0.0.1 that keeps every message it receives, so tests
//! exercise the real SMTP transport and read the links out of the emails.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

#[derive(Clone, Debug)]
pub struct ReceivedMail {
    pub rcpt_to: Vec<String>,
    /// Raw DATA, with quoted-printable soft breaks undone.
    pub data: String,
}

#[derive(Clone, Default)]
pub struct SmtpSink {
    pub port: u16,
    messages: Arc<Mutex<Vec<ReceivedMail>>>,
}

impl SmtpSink {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let messages: Arc<Mutex<Vec<ReceivedMail>>> = Arc::default();
        let store = messages.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let store = store.clone();
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut lines = BufReader::new(read).lines();
                    let _ = write.write_all(b"220 sink ESMTP\r\n").await;
                    let mut rcpt = Vec::new();
                    while let Ok(Some(line)) = lines.next_line().await {
                        let upper = line.to_ascii_uppercase();
                        let reply: &[u8] = if upper.starts_with("EHLO") || upper.starts_with("HELO") {
                            b"250-sink\r\n250 8BITMIME\r\n"
                        } else if upper.starts_with("MAIL FROM") {
                            rcpt.clear();
                            b"250 ok\r\n"
                        } else if upper.starts_with("RCPT TO") {
                            rcpt.push(
                                line[8..].trim().trim_matches(|c| c == '<' || c == '>' || c == ':').to_lowercase(),
                            );
                            b"250 ok\r\n"
                        } else if upper == "DATA" {
                            let _ = write.write_all(b"354 go ahead\r\n").await;
                            let mut data = String::new();
                            while let Ok(Some(l)) = lines.next_line().await {
                                if l == "." {
                                    break;
                                }
                                data.push_str(&l);
                                data.push('\n');
                            }
                            let data = data.replace("=\n", "").replace("=3D", "=");
                            store.lock().unwrap().push(ReceivedMail { rcpt_to: rcpt.clone(), data });
                            b"250 queued\r\n"
                        } else if upper == "QUIT" {
                            let _ = write.write_all(b"221 bye\r\n").await;
                            return;
                        } else {
                            b"250 ok\r\n"
                        };
                        if write.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Self { port, messages }
    }

    pub fn messages(&self) -> Vec<ReceivedMail> {
        self.messages.lock().unwrap().clone()
    }

    /// Waits (up to 10 s) for the `n`th email to `to` and returns it.
    pub async fn wait_for(&self, to: &str, n: usize) -> ReceivedMail {
        for _ in 0..200 {
            let to_them: Vec<_> = self.messages().into_iter().filter(|m| m.rcpt_to.iter().any(|r| r == to)).collect();
            if to_them.len() >= n {
                return to_them[n - 1].clone();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no email #{n} to {to} arrived; got {:?}", self.messages());
    }

    pub fn count_to(&self, to: &str) -> usize {
        self.messages().iter().filter(|m| m.rcpt_to.iter().any(|r| r == to)).count()
    }
}

impl ReceivedMail {
    /// The token of the first `.../{path}?token=...` link in the message.
    pub fn token(&self, path: &str) -> String {
        let marker = format!("/{path}?token=");
        let start =
            self.data.find(&marker).unwrap_or_else(|| panic!("no {marker} link in {}", self.data)) + marker.len();
        self.data[start..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_').collect()
    }
}
