//! Process-wide registry of what the lab created: network namespaces and child processes.
//!
//! Everything is registered here the moment it exists, tagged with the owning lab, so that
//! a lab's `Drop`, a panic, or a Ctrl-C/SIGTERM/SIGHUP removes exactly what this process
//! created and nothing else. Processes are stopped by PID (never by name); a namespace is
//! deleted only if this process created it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, Once};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A child process started by the lab.
struct Tracked {
    owner: u64,
    label: String,
    child: Child,
    /// Signal that makes this process exit cleanly (SIGINT for tcpdump flushes its file).
    stop_signal: Signal,
    /// Stopped after the others (a capture records the agents' leave traffic).
    last: bool,
}

#[derive(Default)]
struct Registry {
    netns: Vec<(u64, String)>,
    procs: Vec<Tracked>,
    dirs: Vec<(u64, PathBuf)>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    netns: Vec::new(),
    procs: Vec::new(),
    dirs: Vec::new(),
});
static SHUTTING_DOWN: AtomicBool = AtomicBool::new(false);
static HANDLER: Once = Once::new();

fn registry() -> MutexGuard<'static, Registry> {
    // A panic while holding the lock must not stop the cleanup of everything else.
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// True once a termination signal arrived: nothing new may be created after that.
pub fn shutting_down() -> bool {
    SHUTTING_DOWN.load(Ordering::SeqCst)
}

/// Install (once per process) the SIGINT/SIGTERM/SIGHUP handler that removes everything any
/// lab of this process created, then exits with 128+signal.
pub fn install_signal_handler() {
    HANDLER.call_once(|| {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) else {
            eprintln!(
                "warning: cannot install the signal handler; Ctrl-C may leave namespaces behind"
            );
            return;
        };
        let spawned = thread::Builder::new()
            .name("lab-signals".into())
            .spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    SHUTTING_DOWN.store(true, Ordering::SeqCst);
                    eprintln!("\nsignal {sig}: stopping lab processes and deleting lab namespaces");
                    cleanup_all();
                    std::process::exit(128 + sig);
                }
            });
        if spawned.is_err() {
            eprintln!(
                "warning: cannot start the signal thread; Ctrl-C may leave namespaces behind"
            );
        }
    });
}

/// Record a namespace that this process has just created.
pub fn register_netns(owner: u64, name: &str) {
    registry().netns.push((owner, name.to_string()));
}

/// Forget a namespace (after it was deleted on purpose).
pub fn unregister_netns(name: &str) {
    registry().netns.retain(|(_, n)| n != name);
}

/// Record a scratch directory to remove at cleanup (the signal path skips destructors).
pub fn register_dir(owner: u64, dir: &Path) {
    registry().dirs.push((owner, dir.to_path_buf()));
}

/// Forget a scratch directory (kept on purpose, or removed by its owner).
pub fn unregister_dir(dir: &Path) {
    registry().dirs.retain(|(_, d)| d != dir);
}

/// Take ownership of a freshly spawned child; returns its PID.
pub fn track(owner: u64, label: &str, child: Child, stop_signal: Signal) -> u32 {
    let pid = child.id();
    registry().procs.push(Tracked {
        owner,
        label: label.to_string(),
        child,
        stop_signal,
        last: false,
    });
    pid
}

/// Stop this tracked process only after all others of its owner (used for captures).
pub fn mark_last(pid: u32) {
    if let Some(t) = registry().procs.iter_mut().find(|t| t.child.id() == pid) {
        t.last = true;
    }
}

/// Is the tracked process `pid` still running? (Reaps it if it has exited.)
pub fn is_running(pid: u32) -> bool {
    let mut reg = registry();
    let Some(t) = reg.procs.iter_mut().find(|t| t.child.id() == pid) else {
        return false;
    };
    matches!(t.child.try_wait(), Ok(None))
}

/// Exit status of a tracked process that has exited (None while it runs or if unknown).
pub fn exit_status(pid: u32) -> Option<std::process::ExitStatus> {
    let mut reg = registry();
    let t = reg.procs.iter_mut().find(|t| t.child.id() == pid)?;
    t.child.try_wait().ok().flatten()
}

