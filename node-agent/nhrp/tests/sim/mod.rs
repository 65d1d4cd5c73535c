//! Deterministic multi-node simulator for the NHRP engine: engines exchange bytes through a
//! fake NBMA network with a fixed latency and a controllable clock. Nodes can be partitioned
//! (everything to and from them is lost), put behind a NAT (their packets appear from another
//! address), or change their NBMA address. Every emitted packet must decode.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use dmvpn_nhrp::engine::{Config, Engine, Event, NhsConfig, Role};
use dmvpn_nhrp::wire::{Op, Packet};
use ipnet::IpNet;

pub mod pcap;

pub const LATENCY: Duration = Duration::from_millis(5);

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

pub fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// Hub config: tunnel 10.42.0.<n>/24, NBMA 198.51.100.<n>.
pub fn hub_config(n: u8) -> Config {
    let mut c = Config::new(
        Role::Hub,
        ip(&format!("10.42.0.{n}")),
        24,
        ip(&format!("198.51.100.{n}")),
    );
    c.holdtime = 600;
    c
}

/// Spoke config registering to the given hubs (by number), tunnel 10.42.0.<n>, NBMA
/// 203.0.113.<n>, LAN 10.<n>.0.0/24... as 10.100.<n>.0/24.
pub fn spoke_config(n: u8, hubs: &[u8]) -> Config {
    let mut c = Config::new(
        Role::Spoke,
        ip(&format!("10.42.0.{n}")),
        24,
        ip(&format!("203.0.113.{n}")),
    );
    c.holdtime = 600;
    c.local_prefixes = vec![net(&format!("10.100.{n}.0/24"))];
    c.nhs = hubs
        .iter()
        .map(|h| NhsConfig {
            tunnel_address: ip(&format!("10.42.0.{h}")),
            nbma_address: ip(&format!("198.51.100.{h}")),
            priority: 0,
        })
        .collect();
    c
}

/// The data-plane view of one node, rebuilt from its events.
#[derive(Debug, Default, Clone)]
pub struct DataPlane {
    pub peers: BTreeMap<IpAddr, IpAddr>,
    pub routes: BTreeMap<IpNet, IpAddr>,
}

pub struct Node {
    pub engine: Engine,
    /// Address the node sends from and is reached at (its NAT's public address if NATed).
    pub nbma: IpAddr,
    pub partitioned: bool,
    pub events: Vec<(Instant, Event)>,
    pub dp: DataPlane,
    /// Packets this node sent: (time, destination, decoded packet).
    pub sent: Vec<(Instant, IpAddr, Packet)>,
    /// Packets delivered to this node: (time, source, decoded packet).
    pub received: Vec<(Instant, IpAddr, Packet)>,
}

struct InFlight {
    at: Instant,
    seq: u64,
    from: IpAddr,
    to: IpAddr,
    bytes: Vec<u8>,
}

pub struct Sim {
    pub now: Instant,
    pub nodes: Vec<Node>,
    queue: VecDeque<InFlight>,
    seq: u64,
    /// Packets lost (partition or no such address).
    pub lost: u64,
}

impl Default for Sim {
    fn default() -> Self {
        Self::new()
    }
}

impl Sim {
    pub fn new() -> Sim {
        Sim {
            now: Instant::now(),
            nodes: Vec::new(),
            queue: VecDeque::new(),
            seq: 0,
            lost: 0,
        }
    }

    pub fn add(&mut self, cfg: Config) -> usize {
        let nbma = cfg.nbma_address;
        self.add_at(cfg, nbma)
    }

    /// Adds a node behind a NAT: the network sees it at `public` while its engine keeps its
    /// configured address.
    pub fn add_behind_nat(&mut self, cfg: Config, public: IpAddr) -> usize {
        self.add_at(cfg, public)
    }

    fn add_at(&mut self, cfg: Config, nbma: IpAddr) -> usize {
        let engine = Engine::new(cfg, self.now).expect("valid config");
        self.nodes.push(Node {
            engine,
            nbma,
            partitioned: false,
            events: Vec::new(),
            dp: DataPlane::default(),
            sent: Vec::new(),
            received: Vec::new(),
        });
        let i = self.nodes.len() - 1;
        self.flush(i);
        i
    }

    /// Moves a node's pending transmits into the network and its events into its log.
    fn flush(&mut self, i: usize) {
        let now = self.now;
        let node = &mut self.nodes[i];
        while let Some(t) = node.engine.poll_transmit() {
            let pkt = Packet::decode(&t.bytes)
                .unwrap_or_else(|e| panic!("node {i} emitted an undecodable packet: {e}"));
            node.sent.push((now, t.dst_nbma, pkt));
            self.seq += 1;
            if node.partitioned {
                self.lost += 1;
                continue;
            }
            self.queue.push_back(InFlight {
                at: now + LATENCY,
                seq: self.seq,
                from: node.nbma,
                to: t.dst_nbma,
                bytes: t.bytes,
            });
        }
        while let Some(ev) = node.engine.poll_event() {
            match &ev {
                Event::PeerUp { proto, nbma } => {
                    node.dp.peers.insert(*proto, *nbma);
                }
                Event::PeerDown { proto } => {
                    node.dp.peers.remove(proto);
                }
                Event::RouteAdd { prefix, next_hop } => {
                    node.dp.routes.insert(*prefix, *next_hop);
                }
                Event::RouteDel { prefix } => {
                    node.dp.routes.remove(prefix);
                }
                _ => {}
            }
            node.events.push((now, ev));
        }
    }

