//! Network namespaces, links, addresses and processes, through iproute2 subprocesses.
//!
//! Every namespace is created by a [`NsFactory`] that registers it for cleanup (see
//! [`crate::cleanup`]) the moment it exists. Links are created *inside* lab namespaces
//! (`ip -n NS link add ... peer ... netns OTHER`), so nothing ever appears in the root
//! namespace.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;

use crate::cleanup;

/// True when running with effective UID 0.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A clear error for non-root callers.
pub fn require_root() -> Result<()> {
    if !is_root() {
        bail!(
            "must run as root: the lab creates network namespaces (try: sudo {})",
            std::env::args()
                .next()
                .unwrap_or_else(|| "dmvpn-lab".into())
        );
    }
    Ok(())
}

fn render(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Run a command, fail with its stderr if it exits non-zero; return stdout.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = output(cmd)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            render(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Run a command and return its output whatever the exit status.
pub fn output(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{}` (is it installed?)", render(cmd)))
}

/// `ip ARGS` in the root namespace (only used for `ip netns` management).
pub fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

static NEXT_OWNER: AtomicU64 = AtomicU64::new(1);

/// Creates uniquely named namespaces ("<prefix>-<role>", prefix = "dl<pid>x<n>") and
/// registers them for cleanup under one owner id.
#[derive(Debug)]
pub struct NsFactory {
    owner: u64,
    prefix: String,
}

impl NsFactory {
    /// A new owner with a name prefix unique to this process and this call.
    pub fn new() -> Self {
        let owner = NEXT_OWNER.fetch_add(1, Ordering::SeqCst);
        NsFactory {
            owner,
            prefix: format!("dl{}x{}", std::process::id(), owner),
        }
    }

    pub fn owner(&self) -> u64 {
        self.owner
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Create "<prefix>-<role>" with `lo` up.
    pub fn create(&self, role: &str) -> Result<Netns> {
        if cleanup::shutting_down() {
            bail!("shutting down: not creating namespace {role}");
        }
        let name = format!("{}-{}", self.prefix, role);
        ip(&["netns", "add", &name]).with_context(|| format!("cannot create namespace {name}"))?;
        // Registered only once created: a namespace that already existed is never deleted.
        cleanup::register_netns(self.owner, &name);
        let ns = Netns {
            name,
            owner: self.owner,
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Remove everything this factory's owner created (processes, then namespaces).
    pub fn cleanup(&self) {
        cleanup::cleanup_owner(self.owner);
    }
}

/// The factory is itself a guard: dropping it (also on panic) removes what it created.
impl Drop for NsFactory {
    fn drop(&mut self) {
        self.cleanup();
    }
}

impl Default for NsFactory {
    fn default() -> Self {
        Self::new()
    }
}

/// A network namespace created by this process.
#[derive(Debug, Clone)]
pub struct Netns {
    name: String,
    owner: u64,
}

impl Netns {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Delete this namespace now: processes still running in it are stopped by PID first.
    /// (Normally the lab's cleanup does this for every namespace.)
    pub fn delete(self) {
        cleanup::unregister_netns(&self.name);
        cleanup::delete_netns(std::slice::from_ref(&self.name));
    }

    /// `ip -n NS ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A `Command` that runs `argv` inside the namespace (`ip netns exec NS argv...`).
    pub fn command(&self, argv: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(argv);
        c
    }

    /// Run `argv` inside the namespace; fail on non-zero exit.
    pub fn exec(&self, argv: &[&str]) -> Result<String> {
        run(&mut self.command(argv))
    }

    /// Run `argv` inside the namespace; return the raw output.
    pub fn exec_output(&self, argv: &[&str]) -> Result<Output> {
        output(&mut self.command(argv))
    }

    /// Set a sysctl (dotted key, e.g. "net.ipv4.ip_forward") inside the namespace. Written
    /// to /proc/sys by a shell in the namespace, so procps need not be installed.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = sysctl_path(key)?;
        self.exec(&[
            "sh",
            "-c",
            "printf '%s\\n' \"$1\" > \"$2\"",
            "sh",
            value,
            &path,
        ])
        .map(|_| ())
        .with_context(|| format!("cannot set {key}={value} in {}", self.name))
    }

    /// Read a sysctl inside the namespace.
    pub fn sysctl_get(&self, key: &str) -> Result<String> {
        let path = sysctl_path(key)?;
        Ok(self.exec(&["cat", &path])?.trim().to_string())
    }

    /// Add an address (CIDR) to an interface and bring it up.
    pub fn addr_add(&self, dev: &str, cidr: &str) -> Result<()> {
        self.ip(&["addr", "add", cidr, "dev", dev])?;
        self.ip(&["link", "set", dev, "up"])?;
        Ok(())
    }

    /// Replace (or add) a route: `ip route replace DST ARGS...`.
    pub fn route_replace(&self, dst: &str, args: &[&str]) -> Result<()> {
        let mut v = vec!["route", "replace", dst];
        v.extend_from_slice(args);
        self.ip(&v).map(|_| ())
    }

    /// Does a link with this name exist here?
    pub fn has_link(&self, dev: &str) -> bool {
        self.ip(&["link", "show", "dev", dev]).is_ok()
    }

    /// A veth pair: `local` here, `peer` in `other`; both brought up.
    pub fn veth_to(&self, local: &str, other: &Netns, peer: &str) -> Result<()> {
        self.ip(&[
            "link",
            "add",
            local,
            "type",
            "veth",
            "peer",
            "name",
            peer,
            "netns",
            &other.name,
        ])?;
        self.ip(&["link", "set", local, "up"])?;
        other.ip(&["link", "set", peer, "up"])?;
        Ok(())
    }

    /// A bridge (no STP, no forwarding delay) brought up.
    pub fn bridge(&self, name: &str) -> Result<()> {
        self.ip(&[
            "link",
            "add",
            name,
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
        ])?;
        self.ip(&["link", "set", name, "up"])?;
        Ok(())
    }

    /// Attach a port to a bridge.
    pub fn bridge_port(&self, port: &str, bridge: &str) -> Result<()> {
        self.ip(&["link", "set", port, "master", bridge])?;
        self.ip(&["link", "set", port, "up"])?;
        Ok(())
    }

    /// One ping round: `count` echo requests, `interval` seconds apart; true when any reply came.
    pub fn ping(&self, dst: &str, count: u32, interval: &str) -> Result<PingResult> {
        let out = self.exec_output(&[
            "ping",
            "-n",
            "-q",
            "-c",
            &count.to_string(),
            "-i",
            interval,
            "-W",
            "1",
            dst,
        ])?;
        Ok(PingResult::parse(&String::from_utf8_lossy(&out.stdout)))
    }

    /// Spawn a long-running process inside the namespace, tracked by PID for cleanup.
    /// stdout and stderr go to `log` (appended).
    pub fn spawn(
        &self,
        label: &str,
        argv: &[&str],
        log: &Path,
        envs: &[(&str, &str)],
        stop_signal: Signal,
    ) -> Result<u32> {
        if cleanup::shutting_down() {
            bail!("shutting down: not starting {label}");
        }
        let f = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open log file {}", log.display()))?;
        let f2 = f.try_clone()?;
        let mut cmd = self.command(argv);
        cmd.stdin(Stdio::null()).stdout(f).stderr(f2);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {label}: `{}`", render(&cmd)))?;
        // `ip netns exec` execs the program after setns(): this PID is the program's.
        Ok(cleanup::track(self.owner, label, child, stop_signal))
    }
}

/// "/proc/sys/net/ipv4/ip_forward" for "net.ipv4.ip_forward" (interface names in keys must
/// not contain dots).
fn sysctl_path(key: &str) -> Result<String> {
    if key.is_empty() || key.contains('/') || key.contains("..") {
        bail!("bad sysctl key {key:?}");
    }
    Ok(format!("/proc/sys/{}", key.replace('.', "/")))
}

/// Summary of a `ping -q` run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PingResult {
    pub transmitted: u32,
    pub received: u32,
}

