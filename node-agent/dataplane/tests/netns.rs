//! End-to-end test of the userspace data plane in network namespaces (needs root; skipped
//! with a message otherwise).
//!
//! Underlay: namespaces hub (198.51.100.1), A (.2) and B (.3) with veth links to a bridge in
//! a fourth namespace. Overlay 10.42.0.0/24 over GRE key 42, one `UserspaceDataPlane` per
//! node, each on its own thread that entered the namespace with `setns` and runs its own
//! tokio runtime (worker threads inherit the namespace).
//!
//! Checks: A → B goes through the hub (hub forwarding counter grows, Hairpin at the hub,
//! Miss at A); with direct neighbours on A and B it no longer does (hub counter still,
//! Used at A); NHRP packets arrive as events; kernel routes follow set/del_route; a wrong
//! GRE key is dropped and counted, not delivered. `kernel_ip_gre_interop` checks the same
//! against a Linux `ip_gre` spoke where the kernel has GRE; elsewhere, run the test binary
//! (`cargo test -p dmvpn-dataplane --test netns --no-run` prints its path) from a script
//! under the test tools' `vm/in-vm.sh`.

use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::process::Command;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dmvpn_dataplane::gre::{self, GreHeader};
use dmvpn_dataplane::{
    Counters, DataPlane, Event, MissReason, UserspaceConfig, UserspaceDataPlane,
};
use tokio::sync::mpsc;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn run(args: &[&str]) -> std::process::Output {
    let out = {
        let _lock = netns_lock();
        Command::new(args[0]).args(&args[1..]).output().unwrap()
    };
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Concurrent `ip netns add/del` and `ip link ... netns` calls from parallel tests race on
/// /run/netns; every `ip` call of the setup and the cleanup takes this lock (never nested).
fn netns_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Deletes the namespaces it created, also when the test fails.
struct Namespaces(Vec<String>);

impl Namespaces {
    fn add(&mut self, name: &str) {
        run(&["ip", "netns", "add", name]);
        self.0.push(name.to_string());
        run(&["ip", "-n", name, "link", "set", "lo", "up"]);
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        let _lock = netns_lock();
        for n in self.0.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

struct Ctx {
    dp: Arc<UserspaceDataPlane>,
    events: std::sync::Mutex<mpsc::Receiver<Event>>,
    rt: tokio::runtime::Runtime,
}

type Job = Box<dyn FnOnce(&Ctx) + Send>;

/// A data plane on its own thread inside a namespace; closures run there.
struct Node {
    jobs: Option<std_mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl Node {
    fn start(ns: &str, cfg: UserspaceConfig) -> Node {
        let (jtx, jrx) = std_mpsc::channel::<Job>();
        let (rtx, rrx) = std_mpsc::channel::<Result<(), String>>();
        let path = format!("/run/netns/{ns}");
        let thread = std::thread::spawn(move || {
            let setup = || -> Result<Ctx, String> {
                let f = std::fs::File::open(&path).map_err(|e| e.to_string())?;
                nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| e.to_string())?;
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                let (dp, events) = rt
                    .block_on(UserspaceDataPlane::start(cfg))
                    .map_err(|e| e.to_string())?;
                Ok(Ctx {
                    dp,
                    events: std::sync::Mutex::new(events),
                    rt,
                })
            };
            let ctx = match setup() {
                Ok(c) => {
                    let _ = rtx.send(Ok(()));
                    c
                }
                Err(e) => {
                    let _ = rtx.send(Err(e));
                    return;
                }
            };
            while let Ok(job) = jrx.recv() {
                job(&ctx);
            }
            // Stop the data plane inside its runtime before the runtime goes away.
            let Ctx { dp, events, rt } = ctx;
            rt.block_on(async move {
                drop(dp);
                drop(events);
            });
        });
        let node = Node {
            jobs: Some(jtx),
            thread: Some(thread),
        };
        rrx.recv().unwrap().unwrap();
        node
    }

    fn run<R: Send + 'static>(&self, f: impl FnOnce(&Ctx) -> R + Send + 'static) -> R {
        let (tx, rx) = std_mpsc::channel();
        let job: Job = Box::new(move |c| {
            let _ = tx.send(f(c));
        });
        self.jobs.as_ref().unwrap().send(job).unwrap();
        rx.recv().unwrap()
    }

    fn counters(&self) -> Counters {
        self.run(|c| c.dp.counters())
    }

    fn set_neighbor(&self, proto: &str, nbma: &str) {
        let (p, n) = (ip(proto), ip(nbma));
        self.run(move |c| c.rt.block_on(c.dp.set_neighbor(p, n)).unwrap());
    }

    fn set_route(&self, prefix: &str, nh: &str) {
        let (p, n) = (prefix.parse().unwrap(), ip(nh));
        self.run(move |c| c.rt.block_on(c.dp.set_route(p, n)).unwrap());
    }

    fn del_route(&self, prefix: &str) {
        let p = prefix.parse().unwrap();
        self.run(move |c| c.rt.block_on(c.dp.del_route(p)).unwrap());
    }

    /// Waits up to 5 s for an event matching `pred`; earlier non-matching ones are skipped.
    fn wait_event(&self, pred: impl Fn(&Event) -> bool + Send + 'static) -> Option<Event> {
        self.run(move |c| {
            let mut rx = c.events.lock().unwrap();
            c.rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(5), async {
                    while let Some(ev) = rx.recv().await {
                        if pred(&ev) {
                            return Some(ev);
                        }
                    }
                    None
                })
                .await
                .ok()
                .flatten()
            })
        })
    }

    fn drain_events(&self) {
        self.run(|c| while c.events.lock().unwrap().try_recv().is_ok() {});
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn ping(ns: &str, dst: &str) -> bool {
    Command::new("ip")
        .args([
            "netns", "exec", ns, "ping", "-n", "-q", "-c", "3", "-i", "0.2",
        ])
        .args(["-w", "10", dst])
        .stdout(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn wait_until(mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

fn config(tunnel: &str, tunnel6: &str, nbma: [u8; 4], hub: bool, offload: bool) -> UserspaceConfig {
    let mut c = UserspaceConfig::new("dmvpn0", tunnel.parse().unwrap(), Ipv4Addr::from(nbma));
    c.addresses.push(tunnel6.parse().unwrap());
    c.gre_key = Some(42);
    c.hub = hub;
    c.offload = offload;
    c
}

fn have_tools(test: &str, tools: &[&str]) -> bool {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("SKIP {test}: needs root (network namespaces, TUN)");
        return false;
    }
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
        })
        .collect();
    if !missing.is_empty() {
        eprintln!("SKIP {test}: missing {missing:?}");
        return false;
    }
    true
}

/// Hub and spokes A, B on a bridged underlay, data planes started, hub-and-spoke routing
/// programmed (spokes: NHS 10.42.0.1, tunnel networks via the hub). Fields drop in
/// declaration order: nodes first, then the namespaces.
struct Lab {
    hub: Node,
    a: Node,
    b: Node,
    na: String,
    nb: String,
    _nss: Namespaces,
}

impl Lab {
    fn new(tag: &str, offload: bool) -> Lab {
        let p = format!("dpt{}{tag}", std::process::id());
        let (sw, nh, na, nb) = (
            format!("{p}-sw"),
            format!("{p}-hub"),
            format!("{p}-a"),
            format!("{p}-b"),
        );
        let mut nss = Namespaces(Vec::new());
        nss.add(&sw);
        run(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"]);
        run(&["ip", "-n", &sw, "link", "set", "br0", "up"]);
        for (i, ns) in [&nh, &na, &nb].into_iter().enumerate() {
            nss.add(ns);
            let port = format!("p{i}");
            run(&[
                "ip", "-n", ns, "link", "add", "e0", "type", "veth", "peer", "name", &port,
                "netns", &sw,
            ]);
            run(&["ip", "-n", &sw, "link", "set", &port, "master", "br0", "up"]);
            let addr = format!("198.51.100.{}/24", i + 1);
            run(&["ip", "-n", ns, "addr", "add", &addr, "dev", "e0"]);
            run(&["ip", "-n", ns, "link", "set", "e0", "up"]);
        }
        let hub = Node::start(
            &nh,
            config(
                "10.42.0.1/24",
                "fd00:42::1/64",
                [198, 51, 100, 1],
                true,
                offload,
            ),
        );
        let a = Node::start(
            &na,
            config(
                "10.42.0.2/24",
                "fd00:42::2/64",
                [198, 51, 100, 2],
                false,
                offload,
            ),
        );
        let b = Node::start(
            &nb,
            config(
                "10.42.0.3/24",
                "fd00:42::3/64",
                [198, 51, 100, 3],
                false,
                offload,
            ),
        );
        hub.set_neighbor("10.42.0.2", "198.51.100.2");
        hub.set_neighbor("10.42.0.3", "198.51.100.3");
        hub.set_neighbor("fd00:42::2", "198.51.100.2");
        hub.set_neighbor("fd00:42::3", "198.51.100.3");
        for spoke in [&a, &b] {
            spoke.set_neighbor("10.42.0.1", "198.51.100.1");
            spoke.set_route("10.42.0.0/24", "10.42.0.1");
            // An IPv6 overlay prefix may use an IPv4 overlay next hop.
            spoke.set_route("fd00:42::/64", "10.42.0.1");
            spoke.run(|c| c.rt.block_on(c.dp.set_nhs(vec![ip("10.42.0.1")])).unwrap());
        }
        Lab {
            hub,
            a,
            b,
            na,
            nb,
            _nss: nss,
        }
    }
}

#[test]
fn three_nodes_hub_and_shortcut() {
    if have_tools("three_nodes_hub_and_shortcut", &["ip", "ping"]) {
        scenario(Lab::new("o", true));
    }
}

#[test]
fn three_nodes_hub_and_shortcut_without_offload() {
    if have_tools(
        "three_nodes_hub_and_shortcut_without_offload",
        &["ip", "ping"],
    ) {
        scenario(Lab::new("n", false));
    }
}

fn scenario(lab: Lab) {
    let (hub, a, b, na) = (&lab.hub, &lab.a, &lab.b, &lab.na);
    assert_eq!(hub.run(|c| c.dp.mtu()), 1472);

    // Spoke to hub.
    assert!(
        ping(na, "10.42.0.1"),
        "A cannot reach the hub over the overlay"
    );
    assert_eq!(hub.counters().hub_forwarded_packets, 0);

    // Spoke to spoke through the hub.
    assert!(ping(na, "10.42.0.3"), "A cannot reach B through the hub");
    let fwd = hub.counters().hub_forwarded_packets;
    assert!(
        fwd >= 6,
        "3 requests and 3 replies forwarded by the hub, got {fwd}"
    );
    let hp = hub.wait_event(|e| matches!(e, Event::Hairpin { src, .. } if *src == ip("10.42.0.2")));
    match hp {
        Some(Event::Hairpin {
            dst,
            ingress_nbma,
            head,
            ..
        }) => {
            assert_eq!(dst, ip("10.42.0.3"));
            assert_eq!(ingress_nbma, ip("198.51.100.2"));
            assert_eq!(head[0] >> 4, 4, "head starts at the inner IPv4 header");
        }
        other => panic!("no Hairpin event at the hub: {other:?}"),
    }
    // The same over IPv6 (GRE protocol 0x86DD, hop limit decremented by the hub).
    assert!(
        ping(na, "fd00:42::3"),
        "A cannot reach B over IPv6 through the hub"
    );
    let fwd6 = hub.counters().hub_forwarded_packets - fwd;
    assert!(
        fwd6 >= 6,
        "IPv6 echo requests and replies forwarded by the hub, got {fwd6}"
    );
    let miss = a.wait_event(|e| matches!(e, Event::Miss { .. }));
    assert_eq!(
        miss,
        Some(Event::Miss {
            dst: ip("10.42.0.3"),
            next_hop: ip("10.42.0.1"),
            reason: MissReason::ViaNhs
        })
    );

    // Shortcut: direct neighbours on A and B; the hub no longer forwards.
    a.set_neighbor("10.42.0.3", "198.51.100.3");
    b.set_neighbor("10.42.0.2", "198.51.100.2");
    a.drain_events();
    let before = hub.counters();
    assert!(ping(na, "10.42.0.3"), "A cannot reach B over the shortcut");
    let after = hub.counters();
    assert_eq!(after.hub_forwarded_packets, before.hub_forwarded_packets);
    assert_eq!(
        after.rx_packets, before.rx_packets,
        "hub saw no shortcut traffic"
    );
    assert_eq!(
        a.wait_event(|e| matches!(e, Event::Used { .. })),
        Some(Event::Used {
            dst: ip("10.42.0.3"),
            next_hop: ip("10.42.0.3")
        })
    );

    // NHRP travels as GRE 0x2001 and arrives as an event.
    let nhrp = vec![0x00, 0x01, 0x08, 0x00, 0xAB];
    let sent = nhrp.clone();
    hub.run(move |c| {
        c.rt.block_on(c.dp.send_nhrp(ip("198.51.100.2"), &sent))
            .unwrap()
    });
    assert_eq!(
        a.wait_event(|e| matches!(e, Event::Nhrp { .. })),
        Some(Event::Nhrp {
            from_nbma: ip("198.51.100.1"),
            bytes: nhrp
        })
    );
    assert_eq!(hub.counters().nhrp_tx_packets, 1);

    // Kernel routes follow the forwarding table (outside the connected tunnel network).
    a.set_route("10.1.3.0/24", "10.42.0.3");
    let show = run(&["ip", "-n", na, "route", "show", "10.1.3.0/24"]);
    assert!(
        String::from_utf8_lossy(&show.stdout).contains("dev dmvpn0"),
        "kernel route missing: {}",
        String::from_utf8_lossy(&show.stdout)
    );
    a.del_route("10.1.3.0/24");
    let show = run(&["ip", "-n", na, "route", "show", "10.1.3.0/24"]);
    assert!(String::from_utf8_lossy(&show.stdout).trim().is_empty());

    // An overlay default route never displaces the underlay's: it has its own metric.
    run(&[
        "ip",
        "-n",
        na,
        "route",
        "add",
        "default",
        "via",
        "198.51.100.1",
        "dev",
        "e0",
    ]);
    a.set_route("0.0.0.0/0", "10.42.0.1");
    let show = run(&["ip", "-n", na, "route", "show", "default"]);
    let show = String::from_utf8_lossy(&show.stdout).to_string();
    assert!(
        show.contains("via 198.51.100.1 dev e0"),
        "underlay default kept: {show}"
    );
    assert!(
        show.contains("dev dmvpn0") && show.contains("metric 1000"),
        "{show}"
    );
    let get = run(&["ip", "-n", na, "route", "get", "203.0.113.9"]);
    assert!(String::from_utf8_lossy(&get.stdout).contains("dev e0"));
    a.del_route("0.0.0.0/0");
    let show = run(&["ip", "-n", na, "route", "show", "default"]);
    let show = String::from_utf8_lossy(&show.stdout).to_string();
    assert!(
        show.contains("dev e0") && !show.contains("dmvpn0"),
        "{show}"
    );

    // Wrong GRE key: a raw packet from A's namespace with key 7 carrying a ping to the hub.
    let before = hub.counters();
    a.run(|_| {
        let s = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::RAW,
            Some(socket2::Protocol::from(libc::IPPROTO_GRE)),
        )
        .unwrap();
        let mut inner = Vec::new();
        etherparse::PacketBuilder::ipv4([10, 42, 0, 2], [10, 42, 0, 1], 64)
            .icmpv4_echo_request(9, 9)
            .write(&mut inner, b"wrong key")
            .unwrap();
        let pkt = GreHeader::with_key(gre::PROTO_IPV4, Some(7)).to_packet(&inner);
        let to = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 1), 0);
        s.send_to(&pkt, &to.into()).unwrap();
    });
    assert!(
        wait_until(|| hub.counters().drops.wrong_key == before.drops.wrong_key + 1),
        "wrong key not counted: {:?}",
        hub.counters()
    );
    let after = hub.counters();
    assert_eq!(after.tun_tx_packets, before.tun_tx_packets, "not delivered");
    assert_eq!(after.rx_packets, before.rx_packets);
}

