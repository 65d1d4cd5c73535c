//! Decrypts ESP captured from other implementations (scapy; Linux XFRM keyed by strongSwan)
//! with our inbound SAs. Captures and keys are copies of the shared fixtures
//! (tests/data/, see the fixtures README for how they were made).

mod common;

use std::time::Instant;

use common::{Ipv4, hex, ipv4_of_ethernet, pcap_records};
use dmvpn_esp::{Lifetime, SaDatabase, SecurityAssociation, Suite};

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/");

/// (src, spi, key material) of every SA in an `ip xfrm state` dump.
fn xfrm_states(text: &str) -> Vec<([u8; 4], u32, Vec<u8>)> {
    let mut out = Vec::new();
    let mut src = None;
    let mut spi = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["src", s, "dst", _] => {
                let a: Vec<u8> = s.split('.').map(|o| o.parse().unwrap()).collect();
                src = Some(<[u8; 4]>::try_from(a).unwrap());
            }
            ["proto", "esp", "spi", x, ..] => {
                spi = Some(u32::from_str_radix(x.trim_start_matches("0x"), 16).unwrap());
            }
            ["aead", "rfc4106(gcm(aes))", key, "128"] => {
                out.push((src.take().unwrap(), spi.take().unwrap(), hex(key)));
            }
            _ => {}
        }
    }
    out
}

struct Decrypted {
    src: [u8; 4],
    gre_key: Option<u32>,
    gre_proto: u16,
    inner: Vec<u8>,
}

/// Opens every ESP packet of the capture; panics if any fails.
fn decrypt_all(pcap: &str, sas: &[([u8; 4], u32, Vec<u8>)]) -> Vec<Decrypted> {
    let now = Instant::now();
    let mut db: SaDatabase<[u8; 4]> = SaDatabase::new();
    for (src, spi, km) in sas {
        let suite = match km.len() {
            20 => Suite::Aes128Gcm,
            36 => Suite::Aes256Gcm,
            n => panic!("unexpected key length {n}"),
        };
        // Linux states without `flag esn` use 32-bit sequence numbers.
        let sa = SecurityAssociation::new(*spi, suite, km)
            .unwrap()
            .with_esn(false)
            .with_lifetime(Lifetime::UNLIMITED)
            .unwrap();
        db.install_inbound(*src, sa.into_inbound(now).unwrap())
            .unwrap();
    }
    let data = std::fs::read(format!("{DATA}{pcap}")).unwrap();
    let (linktype, frames) = pcap_records(&data);
    assert_eq!(linktype, 1, "Ethernet");
    let mut out = Vec::new();
    for f in &frames {
        let Some(Ipv4 {
            src,
            proto: 50,
            payload,
            ..
        }) = ipv4_of_ethernet(f)
        else {
            continue;
        };
        let mut esp = payload.to_vec();
        let o = db
            .open_in_place(now, &mut esp)
            .unwrap_or_else(|e| panic!("{pcap}: ESP from {src:?} did not open: {e}"));
        assert_eq!(o.peer, src);
        assert_eq!(o.next_header, 47, "transport mode carrying GRE");
        let gre = &esp[o.payload];
        let flags = u16::from_be_bytes([gre[0], gre[1]]);
        assert_eq!(flags & !0x2000, 0, "only the K bit");
        let gre_proto = u16::from_be_bytes([gre[2], gre[3]]);
        let (gre_key, inner) = if flags & 0x2000 != 0 {
            (
                Some(u32::from_be_bytes(gre[4..8].try_into().unwrap())),
                &gre[8..],
            )
        } else {
            (None, &gre[4..])
        };
        out.push(Decrypted {
            src,
            gre_key,
            gre_proto,
            inner: inner.to_vec(),
        });
    }
    let t = db.totals();
    assert_eq!(t.inbound.dropped() + t.unknown_spi + t.truncated, 0);
    out
}

fn assert_icmp_between(d: &Decrypted, a: [u8; 4], b: [u8; 4]) {
    assert_eq!(d.gre_key, Some(42));
    assert_eq!(d.gre_proto, 0x0800);
    let ip = &d.inner;
    assert_eq!(ip[0] >> 4, 4);
    assert_eq!(ip[9], 1, "ICMP");
    let (s, t) = (&ip[12..16], &ip[16..20]);
    assert!(
        (s == a && t == b) || (s == b && t == a),
        "inner {s:?} -> {t:?}"
    );
}

#[test]
fn scapy_esp_packet_decrypts_to_gre_icmp() {
    let key = hex("0102030405060708090a0b0c0d0e0f1011121314");
    let got = decrypt_all("esp-ike.pcap", &[([198, 51, 100, 1], 0x1001, key)]);
    assert_eq!(got.len(), 1);
    let d = &got[0];
    assert_icmp_between(d, [10, 42, 0, 1], [10, 42, 0, 2]);
    assert_eq!(&d.inner[12..20], &[10, 42, 0, 1, 10, 42, 0, 2]);
    assert_eq!(d.inner[20], 8, "echo request");
    assert!(d.inner.ends_with(b"dmvpn-test"));
}

#[test]
fn linux_xfrm_esp_from_strongswan_keys_decrypts() {
    let keys =
        std::fs::read_to_string(format!("{DATA}strongswan-ikev2-kernel-gre.keys.txt")).unwrap();
    let sas = xfrm_states(&keys);
    assert_eq!(sas.len(), 2);
    let got = decrypt_all("strongswan-ikev2-kernel-gre.pcap", &sas);
    // 2 each way (README), echo requests from .1 and replies from .2.
    assert_eq!(got.len(), 4);
    for d in &got {
        assert_icmp_between(d, [10, 42, 0, 1], [10, 42, 0, 2]);
    }
    assert_eq!(got.iter().filter(|d| d.src == [198, 51, 100, 1]).count(), 2);
}

#[test]
fn dmvpn_frr_strongswan_esp_carries_nhrp_and_icmp() {
    let keys = std::fs::read_to_string(format!("{DATA}dmvpn-frr-strongswan.keys.txt")).unwrap();
    let got = decrypt_all("dmvpn-frr-strongswan.pcap", &xfrm_states(&keys));
    let nhrp: Vec<&Decrypted> = got.iter().filter(|d| d.gre_proto == 0x2001).collect();
    let icmp: Vec<&Decrypted> = got.iter().filter(|d| d.gre_proto == 0x0800).collect();
    assert_eq!(nhrp.len() + icmp.len(), got.len());
    // Registration Request (op 3) and Reply (op 4): NHRP fixed header op type at offset 17.
    let ops: Vec<u8> = nhrp.iter().map(|d| d.inner[17]).collect();
    assert!(ops.contains(&3) && ops.contains(&4), "ops {ops:?}");
    assert_eq!(icmp.len(), 6);
    for d in icmp {
        assert_icmp_between(d, [10, 42, 0, 1], [10, 42, 0, 2]);
    }
}
