//! The control socket: a Unix stream socket carrying one JSON request per line and one JSON
//! reply per line (docs/architecture.md).
//!
//! Requests: `{"cmd":"show_dmvpn"}`, `show_nhrp_cache`, `show_nhrp_nhs`, `clear_nhrp_cache`,
//! `show_counters`. Replies: `{"ok":true,"result":{...}}` or `{"ok":false,"error":"..."}`.
//! A malformed request gets an error reply that says what is wrong; the connection stays
//! usable. The server never interprets a request itself: it hands it to the agent's loop
//! through a channel (the loop owns the engine), so answers reflect one consistent state.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Longest request line accepted (requests are tiny; this bounds the buffer).
pub const MAX_REQUEST_LINE: usize = 4096;
/// Longest reply line the client accepts (a hub with many spokes has a large cache).
pub const MAX_REPLY_LINE: usize = 64 << 20;
/// Connections served at once; further ones wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 16;
/// A connection idle for this long is closed; also bounds how long a reply may take.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// A control command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    ShowDmvpn,
    ShowNhrpCache,
    ShowNhrpNhs,
    ClearNhrpCache,
    ShowCounters,
}

impl Command {
    pub const ALL: [Command; 5] = [
        Command::ShowDmvpn,
        Command::ShowNhrpCache,
        Command::ShowNhrpNhs,
        Command::ClearNhrpCache,
        Command::ShowCounters,
    ];

    /// The `cmd` string on the wire.
    pub fn name(self) -> &'static str {
        match self {
            Command::ShowDmvpn => "show_dmvpn",
            Command::ShowNhrpCache => "show_nhrp_cache",
            Command::ShowNhrpNhs => "show_nhrp_nhs",
            Command::ClearNhrpCache => "clear_nhrp_cache",
            Command::ShowCounters => "show_counters",
        }
    }

    pub fn from_name(s: &str) -> Option<Command> {
        Command::ALL.into_iter().find(|c| c.name() == s)
    }

    /// The request line for this command (with the trailing newline).
    pub fn request_line(self) -> String {
        format!("{}\n", json!({ "cmd": self.name() }))
    }
}

fn known_commands() -> String {
    Command::ALL.map(Command::name).join(", ")
}

/// Parses one request line. The error says what is wrong, for the error reply.
pub fn parse_request(line: &[u8]) -> Result<Command, String> {
    let text = std::str::from_utf8(line).map_err(|_| "request is not UTF-8".to_owned())?;
    let text = text.trim();
    if text.is_empty() {
        return Err(format!(
            "empty request: send one JSON object per line, e.g. {{\"cmd\":\"show_dmvpn\"}}; commands: {}",
            known_commands()
        ));
    }
    let v: Value =
        serde_json::from_str(text).map_err(|e| format!("request is not valid JSON: {e}"))?;
    let Value::Object(obj) = v else {
        return Err("request must be a JSON object such as {\"cmd\":\"show_dmvpn\"}".into());
    };
    if let Some(extra) = obj.keys().find(|k| k.as_str() != "cmd") {
        return Err(format!(
            "unknown field {extra:?} in request; only \"cmd\" is accepted"
        ));
    }
    match obj.get("cmd") {
        None => Err(format!(
            "request has no \"cmd\" field; commands: {}",
            known_commands()
        )),
        Some(Value::String(s)) => Command::from_name(s)
            .ok_or_else(|| format!("unknown command {s:?}; commands: {}", known_commands())),
        Some(other) => Err(format!("\"cmd\" must be a string, got {other}")),
    }
}

/// The reply line for a result (with the trailing newline).
pub fn reply_line(result: &Result<Value, String>) -> String {
    let v = match result {
        Ok(r) => json!({ "ok": true, "result": r }),
        Err(e) => json!({ "ok": false, "error": e }),
    };
    format!("{v}\n")
}

/// A request handed to the agent's loop; send the answer on `reply`.
#[derive(Debug)]
pub struct Request {
    pub command: Command,
    pub reply: oneshot::Sender<Result<Value, String>>,
}

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "control socket {path}: another agent is already listening there; stop it or set a different control_socket"
    )]
    InUse { path: PathBuf },
    #[error(
        "control socket {path}: the path exists and is not a socket; remove it or set a different control_socket"
    )]
    NotASocket { path: PathBuf },
    #[error("control socket {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Removes the socket file when dropped, if it is still the one this agent created (another
