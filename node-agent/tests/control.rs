//! Control protocol round trips over a real Unix socket, answered by a fake state provider.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dmvpn_agent::cli::{self, ClientArgs};
use dmvpn_agent::control::{self, Command, ControlError, StateProvider};
use dmvpn_agent::view::{ClearView, DmvpnView, PeerView, TrafficView};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(5);

/// Answers with fixed views and counts the clears, so a test sees the request reached it.
struct Fake {
    clears: u64,
}

fn dmvpn_view() -> DmvpnView {
    DmvpnView {
        interface: "dmvpn0".into(),
        role: "hub".into(),
        phase: 3,
        tunnel_address: "10.42.0.1/24".parse().unwrap(),
        nbma_address: "198.51.100.1".parse().unwrap(),
        uptime_secs: 10,
        peers: vec![PeerView {
            tunnel_address: "10.42.0.2".parse().unwrap(),
            nbma_address: Some("198.51.100.2".parse().unwrap()),
            state: "up".into(),
            state_secs: Some(3),
            attributes: "D".into(),
            prefixes: vec!["10.1.2.0/24".parse().unwrap()],
            expires_in_secs: Some(597),
            ike_state: Some("established".into()),
            ike_error: None,
        }],
        traffic: TrafficView::default(),
        ipsec: None,
    }
}

impl StateProvider for Fake {
    fn handle(&mut self, command: Command) -> Result<Value, String> {
        match command {
            Command::ShowDmvpn => Ok(serde_json::to_value(dmvpn_view()).unwrap()),
            Command::ClearNhrpCache => {
                self.clears += 1;
                Ok(serde_json::to_value(ClearView {
                    cleared: self.clears,
                })
                .unwrap())
            }
            Command::ShowCounters => Ok(json!({"nhrp": {"errors_sent": 0}})),
            Command::ShowNhrpCache | Command::ShowNhrpNhs => Err("not in this fake".into()),
        }
    }
}

/// Starts a server on `path` answered by [`Fake`]; returns the guard that removes the file.
fn start(path: &Path) -> control::SocketGuard {
    let (listener, guard) = control::bind(path).unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tokio::spawn(control::serve(listener, tx));
    tokio::spawn(control::run_provider(rx, Fake { clears: 0 }));
    guard
}

async fn blocking<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    tokio::task::spawn_blocking(f).await.unwrap()
}

fn sock(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("run").join("agent.sock")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir);
    let _guard = start(&path);

    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");

    let p = path.clone();
    let v = blocking(move || control::request(&p, Command::ShowDmvpn, T))
        .await
        .unwrap();
    assert_eq!(
        serde_json::from_value::<DmvpnView>(v).unwrap(),
        dmvpn_view()
    );

    for expected in 1..=2u64 {
        let p = path.clone();
        let v = blocking(move || control::request(&p, Command::ClearNhrpCache, T))
            .await
            .unwrap();
        assert_eq!(v, json!({"cleared": expected}));
    }

    let p = path.clone();
    let e = blocking(move || control::request(&p, Command::ShowNhrpNhs, T))
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), "agent error: not in this fake");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_error_replies_and_the_connection_survives() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir);
    let _guard = start(&path);
    let p = path.clone();
    blocking(move || {
        let s = std::os::unix::net::UnixStream::connect(&p).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        let mut w = &s;
        let mut r = BufReader::new(&s);
        let mut ask = |line: &[u8]| -> Value {
            w.write_all(line).unwrap();
            let mut reply = String::new();
            r.read_line(&mut reply).unwrap();
            serde_json::from_str(&reply).unwrap()
        };
        let v = ask(b"not json\n");
        assert_eq!(v["ok"], false);
        assert!(
            v["error"].as_str().unwrap().contains("not valid JSON"),
            "{v}"
        );
        let v = ask(b"{\"cmd\":\"format_disk\"}\n");
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .contains("unknown command \"format_disk\""),
            "{v}"
        );
        let v = ask(b"\xff\n");
        assert!(v["error"].as_str().unwrap().contains("UTF-8"), "{v}");
        // The same connection still answers a valid request.
        let v = ask(b"{\"cmd\":\"show_counters\"}\n");
        assert_eq!(
            v,
            json!({"ok": true, "result": {"nhrp": {"errors_sent": 0}}})
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir);
    let _guard = start(&path);
    let p = path.clone();
    let v = blocking(move || {
        let line = "x".repeat(control::MAX_REQUEST_LINE * 2);
        control::request_raw(&p, &line, T)
    })
    .await
    .unwrap();
    assert_eq!(v["ok"], false);
    assert!(v["error"].as_str().unwrap().contains("longer than"), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_socket_is_replaced_live_one_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    // A socket file nobody listens on, as left by a killed agent.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let guard = start(&path);

    // A second agent on the same path must not steal the live socket.
    match control::bind(&path) {
        Err(ControlError::InUse { path: p }) => assert_eq!(p, path),
        other => panic!("expected InUse, got {other:?}"),
    }
    let p = path.clone();
    blocking(move || control::request(&p, Command::ShowDmvpn, T))
        .await
        .unwrap();

    drop(guard);
    assert!(!path.exists(), "socket file must be removed on exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regular_file_is_not_removed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    std::fs::write(&path, b"important").unwrap();
    let e = control::bind(&path).unwrap_err();
    assert!(matches!(e, ControlError::NotASocket { .. }), "{e:?}");
    assert!(e.to_string().contains(path.to_str().unwrap()));
    assert_eq!(std::fs::read(&path).unwrap(), b"important");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_renders_over_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir);
    let _guard = start(&path);
    let args = ClientArgs {
        json: false,
        socket: path.clone(),
    };
    let a = args.clone();
    let table = blocking(move || cli::client(Command::ShowDmvpn, &a))
        .await
        .unwrap();
    let row = table
        .lines()
        .find(|l| l.contains("10.42.0.2"))
        .unwrap_or_else(|| panic!("no peer row in\n{table}"));
    assert!(
        row.contains("198.51.100.2") && row.contains("UP") && row.contains("10.1.2.0/24"),
        "{row}"
    );

    let a = ClientArgs { json: true, ..args };
    let out = blocking(move || cli::client(Command::ShowDmvpn, &a))
        .await
        .unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["peers"][0]["attributes"], "D");
    assert_eq!(v["tunnel_address"], "10.42.0.1/24");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_gone_gives_error_reply() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir);
    let (listener, _guard) = control::bind(&path).unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<control::Request>(8);
    // A loop that takes the request and drops it unanswered, as on shutdown.
    tokio::spawn(async move {
        let mut rx = rx;
        while let Some(req) = rx.recv().await {
            drop(req);
        }
    });
    tokio::spawn(control::serve(listener, tx));
    let p = path.clone();
    let e = blocking(move || control::request(&p, Command::ShowDmvpn, T))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("dropped the request"), "{e}");
}