fn iperf(client_ns: &str, server_ns: &str, dst: &str) -> String {
    let mut server = Command::new("ip")
        .args(["netns", "exec", server_ns, "iperf3", "-s", "-1", "-B", dst])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let out = Command::new("ip")
        .args([
            "netns", "exec", client_ns, "iperf3", "-c", dst, "-t", "3", "-f", "m",
        ])
        .output()
        .unwrap();
    // The server exits after one test (-1); kill it by PID if the client failed early.
    let _ = server.kill();
    let _ = server.wait();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "iperf3 failed: {text}");
    text.lines()
        .filter(|l| l.contains("receiver"))
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Throughput through the hub and over a shortcut (TCP, iperf3, 3 s each). Prints the
/// rates; asserts only that traffic took the expected path. Run it on purpose:
/// `cargo test --release -p dmvpn-dataplane --test netns -- --ignored --nocapture`.
#[test]
#[ignore = "measurement, not a check: run with --ignored --nocapture"]
fn iperf3_throughput() {
    if !have_tools("iperf3_throughput", &["ip", "iperf3"]) {
        return;
    }
    let lab = Lab::new("p", true);
    let via_hub = iperf(&lab.na, &lab.nb, "10.42.0.3");
    let fwd = lab.hub.counters().hub_forwarded_packets;
    assert!(fwd > 1000, "traffic went through the hub: {fwd}");
    lab.a.set_neighbor("10.42.0.3", "198.51.100.3");
    lab.b.set_neighbor("10.42.0.2", "198.51.100.2");
    let direct = iperf(&lab.na, &lab.nb, "10.42.0.3");
    assert_eq!(
        lab.hub.counters().hub_forwarded_packets,
        fwd,
        "shortcut bypasses the hub"
    );
    println!("via hub:  {via_hub}\nshortcut: {direct}");
    println!(
        "A counters: {}",
        serde_json::to_string(&lab.a.counters()).unwrap()
    );
}

