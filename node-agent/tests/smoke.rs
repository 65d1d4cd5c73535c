//! Root-only smoke test: a hub and a spoke agent in two network namespaces joined by a veth
//! pair (underlay 198.51.100.0/24). The spoke must register (`show nhrp nhs --json`), the
//! hub must list the registration, overlay traffic must flow, and SIGTERM must purge the
//! registration and remove the control socket. Skipped with a message when not root.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const AGENT: &str = env!("CARGO_BIN_EXE_dmvpn-agent");
/// How long to wait for a state to appear (polling; the test passes as soon as it does).
const WAIT: Duration = Duration::from_secs(20);

fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} {args:?}: {e}"))
}

fn must(cmd: &str, args: &[&str]) {
    let o = run(cmd, args);
    assert!(
        o.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Namespaces and agent processes of one test; everything is removed on drop, also when
/// the test fails.
struct Lab {
    namespaces: Vec<String>,
    agents: Vec<Child>,
    dir: tempfile::TempDir,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.agents {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in &self.namespaces {
            let _ = run("ip", &["netns", "del", ns]);
        }
    }
}

impl Lab {
    fn new(tag: &str) -> Lab {
        let id = format!("dmag{}{tag}", std::process::id());
        let hub = format!("{id}h");
        let spoke = format!("{id}s");
        let mut lab = Lab {
            namespaces: Vec::new(),
            agents: Vec::new(),
            dir: tempfile::tempdir().unwrap(),
        };
        for ns in [&hub, &spoke] {
            must("ip", &["netns", "add", ns]);
            lab.namespaces.push(ns.clone());
            must("ip", &["-n", ns, "link", "set", "lo", "up"]);
        }
        // Created inside the hub namespace, so nothing ever appears in the root namespace.
        must(
            "ip",
            &[
                "-n", &hub, "link", "add", "ul0", "type", "veth", "peer", "name", "ul1", "netns",
                &spoke,
            ],
        );
        for (ns, dev, addr) in [
            (&hub, "ul0", "198.51.100.1/24"),
            (&spoke, "ul1", "198.51.100.2/24"),
        ] {
            must("ip", &["-n", ns, "addr", "add", addr, "dev", dev]);
            must("ip", &["-n", ns, "link", "set", dev, "up"]);
        }
        lab
    }

    fn hub_ns(&self) -> &str {
        &self.namespaces[0]
    }

    fn spoke_ns(&self) -> &str {
        &self.namespaces[1]
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `config` and starts an agent on it in `ns`; returns the agents index.
    fn start(&mut self, ns: &str, name: &str, config: &str) -> usize {
        let cfg = self.path(&format!("{name}.toml"));
        std::fs::write(&cfg, config).unwrap();
        let check = run(AGENT, &["check-config", cfg.to_str().unwrap()]);
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stderr)
        );
        let log = std::fs::File::create(self.path(&format!("{name}.log"))).unwrap();
        // `ip netns exec` execs the agent: the child's PID is the agent's.
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                AGENT,
                "run",
                "--config",
                cfg.to_str().unwrap(),
            ])
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.agents.push(child);
        self.agents.len() - 1
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(&format!("{name}.log"))).unwrap_or_default()
    }
}