    pub fn flush_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.flush(i);
        }
    }

    /// Runs a command on a node's engine at the current time, then flushes it.
    pub fn with<R>(&mut self, i: usize, f: impl FnOnce(&mut Engine, Instant) -> R) -> R {
        let now = self.now;
        let r = f(&mut self.nodes[i].engine, now);
        self.flush(i);
        r
    }

    /// Injects raw bytes into node `i` as if sent from `from`.
    pub fn inject(&mut self, i: usize, from: IpAddr, bytes: &[u8]) {
        let now = self.now;
        self.nodes[i].engine.handle_packet(now, from, bytes);
        self.flush(i);
    }

    fn node_at(&self, nbma: IpAddr) -> Option<usize> {
        self.nodes.iter().position(|n| n.nbma == nbma)
    }

    fn next_instant(&self) -> Option<Instant> {
        let q = self.queue.iter().map(|p| p.at).min();
        let t = self
            .nodes
            .iter()
            .filter_map(|n| n.engine.poll_timeout())
            .min();
        match (q, t) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Advances the clock to `end`, delivering packets and firing timers in time order.
    pub fn run_until(&mut self, end: Instant) {
        while let Some(next) = self.next_instant().filter(|t| *t <= end) {
            if next > self.now {
                self.now = next;
            }
            let now = self.now;
            // deliver due packets in send order
            let mut due: Vec<InFlight> = Vec::new();
            let mut rest = VecDeque::new();
            while let Some(p) = self.queue.pop_front() {
                if p.at <= now {
                    due.push(p);
                } else {
                    rest.push_back(p);
                }
            }
            self.queue = rest;
            due.sort_by_key(|p| (p.at, p.seq));
            for p in due {
                match self.node_at(p.to) {
                    Some(j) if !self.nodes[j].partitioned => {
                        let pkt = Packet::decode(&p.bytes).expect("decodes");
                        self.nodes[j].received.push((now, p.from, pkt));
                        self.nodes[j].engine.handle_packet(now, p.from, &p.bytes);
                        self.flush(j);
                    }
                    _ => self.lost += 1,
                }
            }
            for i in 0..self.nodes.len() {
                if self.nodes[i]
                    .engine
                    .poll_timeout()
                    .is_some_and(|t| t <= now)
                {
                    self.nodes[i].engine.handle_timeout(now);
                    self.flush(i);
                }
            }
        }
        if end > self.now {
            self.now = end;
        }
    }

    pub fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        self.run_until(end);
    }

    /// Restarts a node: a fresh engine with `cfg` (all state lost) and a fresh data plane.
    pub fn restart(&mut self, i: usize, cfg: Config) {
        let now = self.now;
        let node = &mut self.nodes[i];
        node.engine = Engine::new(cfg, now).expect("valid config");
        node.dp = DataPlane::default();
        node.events.clear();
        self.flush(i);
    }

    /// Cuts a node off the network (or reconnects it).
    pub fn partition(&mut self, i: usize, cut: bool) {
        self.nodes[i].partitioned = cut;
    }

    /// Puts node `i` behind a NAT: the network sees it at `public` from now on, while its
    /// engine keeps its configured address.
    pub fn nat(&mut self, i: usize, public: IpAddr) {
        self.nodes[i].nbma = public;
    }

    /// The node's underlay address changes (e.g. a new DHCP lease): network and engine.
    pub fn change_nbma(&mut self, i: usize, new: IpAddr) {
        self.nodes[i].nbma = new;
        self.with(i, |e, now| e.set_local_nbma(now, new));
    }

    pub fn events(&self, i: usize) -> impl Iterator<Item = &Event> {
        self.nodes[i].events.iter().map(|(_, e)| e)
    }

    pub fn clear_log(&mut self, i: usize) {
        self.nodes[i].events.clear();
        self.nodes[i].sent.clear();
        self.nodes[i].received.clear();
    }

    /// Packets of type `op` node `i` sent.
    pub fn sent_ops(&self, i: usize, op: Op) -> Vec<&(Instant, IpAddr, Packet)> {
        self.nodes[i]
            .sent
            .iter()
            .filter(|(_, _, p)| p.op() == op)
            .collect()
    }

    pub fn received_ops(&self, i: usize, op: Op) -> Vec<&(Instant, IpAddr, Packet)> {
        self.nodes[i]
            .received
            .iter()
            .filter(|(_, _, p)| p.op() == op)
            .collect()
    }

    pub fn dp(&self, i: usize) -> &DataPlane {
        &self.nodes[i].dp
    }

    pub fn engine(&self, i: usize) -> &Engine {
        &self.nodes[i].engine
    }
}

/// Number of nodes by name for readable tests.
pub type Peers = HashMap<IpAddr, IpAddr>;

/// An IPv4 header (20 bytes) from `src` to `dst`, as the start of a redirected packet.
pub fn ipv4_head(src: &str, dst: &str) -> Vec<u8> {
    let s: std::net::Ipv4Addr = src.parse().unwrap();
    let d: std::net::Ipv4Addr = dst.parse().unwrap();
    let mut h = vec![0x45, 0, 0, 84, 0, 0, 0x40, 0, 64, 1, 0, 0];
    h.extend_from_slice(&s.octets());
    h.extend_from_slice(&d.octets());
    h.extend_from_slice(&[8, 0, 0, 0, 0, 1, 0, 1]);
    h
}