/// Interop with the Linux kernel's own mGRE (`ip_gre`): spoke K is a kernel multipoint GRE
/// device (key 42, NHRP-style static neighbour entries with the NBMA address as lladdr);
/// hub and spoke B are userspace data planes. K ↔ hub and K ↔ B through the hub. Needs a
/// kernel with `ip_gre` (the sandbox host has none: run it in the VM with
/// `vm/in-vm.sh`); skipped with a message otherwise.
#[test]
fn kernel_ip_gre_interop() {
    if !have_tools("kernel_ip_gre_interop", &["ip", "ping"]) {
        return;
    }
    let p = format!("dpt{}k", std::process::id());
    let (sw, nh, nk, nb) = (
        format!("{p}-sw"),
        format!("{p}-hub"),
        format!("{p}-k"),
        format!("{p}-b"),
    );
    let mut nss = Namespaces(Vec::new());
    nss.add(&nk);
    let probe = {
        let _lock = netns_lock();
        Command::new("ip")
            .args(["-n", &nk, "link", "add", "gre1", "type", "gre", "key", "42"])
            .args(["local", "198.51.100.2", "ttl", "64"])
            .output()
            .unwrap()
    };
    if !probe.status.success() {
        eprintln!(
            "SKIP kernel_ip_gre_interop: this kernel has no ip_gre ({}); run it in the VM",
            String::from_utf8_lossy(&probe.stderr).trim()
        );
        return;
    }
    nss.add(&sw);
    run(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"]);
    run(&["ip", "-n", &sw, "link", "set", "br0", "up"]);
    for (i, ns) in [&nh, &nk, &nb].into_iter().enumerate() {
        if *ns != nk {
            nss.add(ns);
        }
        let port = format!("p{i}");
        run(&[
            "ip", "-n", ns, "link", "add", "e0", "type", "veth", "peer", "name", &port, "netns",
            &sw,
        ]);
        run(&["ip", "-n", &sw, "link", "set", &port, "master", "br0", "up"]);
        let addr = format!("198.51.100.{}/24", i + 1);
        run(&["ip", "-n", ns, "addr", "add", &addr, "dev", "e0"]);
        run(&["ip", "-n", ns, "link", "set", "e0", "up"]);
    }
    // Kernel spoke: overlay 10.42.0.2/24 on the mGRE device; everything in the tunnel
    // network goes to the hub's NBMA address (as nhrpd would program before a shortcut).
    run(&[
        "ip",
        "-n",
        &nk,
        "addr",
        "add",
        "10.42.0.2/24",
        "dev",
        "gre1",
    ]);
    run(&["ip", "-n", &nk, "link", "set", "gre1", "up"]);
    for peer in ["10.42.0.1", "10.42.0.3"] {
        run(&[
            "ip",
            "-n",
            &nk,
            "neigh",
            "replace",
            peer,
            "lladdr",
            "198.51.100.1",
            "dev",
            "gre1",
            "nud",
            "permanent",
        ]);
    }
    let hub = Node::start(
        &nh,
        config(
            "10.42.0.1/24",
            "fd00:42::1/64",
            [198, 51, 100, 1],
            true,
            true,
        ),
    );
    let b = Node::start(
        &nb,
        config(
            "10.42.0.3/24",
            "fd00:42::3/64",
            [198, 51, 100, 3],
            false,
            true,
        ),
    );
    hub.set_neighbor("10.42.0.2", "198.51.100.2");
    hub.set_neighbor("10.42.0.3", "198.51.100.3");
    b.set_neighbor("10.42.0.1", "198.51.100.1");
    b.set_route("10.42.0.0/24", "10.42.0.1");

    assert!(
        ping(&nk, "10.42.0.1"),
        "kernel spoke cannot reach the userspace hub"
    );
    assert!(
        ping(&nh, "10.42.0.2"),
        "userspace hub cannot reach the kernel spoke"
    );
    let before = hub.counters().hub_forwarded_packets;
    assert!(
        ping(&nk, "10.42.0.3"),
        "kernel spoke cannot reach B through the hub"
    );
    assert!(hub.counters().hub_forwarded_packets >= before + 6);
    let c = hub.counters();
    assert_eq!(c.drops.bad_gre + c.drops.wrong_key, 0, "{c:?}");
}

/// A UDP socket bound to `addr:4500` inside namespace `ns` (a socket keeps the namespace
/// it was created in), for the data plane's ESP-in-UDP.
fn udp4500_in(ns: &str, addr: Ipv4Addr) -> Arc<std::net::UdpSocket> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path).unwrap();
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        Arc::new(std::net::UdpSocket::bind((addr, 4500)).unwrap())
    })
    .join()
    .unwrap()
}