/// Send `sig` to a tracked process (only if it is still ours and running).
pub fn signal(pid: u32, sig: Signal) -> bool {
    let mut reg = registry();
    let Some(t) = reg.procs.iter_mut().find(|t| t.child.id() == pid) else {
        return false;
    };
    if !matches!(t.child.try_wait(), Ok(None)) {
        return false;
    }
    kill(Pid::from_raw(pid as i32), sig).is_ok()
}

/// Wait until a tracked process exits; returns false on timeout.
pub fn wait_exit(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !is_running(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Stop a tracked process (its stop signal, then SIGKILL after `grace`) and forget it.
pub fn stop(pid: u32, grace: Duration) {
    let taken = {
        let mut reg = registry();
        reg.procs
            .iter()
            .position(|t| t.child.id() == pid)
            .map(|i| reg.procs.remove(i))
    };
    if let Some(t) = taken {
        stop_tracked(vec![t], grace);
    }
}

fn stop_tracked(mut procs: Vec<Tracked>, grace: Duration) {
    for t in procs.iter_mut() {
        if matches!(t.child.try_wait(), Ok(None)) {
            let _ = kill(Pid::from_raw(t.child.id() as i32), t.stop_signal);
        }
    }
    let deadline = Instant::now() + grace;
    for t in procs.iter_mut() {
        while matches!(t.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        if matches!(t.child.try_wait(), Ok(None)) {
            eprintln!(
                "{} (pid {}) did not stop, killing it",
                t.label,
                t.child.id()
            );
            let _ = t.child.kill();
            let _ = t.child.wait();
        }
    }
}

/// PIDs of processes running inside a namespace (started by us there, e.g. via `ip netns exec`).
fn netns_pids(name: &str) -> Vec<i32> {
    Command::new("ip")
        .args(["netns", "pids", name])
        .stderr(Stdio::null())
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

pub(crate) fn delete_netns(names: &[String]) {
    // Anything still running inside our own namespaces was started by us: stop it by PID.
    let mut left: Vec<i32> = Vec::new();
    for n in names {
        for p in netns_pids(n) {
            let _ = kill(Pid::from_raw(p), Signal::SIGTERM);
            left.push(p);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while !left.is_empty() && Instant::now() < deadline {
        left.retain(|p| kill(Pid::from_raw(*p), None).is_ok());
        thread::sleep(Duration::from_millis(20));
    }
    for p in left {
        let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
    }
    for n in names {
        let out = Command::new("ip").args(["netns", "del", n]).output();
        if let Ok(o) = out
            && !o.status.success()
        {
            eprintln!(
                "warning: ip netns del {n}: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
    }
}

/// Remove everything registered by `owner`: processes first (capture processes get their
/// stop signal first so that their files are complete), then namespaces.
pub fn cleanup_owner(owner: u64) {
    cleanup_where(|o| o == owner);
}

/// Remove everything this process created (signal path).
pub fn cleanup_all() {
    cleanup_where(|_| true);
}

fn cleanup_where(pred: impl Fn(u64) -> bool) {
    let (procs, netns, dirs) = {
        let mut reg = registry();
        let (mine_dirs, rest_dirs): (Vec<_>, Vec<_>) =
            reg.dirs.drain(..).partition(|(o, _)| pred(*o));
        reg.dirs = rest_dirs;
        let (mine, rest): (Vec<_>, Vec<_>) = reg.procs.drain(..).partition(|t| pred(t.owner));
        reg.procs = rest;
        let (mine_ns, rest_ns): (Vec<_>, Vec<_>) = reg.netns.drain(..).partition(|(o, _)| pred(*o));
        reg.netns = rest_ns;
        (
            mine,
            mine_ns.into_iter().map(|(_, n)| n).collect::<Vec<_>>(),
            mine_dirs,
        )
    };
    let (last, first): (Vec<_>, Vec<_>) = procs.into_iter().partition(|t| t.last);
    stop_tracked(first, Duration::from_secs(3));
    if !last.is_empty() {
        // Let the last packets reach the capture file before it stops.
        thread::sleep(Duration::from_millis(500));
        stop_tracked(last, Duration::from_secs(3));
    }
    delete_netns(&netns);
    for (_, d) in dirs {
        let _ = std::fs::remove_dir_all(d);
    }
}
