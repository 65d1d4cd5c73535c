//! Shared helpers of the end-to-end tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use dmvpn_e2e::lab::{Lab, LabSpec};

/// Labs of one test binary run one at a time: 2 cores, and timing-sensitive traffic.
static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// True when the test may run; prints why it skips otherwise.
pub fn root_or_skip(test: &str) -> bool {
    if dmvpn_e2e::netns::is_root() {
        true
    } else {
        // Written to the stderr handle directly: the test harness captures eprintln!, and
        // a skip must be visible in a normal run.
        use std::io::Write;
        let line = format!("{test}: skipped (needs root: network namespaces)\n");
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
        false
    }
}

/// The agent binary: env DMVPN_AGENT, else next to the test executable's target dir.
/// Panics with the build command when it is missing.
pub fn agent() -> PathBuf {
    match dmvpn_e2e::agent::locate_agent(None) {
        Ok(p) if p.is_file() => p,
        Ok(p) => panic!(
            "DMVPN_AGENT={} does not exist; build it with `cargo build -p dmvpn-agent`",
            p.display()
        ),
        Err(e) => panic!("{e:#}"),
    }
}

/// Namespaces currently present whose name starts with `prefix`.
pub fn namespaces_with(prefix: &str) -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

/// A lab spec with the real agent and the test defaults (holdtime 30 s).
pub fn spec(spokes: usize, phase: u8) -> LabSpec {
    let mut s = LabSpec::new(agent());
    s.spokes = spokes;
    s.phase = phase;
    s
}

/// Build, start agents; on failure print the agent logs.
pub fn start(spec: LabSpec) -> Lab {
    let mut lab = Lab::build(spec).expect("build lab");
    if let Err(e) = lab.start_agents() {
        eprintln!("{}", lab.logs(50));
        panic!("start agents: {e:#}");
    }
    lab
}

/// Poll `f` every 50 ms until it is true or `timeout` passes; returns whether it became true.
pub fn wait_until(timeout: std::time::Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Fail with the agent logs attached.
pub fn fail(lab: &Lab, msg: &str) -> ! {
    eprintln!("{}", lab.logs(50));
    panic!("{msg}");
}