/// Spokes A (198.51.100.2) and B (.3) on a bridged underlay with static AES-256-GCM SAs
/// both ways (raw ESP, or ESP-in-UDP with `udp`), direct neighbours, IPsec required.
fn esp_pair(tag: &str, udp: bool) -> (Node, Node, String, String, Namespaces) {
    use dmvpn_esp::{SecurityAssociation, Suite};
    let p = format!("dpt{}{tag}", std::process::id());
    let (sw, na, nb) = (format!("{p}-sw"), format!("{p}-a"), format!("{p}-b"));
    let mut nss = Namespaces(Vec::new());
    nss.add(&sw);
    run(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"]);
    run(&["ip", "-n", &sw, "link", "set", "br0", "up"]);
    let mut nodes = Vec::new();
    for (i, ns) in [&na, &nb].into_iter().enumerate() {
        nss.add(ns);
        let port = format!("p{i}");
        run(&[
            "ip", "-n", ns, "link", "add", "e0", "type", "veth", "peer", "name", &port, "netns",
            &sw,
        ]);
        run(&["ip", "-n", &sw, "link", "set", &port, "master", "br0", "up"]);
        let nbma = Ipv4Addr::new(198, 51, 100, 2 + i as u8);
        run(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            &format!("{nbma}/24"),
            "dev",
            "e0",
        ]);
        run(&["ip", "-n", ns, "link", "set", "e0", "up"]);
        let mut cfg = config(
            &format!("10.42.0.{}/24", 2 + i),
            &format!("fd00:42::{}/64", 2 + i),
            nbma.octets(),
            false,
            true,
        );
        cfg.extra_overhead = dmvpn_dataplane::ESP_OVERHEAD;
        cfg.ipsec = Some(dmvpn_dataplane::IpsecDataConfig {
            require: true,
            nat_t_socket: udp.then(|| udp4500_in(ns, nbma)),
        });
        nodes.push(Node::start(ns, cfg));
    }
    let b = nodes.pop().unwrap();
    let a = nodes.pop().unwrap();
    let sa = |spi: u32| SecurityAssociation::new(spi, Suite::Aes256Gcm, &[spi as u8; 36]).unwrap();
    let port = udp.then_some(4500);
    for (node, me, peer, out_spi, in_spi) in [
        (&a, "10.42.0.2", "198.51.100.3", 0x1000u32, 0x2000u32),
        (&b, "10.42.0.3", "198.51.100.2", 0x2000, 0x1000),
    ] {
        let (o, i) = (sa(out_spi), sa(in_spi));
        let peer_ip = ip(peer);
        node.run(move |c| {
            let now = Instant::now();
            c.dp.install_outbound(peer_ip, o.into_outbound(now).unwrap(), port)
                .unwrap();
            c.dp.install_inbound(peer_ip, i.into_inbound(now).unwrap())
                .unwrap();
        });
        let other = if me == "10.42.0.2" {
            "10.42.0.3"
        } else {
            "10.42.0.2"
        };
        node.set_neighbor(other, peer);
    }
    (a, b, na, nb, nss)
}

