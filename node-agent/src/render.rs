//! Human-readable tables for the `show` commands (after Cisco IOS and FRR `show dmvpn`).

use std::fmt::Write as _;

use serde_json::Value;

use crate::view::{CacheView, ClearView, DmvpnView, NhsListView};

/// Cisco-style up/down time: `hh:mm:ss` below a day, `XdYYh` below a week, `XwYd` beyond.
pub fn duration(secs: u64) -> String {
    const DAY: u64 = 86_400;
    const WEEK: u64 = 7 * DAY;
    if secs < DAY {
        format!(
            "{:02}:{:02}:{:02}",
            secs / 3600,
            (secs % 3600) / 60,
            secs % 60
        )
    } else if secs < WEEK {
        format!("{}d{:02}h", secs / DAY, (secs % DAY) / 3600)
    } else {
        format!("{}w{}d", secs / WEEK, (secs % WEEK) / DAY)
    }
}

fn opt_duration(secs: Option<u64>) -> String {
    secs.map_or_else(|| "never".to_owned(), duration)
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// A plain text table: headers, then rows; every column as wide as its widest cell.
struct Table {
    headers: Vec<&'static str>,
    /// Columns aligned to the right (numbers).
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(cols: &[(&'static str, bool)]) -> Self {
        Table {
            headers: cols.iter().map(|c| c.0).collect(),
            right: cols.iter().map(|c| c.1).collect(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn render(&self, out: &mut String) {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |cells: &mut dyn Iterator<Item = &str>, out: &mut String| {
            let mut s = String::new();
            for ((c, w), right) in cells.zip(&widths).zip(&self.right) {
                if !s.is_empty() {
                    s.push_str("  ");
                }
                if *right {
                    let _ = write!(s, "{c:>w$}");
                } else {
                    let _ = write!(s, "{c:<w$}");
                }
            }
            out.push_str(s.trim_end());
            out.push('\n');
        };
        line(&mut self.headers.iter().copied(), out);
        let dashes: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        line(&mut dashes.iter().map(String::as_str), out);
        for r in &self.rows {
            line(&mut r.iter().map(String::as_str), out);
        }
    }
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

fn family(addr: &ipnet::IpNet) -> &'static str {
    match addr {
        ipnet::IpNet::V4(_) => "IPv4",
        ipnet::IpNet::V6(_) => "IPv6",
    }
}

/// `show dmvpn`.
pub fn dmvpn(v: &DmvpnView) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Interface: {}, {} NHRP Details",
        v.interface,
        family(&v.tunnel_address)
    );
    let _ = writeln!(
        out,
        "Type: {}, Phase: {}, Tunnel: {}, NBMA: {}, Peers: {}, Uptime: {}",
        capitalize(&v.role),
        v.phase,
        v.tunnel_address,
        v.nbma_address,
        v.peers.len(),
        duration(v.uptime_secs)
    );
    out.push_str("Legend: Attrb --> S - Static NHS, D - Dynamic (registered), T - Shortcut\n\n");
    let mut t = Table::new(&[
        ("# Ent", true),
        ("Peer NBMA Addr", false),
        ("Peer Tunnel Add", false),
        ("State", false),
        ("UpDn Tm", false),
        ("Attrb", false),
        ("Expires", false),
        ("IKE", false),
        ("Prefixes", false),
    ]);
    for p in &v.peers {
        let ike = match (&p.ike_state, &p.ike_error) {
            (None, _) => "-".to_owned(),
            (Some(s), Some(e)) if s != "established" => format!("{} ({e})", s.to_uppercase()),
            (Some(s), _) => s.to_uppercase(),
        };
        let prefixes: Vec<String> = p.prefixes.iter().map(ToString::to_string).collect();
        t.row(vec![
            p.prefixes.len().max(1).to_string(),
            opt(p.nbma_address),
            p.tunnel_address.to_string(),
            p.state.to_uppercase(),
            opt_duration(p.state_secs),
            p.attributes.clone(),
            p.expires_in_secs.map_or_else(|| "-".to_owned(), duration),
            ike,
            if prefixes.is_empty() {
                "-".to_owned()
            } else {
                prefixes.join(",")
            },
        ]);
    }
    if v.peers.is_empty() {
        out.push_str("No tunnel peers.\n");
    } else {
        t.render(&mut out);
    }
    let tr = &v.traffic;
    let _ = writeln!(
        out,
        "\nTraffic: tx {} packets / {} bytes, rx {} packets / {} bytes, dropped {} packets",
        tr.tx_packets, tr.tx_bytes, tr.rx_packets, tr.rx_bytes, tr.dropped_packets
    );
    if let Some(ip) = &v.ipsec {
        let _ = writeln!(
            out,
            "\nIPsec: auth {}, identity {}{}",
            ip.auth,
            ip.identity,
            if ip.force_udp_encap {
                ", UDP encapsulation forced"
            } else {
                ""
            }
        );
        let mut t = Table::new(&[
            ("Peer NBMA Addr", false),
            ("IKE", false),
            ("Since", false),
            ("Identity", false),
            ("NAT", false),
            ("SAs", true),
            ("Setup ms", true),
            ("Last error", false),
        ]);
        for p in &ip.peers {
            t.row(vec![
                p.nbma_address.to_string(),
                p.state.to_uppercase(),
                duration(p.state_secs),
                p.identity.clone().unwrap_or_else(|| "-".into()),
                if p.nat { "yes" } else { "no" }.into(),
                p.child_sas.to_string(),
                opt(p.established_ms.map(|ms| format!("{ms:.2}"))),
                p.last_error.clone().unwrap_or_else(|| "-".into()),
            ]);
        }
        if ip.peers.is_empty() {
            out.push_str("No IKE peers.\n");
        } else {
            t.render(&mut out);
        }
        let mut t = Table::new(&[
            ("Peer NBMA Addr", false),
            ("Dir", false),
            ("SPI", false),
            ("Suite", false),
            ("Encap", false),
            ("Packets", true),
            ("Bytes", true),
            ("Dropped", true),
        ]);
        for sa in &ip.sas {
            t.row(vec![
                sa.peer.to_string(),
                sa.direction.clone(),
                format!("{:#010x}", sa.spi),
                sa.suite.clone(),
                if sa.udp_encap { "udp-4500" } else { "esp" }.into(),
                sa.packets.to_string(),
                sa.bytes.to_string(),
                sa.dropped.to_string(),
            ]);
        }
        if !ip.sas.is_empty() {
            out.push('\n');
            t.render(&mut out);
        }
    }
    out
}

/// `show nhrp cache`.
pub fn cache(v: &CacheView) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Interface: {}, {} entries",
        v.interface,
        v.entries.len()
    );
    if v.entries.is_empty() {
        return out;
    }
    let mut t = Table::new(&[
        ("Type", false),
        ("Prefix", false),
        ("Protocol", false),
        ("NBMA", false),
        ("Expires", false),
        ("Flags", false),
    ]);
    for e in &v.entries {
        let mut flags = Vec::new();
        if e.used {
            flags.push("used");
        }
        if e.unique {
            flags.push("unique");
        }
        t.row(vec![
            e.kind.clone(),
            e.prefix.to_string(),
            e.protocol.to_string(),
            opt(e.nbma),
            e.expires_in_secs.map_or_else(|| "-".to_owned(), duration),
            if flags.is_empty() {
                "-".to_owned()
            } else {
                flags.join(",")
            },
        ]);
    }
    t.render(&mut out);
    out
}

/// `show nhrp nhs`.
pub fn nhs(v: &NhsListView) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Interface: {}, {} next hop servers",
        v.interface,
        v.nhs.len()
    );
    if v.nhs.is_empty() {
        return out;
    }
    let mut t = Table::new(&[
        ("NHS", false),
        ("NBMA", false),
        ("Priority", true),
        ("State", false),
        ("Registered", false),
        ("Last Reply", false),
        ("Failures", true),
        ("Flags", false),
    ]);
    for n in &v.nhs {
        let mut flags = Vec::new();
        if n.preferred {
            flags.push("preferred".to_owned());
        }
        if let Some(nat) = n.nat_address {
            flags.push(format!("nat:{nat}"));
        }
        if let Some(code) = n.last_rejection_code {
            flags.push(format!("rejected:{code}"));
        }
        t.row(vec![
            n.tunnel_address.to_string(),
            n.nbma_address.to_string(),
            n.priority.to_string(),
            n.state.to_uppercase(),
            if n.registered { "yes" } else { "no" }.to_owned(),
            n.last_reply_secs_ago
                .map_or_else(|| "never".to_owned(), |s| format!("{} ago", duration(s))),
            n.failures.to_string(),
            if flags.is_empty() {
                "-".to_owned()
            } else {
                flags.join(",")
            },
        ]);
    }
    t.render(&mut out);
    out
}