/// agent may have replaced it in the meantime).
#[derive(Debug)]
pub struct SocketGuard {
    path: PathBuf,
    dev_ino: Option<(u64, u64)>,
}

impl SocketGuard {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if ours.is_some() && ours == self.dev_ino {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds the control socket at `path` (mode 0600), replacing a stale socket file left by an
/// agent that died. Must be called inside a tokio runtime.
pub fn bind(path: &Path) -> Result<(UnixListener, SocketGuard), ControlError> {
    let io = |what: &'static str| {
        let path = path.to_owned();
        move |source| ControlError::Io { path, what, source }
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io("creating the parent directory"))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => {
                    return Err(ControlError::InUse {
                        path: path.to_owned(),
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    // Nobody listens: the file was left behind by an agent that died.
                    tracing::info!(path = %path.display(), "replacing stale control socket");
                    std::fs::remove_file(path).map_err(io("removing the stale socket"))?;
                }
                Err(e) => return Err(io("probing the existing socket")(e)),
            }
        }
        Ok(_) => {
            return Err(ControlError::NotASocket {
                path: path.to_owned(),
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("inspecting the path")(e)),
    }
    let listener = UnixListener::bind(path).map_err(io("binding"))?;
    // Show commands reveal the topology and clear changes it: owner only.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io("setting mode 0600"))?;
    let dev_ino = std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()));
    Ok((
        listener,
        SocketGuard {
            path: path.to_owned(),
            dev_ino,
        },
    ))
}