fn show(socket: &Path, what: &[&str]) -> Option<Value> {
    let mut args = vec!["show"];
    args.extend_from_slice(what);
    args.extend_from_slice(&["--json", "--socket", socket.to_str().unwrap()]);
    let o = run(AGENT, &args);
    if !o.status.success() {
        return None;
    }
    serde_json::from_slice(&o.stdout).ok()
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn can_run() -> bool {
    if !is_root() {
        println!("SKIPPED: the smoke test needs root (network namespaces, TUN, raw sockets)");
        return false;
    }
    if !Path::new("/dev/net/tun").exists() {
        println!("SKIPPED: /dev/net/tun is missing");
        return false;
    }
    if !run("ip", &["-V"]).status.success() {
        println!("SKIPPED: iproute2 (`ip`) is missing");
        return false;
    }
    true
}

#[test]
fn spoke_registers_with_hub_and_purges_on_sigterm() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::new("a");
    let hub_sock = lab.path("hub.sock");
    let spoke_sock = lab.path("spoke.sock");
    let hub_ns = lab.hub_ns().to_owned();
    let spoke_ns = lab.spoke_ns().to_owned();
    lab.start(
        &hub_ns,
        "hub",
        &format!(
            r#"role = "hub"
tunnel_address = "10.42.0.1/24"
nbma_address = "198.51.100.1"
gre_key = 42
holdtime = 60
nhrp_auth = "k8s"
control_socket = "{}"
ipsec = {{ psk = "smoke-test-pre-shared-key" }}
"#,
            hub_sock.display()
        ),
    );
    let spoke = lab.start(
        &spoke_ns,
        "spoke",
        &format!(
            r#"role = "spoke"
tunnel_address = "10.42.0.2/24"
nbma_interface = "ul1"
gre_key = 42
holdtime = 60
nhrp_auth = "k8s"
local_prefixes = ["10.1.2.0/24"]
overlay_routes = ["10.1.0.0/16"]
control_socket = "{}"
ipsec = {{ psk = "smoke-test-pre-shared-key" }}

[[nhs]]
tunnel_address = "10.42.0.1"
nbma_address = "198.51.100.1"
"#,
            spoke_sock.display()
        ),
    );

    // The spoke sees its NHS up and its registration accepted.
    wait_for("the spoke's registration (show nhrp nhs)", || {
        show(&spoke_sock, &["nhrp", "nhs"])
            .is_some_and(|v| v["nhs"][0]["registered"] == true && v["nhs"][0]["state"] == "up")
    });
    let nhs = show(&spoke_sock, &["nhrp", "nhs"]).unwrap();
    assert_eq!(nhs["nhs"][0]["tunnel_address"], "10.42.0.1");
    assert_eq!(nhs["nhs"][0]["nbma_address"], "198.51.100.1");
    assert_eq!(nhs["nhs"][0]["preferred"], true);

    // The hub has the spoke's address and LAN prefix, at the spoke's NBMA address.
    let cache = show(&hub_sock, &["nhrp", "cache"]).unwrap();
    let dynamic: Vec<&Value> = cache["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "dynamic")
        .collect();
    let prefixes: Vec<&str> = dynamic
        .iter()
        .filter_map(|e| e["prefix"].as_str())
        .collect();
    assert!(
        prefixes.contains(&"10.42.0.2/32") && prefixes.contains(&"10.1.2.0/24"),
        "{cache}"
    );
    assert!(
        dynamic
            .iter()
            .all(|e| e["nbma"] == "198.51.100.2" && e["protocol"] == "10.42.0.2")
    );

    let counters = show(&spoke_sock, &["counters"]).unwrap();
    assert!(
        counters
            .pointer("/nhrp/messages/registration_request/tx")
            .and_then(Value::as_u64)
            >= Some(1),
        "{counters}"
    );
    assert!(
        counters
            .pointer("/nhrp/drops")
            .is_some_and(Value::is_object),
        "{counters}"
    );
    assert!(
        counters
            .pointer("/dataplane/nhrp_tx_packets")
            .and_then(Value::as_u64)
            >= Some(1),
        "{counters}"
    );
    assert!(
        counters
            .pointer("/agent/control_requests")
            .and_then(Value::as_u64)
            >= Some(1),
        "{counters}"
    );

    let dmvpn = show(&hub_sock, &["dmvpn"]).unwrap();
    assert_eq!(dmvpn["role"], "hub");
    let peer = &dmvpn["peers"][0];
    assert_eq!(peer["tunnel_address"], "10.42.0.2");
    assert_eq!(peer["attributes"], "D");
    assert_eq!(peer["state"], "up");

    // Overlay traffic flows through the userspace data planes.
    let ping = run(
        "ip",
        &[
            "netns",
            "exec",
            &spoke_ns,
            "ping",
            "-c",
            "1",
            "-W",
            "2",
            "10.42.0.1",
        ],
    );
    assert!(
        ping.status.success(),
        "ping over the tunnel failed:\n{}",
        lab.log("spoke")
    );
    // The hub routes the spoke's LAN into its TUN; the spoke its overlay route.
    let hub_routes =
        String::from_utf8_lossy(&run("ip", &["-n", &hub_ns, "route"]).stdout).into_owned();
    assert!(
        hub_routes.contains("10.1.2.0/24 dev dmvpn0"),
        "{hub_routes}"
    );
    let spoke_routes =
        String::from_utf8_lossy(&run("ip", &["-n", &spoke_ns, "route"]).stdout).into_owned();
    assert!(
        spoke_routes.contains("10.1.0.0/16 dev dmvpn0"),
        "{spoke_routes}"
    );

    // SIGTERM: the spoke purges its registration, exits 0 and removes its socket.
    let pid = nix::unistd::Pid::from_raw(i32::try_from(lab.agents[spoke].id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = lab.agents[spoke].wait().unwrap();
    assert!(
        status.success(),
        "spoke exit {status:?}:\n{}",
        lab.log("spoke")
    );
    assert!(!spoke_sock.exists(), "control socket left behind");
    wait_for("the hub to drop the purged registration", || {
        show(&hub_sock, &["nhrp", "cache"]).is_some_and(|c| {
            !c["entries"]
                .as_array()
                .is_some_and(|a| a.iter().any(|e| e["type"] == "dynamic"))
        })
    });

    // The CLI reports the stopped agent with exit status 3 and names the socket.
    let o = run(
        AGENT,
        &["show", "dmvpn", "--socket", spoke_sock.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(3));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("agent not running") && err.contains(spoke_sock.to_str().unwrap()),
        "{err}"
    );
}

fn hub_config(sock: &Path) -> String {
    format!(
        "role = \"hub\"\ntunnel_address = \"10.42.0.1/24\"\nnbma_address = \"198.51.100.1\"\ncontrol_socket = \"{}\"\nipsec = {{ psk = \"smoke-test-pre-shared-key\" }}\n",
        sock.display()
    )
}

fn dynamic_nbma(hub_sock: &Path) -> Vec<String> {
    show(hub_sock, &["nhrp", "cache"])
        .and_then(|c| {
            c["entries"].as_array().map(|a| {
                a.iter()
                    .filter(|e| e["type"] == "dynamic")
                    .filter_map(|e| e["nbma"].as_str().map(str::to_owned))
                    .collect()
            })
        })
        .unwrap_or_default()
}

#[test]
fn nbma_interface_address_appears_then_changes() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::new("b");
    let hub_sock = lab.path("hub.sock");
    let spoke_sock = lab.path("spoke.sock");
    let hub_ns = lab.hub_ns().to_owned();
    let spoke_ns = lab.spoke_ns().to_owned();
    lab.start(&hub_ns, "hub", &hub_config(&hub_sock));
    // The spoke starts before its underlay interface has an address.
    must("ip", &["-n", &spoke_ns, "addr", "flush", "dev", "ul1"]);
    lab.start(
        &spoke_ns,
        "spoke",
        &format!(
            "role = \"spoke\"\ntunnel_address = \"10.42.0.2/24\"\nnbma_interface = \"ul1\"\ncontrol_socket = \"{}\"\nipsec = {{ psk = \"smoke-test-pre-shared-key\" }}\n[[nhs]]\ntunnel_address = \"10.42.0.1\"\nnbma_address = \"198.51.100.1\"\n",
            spoke_sock.display()
        ),
    );

    // While it waits, the control socket answers with an error that says why.
    wait_for("the waiting spoke's control socket", || spoke_sock.exists());
    let o = run(
        AGENT,
        &["show", "dmvpn", "--socket", spoke_sock.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("waiting for an IPv4 address on nbma_interface ul1"),
        "{err}"
    );

    must(
        "ip",
        &[
            "-n",
            &spoke_ns,
            "addr",
            "add",
            "198.51.100.2/24",
            "dev",
            "ul1",
        ],
    );
    wait_for("registration from 198.51.100.2", || {
        dynamic_nbma(&hub_sock) == ["198.51.100.2"]
    });

    // Renumber the underlay: the spoke purges, rebinds and registers from the new address.
    must(
        "ip",
        &[
            "-n",
            &spoke_ns,
            "addr",
            "del",
            "198.51.100.2/24",
            "dev",
            "ul1",
        ],
    );
    must(
        "ip",
        &[
            "-n",
            &spoke_ns,
            "addr",
            "add",
            "198.51.100.22/24",
            "dev",
            "ul1",
        ],
    );
    wait_for("registration from 198.51.100.22", || {
        dynamic_nbma(&hub_sock) == ["198.51.100.22"]
    });
    let dmvpn = show(&spoke_sock, &["dmvpn"]).unwrap();
    assert_eq!(dmvpn["nbma_address"], "198.51.100.22");
    let counters = show(&spoke_sock, &["counters"]).unwrap();
    assert_eq!(
        counters
            .pointer("/agent/nbma_changes")
            .and_then(Value::as_u64),
        Some(1)
    );
    let ping = run(
        "ip",
        &[
            "netns",
            "exec",
            &spoke_ns,
            "ping",
            "-c",
            "1",
            "-W",
            "2",
            "10.42.0.1",
        ],
    );
    assert!(
        ping.status.success(),
        "ping after the NBMA change failed:\n{}",
        lab.log("spoke")
    );
}