/// `clear nhrp cache`.
pub fn clear(v: &ClearView) -> String {
    format!("Cleared {} NHRP cache entries.\n", v.cleared)
}

/// `show counters`: the JSON tree flattened to `path value` lines, one counter a line.
pub fn counters(v: &Value) -> String {
    let mut lines = Vec::new();
    flatten("", v, &mut lines);
    let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, val) in lines {
        let _ = writeln!(out, "{k:<width$}  {val}");
    }
    out
}

fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&p, child, out);
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), child, out);
            }
        }
        Value::String(s) => out.push((prefix.to_owned(), s.clone())),
        other => out.push((prefix.to_owned(), other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::*;

    fn ip(s: &str) -> std::net::IpAddr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> ipnet::IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn durations_like_cisco() {
        assert_eq!(duration(0), "00:00:00");
        assert_eq!(duration(3725), "01:02:05");
        assert_eq!(duration(86_399), "23:59:59");
        assert_eq!(duration(86_400 + 7200), "1d02h");
        assert_eq!(duration(15 * 86_400), "2w1d");
    }

    fn sample_dmvpn() -> DmvpnView {
        DmvpnView {
            interface: "dmvpn0".into(),
            role: "spoke".into(),
            phase: 3,
            tunnel_address: net("10.42.0.2/24"),
            nbma_address: ip("198.51.100.2"),
            uptime_secs: 65,
            peers: vec![
                PeerView {
                    tunnel_address: ip("10.42.0.1"),
                    nbma_address: Some(ip("198.51.100.1")),
                    state: "up".into(),
                    state_secs: Some(61),
                    attributes: "S".into(),
                    prefixes: vec![],
                    expires_in_secs: None,
                    ike_state: Some("established".into()),
                    ike_error: None,
                },
                PeerView {
                    tunnel_address: ip("10.42.0.3"),
                    nbma_address: Some(ip("203.0.113.3")),
                    state: "up".into(),
                    state_secs: Some(5),
                    attributes: "T".into(),
                    prefixes: vec![net("10.1.3.0/24"), net("10.42.0.3/32")],
                    expires_in_secs: Some(595),
                    ike_state: Some("failed".into()),
                    ike_error: Some("AUTHENTICATION_FAILED".into()),
                },
            ],
            traffic: TrafficView {
                tx_packets: 10,
                tx_bytes: 1000,
                rx_packets: 9,
                rx_bytes: 900,
                dropped_packets: 1,
            },
            ipsec: None,
        }
    }

    #[test]
    fn dmvpn_table() {
        let s = dmvpn(&sample_dmvpn());
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[0], "Interface: dmvpn0, IPv4 NHRP Details");
        assert!(lines[1].starts_with("Type: Spoke, Phase: 3, Tunnel: 10.42.0.2/24, NBMA: 198.51.100.2, Peers: 2, Uptime: 00:01:05"), "{}", lines[1]);
        let header = lines.iter().position(|l| l.starts_with("# Ent")).unwrap();
        assert!(lines[header].contains("Peer NBMA Addr  Peer Tunnel Add  State  UpDn Tm"));
        assert!(lines[header + 1].starts_with("-----"));
        let hub = lines[header + 2];
        assert!(hub.contains("198.51.100.1"), "{hub}");
        assert!(hub.contains("UP"), "{hub}");
        assert!(hub.contains("00:01:01"), "{hub}");
        let sc = lines[header + 3];
        assert!(
            sc.trim_start().starts_with("2 "),
            "entry count of the shortcut peer: {sc}"
        );
        assert!(sc.contains("10.1.3.0/24,10.42.0.3/32"), "{sc}");
        assert!(sc.contains("00:09:55"), "{sc}");
        // Columns line up: the NBMA column starts at the same offset in every row.
        let col = lines[header].find("Peer NBMA").unwrap();
        assert_eq!(&hub[col..col + 12], "198.51.100.1");
        assert_eq!(&sc[col..col + 11], "203.0.113.3");
        assert!(s.contains("tx 10 packets / 1000 bytes"));
    }

    #[test]
    fn dmvpn_no_peers() {
        let mut v = sample_dmvpn();
        v.peers.clear();
        assert!(dmvpn(&v).contains("No tunnel peers."));
    }

    #[test]
    fn cache_table() {
        let v = CacheView {
            interface: "dmvpn0".into(),
            entries: vec![
                CacheEntryView {
                    kind: "dynamic".into(),
                    prefix: net("10.42.0.2/32"),
                    protocol: ip("10.42.0.2"),
                    nbma: Some(ip("198.51.100.2")),
                    expires_in_secs: Some(7199),
                    used: false,
                    unique: true,
                },
                CacheEntryView {
                    kind: "incomplete".into(),
                    prefix: net("10.42.0.9/32"),
                    protocol: ip("10.42.0.9"),
                    nbma: None,
                    expires_in_secs: None,
                    used: false,
                    unique: false,
                },
            ],
        };
        let s = cache(&v);
        assert!(s.starts_with("Interface: dmvpn0, 2 entries\n"));
        let dynamic = s.lines().find(|l| l.starts_with("dynamic")).unwrap();
        assert!(
            dynamic.contains("198.51.100.2")
                && dynamic.contains("01:59:59")
                && dynamic.ends_with("unique"),
            "{dynamic}"
        );
        let inc = s.lines().find(|l| l.starts_with("incomplete")).unwrap();
        assert!(inc.ends_with('-') && inc.contains("10.42.0.9/32"), "{inc}");
    }

    #[test]
    fn nhs_table() {
        let v = NhsListView {
            interface: "dmvpn0".into(),
            nhs: vec![NhsView {
                tunnel_address: ip("10.42.0.1"),
                nbma_address: ip("198.51.100.1"),
                priority: 0,
                state: "up".into(),
                registered: true,
                preferred: true,
                last_reply_secs_ago: Some(2400),
                failures: 2,
                consecutive_timeouts: 0,
                request_id: 7,
                nat_address: Some(ip("203.0.113.50")),
                last_rejection_code: None,
            }],
        };
        let s = nhs(&v);
        let row = s.lines().find(|l| l.starts_with("10.42.0.1")).unwrap();
        assert!(
            row.contains("UP") && row.contains("yes") && row.contains("00:40:00 ago"),
            "{row}"
        );
        assert!(row.ends_with("preferred,nat:203.0.113.50"), "{row}");
    }

    #[test]
    fn counters_flattened() {
        let v = serde_json::json!({"nhrp": {"messages": {"registration_request": {"rx": 0, "tx": 2}}}, "dataplane": {"tx_packets": 5}});
        let s = counters(&v);
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(
            lines.iter().any(
                |l| l.starts_with("nhrp.messages.registration_request.tx") && l.ends_with(" 2")
            )
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("dataplane.tx_packets") && l.ends_with(" 5"))
        );
    }
}