/// User + system CPU time of this process in clock ticks (1/100 s on Linux).
fn process_cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the ")" that ends the command name: utime and stime are the 12th
    // and 13th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Encrypted spoke-to-spoke throughput (TCP, iperf3, 3 s), raw ESP and ESP-in-UDP. Prints
/// the rates; asserts only that the traffic was ESP in the expected wire format. Run it
/// on purpose: `cargo test --release -p dmvpn-dataplane --test netns -- --ignored
/// --nocapture iperf3_throughput_esp`.
#[test]
#[ignore = "measurement, not a check: run with --ignored --nocapture"]
fn iperf3_throughput_esp() {
    if !have_tools("iperf3_throughput_esp", &["ip", "iperf3"]) {
        return;
    }
    for (tag, udp) in [("er", false), ("eu", true)] {
        let (a, b, na, nb, _nss) = esp_pair(tag, udp);
        let cpu0 = process_cpu_ticks();
        let rate = iperf(&na, &nb, "10.42.0.3");
        let cpu = process_cpu_ticks() - cpu0;
        let sas = b.run(|c| c.dp.sas());
        let inbound = sas.iter().find(|s| s.direction == "inbound").unwrap();
        assert!(inbound.packets > 1000, "ESP carried the traffic: {sas:?}");
        let out = a.run(|c| c.dp.sas());
        let o = out.iter().find(|s| s.direction == "outbound").unwrap();
        assert_eq!(o.udp_encap, udp);
        let mb = b.counters().tun_tx_bytes as f64 / 1e6;
        // Both data planes (this process) per MB delivered: a figure that depends less
        // on how busy the machine is than the rate.
        println!(
            "{}: {rate}\n  data-plane CPU {:.2} s for {mb:.0} MB: {:.2} ms/MB\n  B counters: {}",
            if udp { "ESP-in-UDP" } else { "raw ESP" },
            cpu as f64 / 100.0,
            cpu as f64 * 10.0 / mb,
            serde_json::to_string(&b.counters()).unwrap()
        );
        drop((a, b));
    }
}