/// Accepts connections until the receiving side of `tx` is gone. Each connection gets its
/// own task; at most [`MAX_CONNECTIONS`] are served at once.
pub async fn serve(listener: UnixListener, tx: mpsc::Sender<Request>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = tx.closed() => return,
        };
        match accepted {
            Ok((stream, _)) => {
                let tx = tx.clone();
                tokio::spawn(async move {
                    handle_connection(stream, tx).await;
                    drop(permit);
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

enum Line {
    Eof,
    TooLong,
    Data(Vec<u8>),
}

async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> std::io::Result<Line> {
    let mut buf = Vec::new();
    let n = r
        .take(MAX_REQUEST_LINE as u64 + 1)
        .read_until(b'\n', &mut buf)
        .await?;
    if n == 0 {
        return Ok(Line::Eof);
    }
    if buf.last() != Some(&b'\n') && buf.len() > MAX_REQUEST_LINE {
        return Ok(Line::TooLong);
    }
    Ok(Line::Data(buf))
}

async fn handle_connection(stream: UnixStream, tx: mpsc::Sender<Request>) {
    let (r, mut w) = stream.into_split();
    let mut r = tokio::io::BufReader::new(r);
    loop {
        let line = match tokio::time::timeout(IO_TIMEOUT, read_line(&mut r)).await {
            Err(_) | Ok(Err(_)) | Ok(Ok(Line::Eof)) => return,
            Ok(Ok(Line::TooLong)) => {
                let msg = format!("request longer than {MAX_REQUEST_LINE} bytes");
                let _ = w.write_all(reply_line(&Err(msg)).as_bytes()).await;
                return;
            }
            Ok(Ok(Line::Data(l))) => l,
        };
        let result = match parse_request(&line) {
            Err(e) => Err(e),
            Ok(command) => ask(&tx, command).await,
        };
        let out = reply_line(&result);
        match tokio::time::timeout(IO_TIMEOUT, w.write_all(out.as_bytes())).await {
            Ok(Ok(())) => {}
            _ => return,
        }
    }
}

async fn ask(tx: &mpsc::Sender<Request>, command: Command) -> Result<Value, String> {
    let (reply, rx) = oneshot::channel();
    if tx.send(Request { command, reply }).await.is_err() {
        return Err("the agent is shutting down".into());
    }
    match tokio::time::timeout(IO_TIMEOUT, rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err("the agent dropped the request (shutting down?)".into()),
        Err(_) => Err(format!(
            "the agent did not answer within {}s",
            IO_TIMEOUT.as_secs()
        )),
    }
}

/// Something that answers control commands; the agent's loop answers inline, tests use a fake.
pub trait StateProvider: Send {
    fn handle(&mut self, command: Command) -> Result<Value, String>;
}

/// Answers requests from `rx` with `provider` until every sender is gone.
pub async fn run_provider<P: StateProvider>(mut rx: mpsc::Receiver<Request>, mut provider: P) {
    while let Some(req) = rx.recv().await {
        let _ = req.reply.send(provider.handle(req.command));
    }
}

// ------------------------------------------------------------------------------- client

/// Why a CLI request failed. Each message is one line and names the socket.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("agent not running: cannot connect to control socket {path}: {source}")]
    NotRunning {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket {path}: malformed reply: {why}")]
    Protocol { path: PathBuf, why: String },
    #[error("agent error: {0}")]
    Agent(String),
}

/// Sends one raw request line and returns the whole reply object (`{"ok":…}`).
pub fn request_raw(path: &Path, line: &str, timeout: Duration) -> Result<Value, ClientError> {
    let io = |what: &'static str| {
        let path = path.to_owned();
        move |source| ClientError::Io { path, what, source }
    };
    let stream =
        std::os::unix::net::UnixStream::connect(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                ClientError::NotRunning {
                    path: path.to_owned(),
                    source,
                }
            }
            _ => ClientError::Io {
                path: path.to_owned(),
                what: "connecting (permission denied means: run as root or as the agent's user)",
                source,
            },
        })?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(io("setting the timeout"))?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(io("setting the timeout"))?;
    let mut w = &stream;
    let mut line = line.to_owned();
    if !line.ends_with('\n') {
        line.push('\n');
    }
    w.write_all(line.as_bytes())
        .map_err(io("sending the request"))?;
    let mut reader = BufReader::new(&stream).take(MAX_REPLY_LINE as u64);
    let mut reply = String::new();
    reader
        .read_line(&mut reply)
        .map_err(io("reading the reply"))?;
    if reply.is_empty() {
        return Err(ClientError::Protocol {
            path: path.to_owned(),
            why: "connection closed without a reply".into(),
        });
    }
    serde_json::from_str(&reply).map_err(|e| ClientError::Protocol {
        path: path.to_owned(),
        why: e.to_string(),
    })
}

/// Sends `command` and returns its `result`, or the agent's error.
pub fn request(path: &Path, command: Command, timeout: Duration) -> Result<Value, ClientError> {
    let reply = request_raw(path, &command.request_line(), timeout)?;
    match reply.get("ok") {
        Some(Value::Bool(true)) => Ok(reply.get("result").cloned().unwrap_or(Value::Null)),
        Some(Value::Bool(false)) => Err(ClientError::Agent(
            reply
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("unspecified error")
                .to_owned(),
        )),
        _ => Err(ClientError::Protocol {
            path: path.to_owned(),
            why: "reply has no boolean \"ok\" field".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_command() {
        for c in Command::ALL {
            assert_eq!(parse_request(c.request_line().as_bytes()), Ok(c));
        }
        assert_eq!(
            parse_request(b"  {\"cmd\" : \"show_dmvpn\"}  \r\n"),
            Ok(Command::ShowDmvpn)
        );
    }

    #[test]
    fn malformed_requests_name_the_problem() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "empty request"),
            (b"show dmvpn", "not valid JSON"),
            (b"[1,2]", "JSON object"),
            (b"{}", "no \"cmd\""),
            (b"{\"cmd\":1}", "must be a string"),
            (b"{\"cmd\":\"reboot\"}", "unknown command \"reboot\""),
            (b"{\"cmd\":\"show_dmvpn\",\"x\":1}", "unknown field \"x\""),
            (b"\xff\xfe", "not UTF-8"),
        ];
        for (input, want) in cases {
            let e = parse_request(input).unwrap_err();
            assert!(
                e.contains(want),
                "{input:?}: {e:?} does not contain {want:?}"
            );
        }
    }

    #[test]
    fn reply_lines() {
        let ok = reply_line(&Ok(json!({"a": 1})));
        assert_eq!(ok, "{\"ok\":true,\"result\":{\"a\":1}}\n");
        let err = reply_line(&Err("bad \"x\"".into()));
        let v: Value = serde_json::from_str(&err).unwrap();
        assert_eq!(v["ok"], false);
        assert_eq!(v["error"], "bad \"x\"");
    }
}