impl PingResult {
    /// Parse "N packets transmitted, M received" (iputils and busybox agree on this line).
    pub fn parse(out: &str) -> PingResult {
        let mut r = PingResult::default();
        for line in out.lines().filter(|l| l.contains("transmitted")) {
            for part in line.split(',') {
                let mut w = part.split_whitespace();
                let (Some(n), Some(what)) = (w.next(), w.next()) else {
                    continue;
                };
                let Ok(n) = n.parse::<u32>() else { continue };
                match what {
                    "packets" => r.transmitted = n,
                    "received" | "packets received" => r.received = n,
                    _ => {}
                }
            }
        }
        r
    }

    pub fn ok(&self) -> bool {
        self.received > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysctl_paths() {
        assert_eq!(
            sysctl_path("net.ipv4.conf.eth0.rp_filter").unwrap(),
            "/proc/sys/net/ipv4/conf/eth0/rp_filter"
        );
        assert!(sysctl_path("../etc/passwd").is_err());
        assert!(sysctl_path("a/b").is_err());
        assert!(sysctl_path("").is_err());
    }

    #[test]
    fn ping_summary_parses() {
        let out = "--- 10.0.0.2 ping statistics ---\n\
                   5 packets transmitted, 3 received, 40% packet loss, time 4005ms\n";
        assert_eq!(
            PingResult::parse(out),
            PingResult {
                transmitted: 5,
                received: 3
            }
        );
        assert!(PingResult::parse(out).ok());
        let none = "2 packets transmitted, 0 received, +2 errors, 100% packet loss\n";
        assert!(!PingResult::parse(none).ok());
        assert_eq!(PingResult::parse(none).transmitted, 2);
    }
}
