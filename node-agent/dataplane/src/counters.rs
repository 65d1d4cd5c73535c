//! Data plane counters: relaxed atomics written in per-batch increments, read as a
//! serialisable [`Counters`] snapshot.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// Why a packet was dropped. Every drop is counted under exactly one reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// Outer IPv4 header unusable (truncated, not GRE).
    BadOuter,
    /// Outer destination is not our NBMA address.
    NotForUs,
    /// GRE header unusable (truncated, version ≠ 0, RFC 1701 flags, bad checksum).
    BadGre,
    /// GRE key missing or different from ours.
    WrongKey,
    /// GRE protocol type is not IPv4, IPv6 or NHRP.
    UnknownProtocol,
    /// Inner packet (from the TUN or decapsulated) is not a usable IPv4/IPv6 packet.
    BadInner,
    /// No route and no neighbour for the destination.
    NoRoute,
    /// A route matched but its next hop has no NBMA address yet.
    NoNeighbor,
    /// The hub would send the packet back to the spoke it came from.
    HairpinLoop,
    /// Writing to the TUN device failed.
    TunWriteError,
    /// Sending on the underlay socket failed.
    SendError,
    /// An event (NHRP packet, hairpin, miss, use) was dropped because the agent's channel
    /// was full.
    EventQueueFull,
    /// IPsec is required but the peer has no outbound SA yet (IKE is asked to start).
    NoSa,
    /// A GRE packet arrived in clear although IPsec is required.
    Unprotected,
    /// ESP with an SPI that no inbound SA has.
    EspUnknownSpi,
    /// ESP sequence number replayed or older than the anti-replay window.
    EspReplay,
    /// ESP integrity check failed (wrong key, tampered or corrupted).
    EspAuth,
    /// ESP packet otherwise unusable: truncated, bad padding, expired SA, not GRE inside.
    EspInvalid,
    /// An NHRP packet waiting for its peer's SA was dropped: the per-peer queue was full.
    NhrpQueueFull,
}

impl DropReason {
    /// All reasons, in a stable order.
    pub const ALL: [DropReason; 19] = [
        DropReason::BadOuter,
        DropReason::NotForUs,
        DropReason::BadGre,
        DropReason::WrongKey,
        DropReason::UnknownProtocol,
        DropReason::BadInner,
        DropReason::NoRoute,
        DropReason::NoNeighbor,
        DropReason::HairpinLoop,
        DropReason::TunWriteError,
        DropReason::SendError,
        DropReason::EventQueueFull,
        DropReason::NoSa,
        DropReason::Unprotected,
        DropReason::EspUnknownSpi,
        DropReason::EspReplay,
        DropReason::EspAuth,
        DropReason::EspInvalid,
        DropReason::NhrpQueueFull,
    ];

    /// A short name for logs and metrics labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            DropReason::BadOuter => "bad_outer",
            DropReason::NotForUs => "not_for_us",
            DropReason::BadGre => "bad_gre",
            DropReason::WrongKey => "wrong_key",
            DropReason::UnknownProtocol => "unknown_protocol",
            DropReason::BadInner => "bad_inner",
            DropReason::NoRoute => "no_route",
            DropReason::NoNeighbor => "no_neighbor",
            DropReason::HairpinLoop => "hairpin_loop",
            DropReason::TunWriteError => "tun_write_error",
            DropReason::SendError => "send_error",
            DropReason::EventQueueFull => "event_queue_full",
            DropReason::NoSa => "no_sa",
            DropReason::Unprotected => "unprotected",
            DropReason::EspUnknownSpi => "esp_unknown_spi",
            DropReason::EspReplay => "esp_replay",
            DropReason::EspAuth => "esp_auth",
            DropReason::EspInvalid => "esp_invalid",
            DropReason::NhrpQueueFull => "nhrp_queue_full",
        }
    }

    const fn index(self) -> usize {
        self as usize
    }
}

/// Drops by reason (a struct rather than a map so the JSON shape is fixed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropCounters {
    pub bad_outer: u64,
    pub not_for_us: u64,
    pub bad_gre: u64,
    pub wrong_key: u64,
    pub unknown_protocol: u64,
    pub bad_inner: u64,
    pub no_route: u64,
    pub no_neighbor: u64,
    pub hairpin_loop: u64,
    pub tun_write_error: u64,
    pub send_error: u64,
    pub event_queue_full: u64,
    pub no_sa: u64,
    pub unprotected: u64,
    pub esp_unknown_spi: u64,
    pub esp_replay: u64,
    pub esp_auth: u64,
    pub esp_invalid: u64,
    pub nhrp_queue_full: u64,
}

impl DropCounters {
    /// The count for one reason.
    pub fn get(&self, r: DropReason) -> u64 {
        match r {
            DropReason::BadOuter => self.bad_outer,
            DropReason::NotForUs => self.not_for_us,
            DropReason::BadGre => self.bad_gre,
            DropReason::WrongKey => self.wrong_key,
            DropReason::UnknownProtocol => self.unknown_protocol,
            DropReason::BadInner => self.bad_inner,
            DropReason::NoRoute => self.no_route,
            DropReason::NoNeighbor => self.no_neighbor,
            DropReason::HairpinLoop => self.hairpin_loop,
            DropReason::TunWriteError => self.tun_write_error,
            DropReason::SendError => self.send_error,
            DropReason::EventQueueFull => self.event_queue_full,
            DropReason::NoSa => self.no_sa,
            DropReason::Unprotected => self.unprotected,
            DropReason::EspUnknownSpi => self.esp_unknown_spi,
            DropReason::EspReplay => self.esp_replay,
            DropReason::EspAuth => self.esp_auth,
            DropReason::EspInvalid => self.esp_invalid,
            DropReason::NhrpQueueFull => self.nhrp_queue_full,
        }
    }

    /// Sum over all reasons.
    pub fn total(&self) -> u64 {
        DropReason::ALL.iter().map(|r| self.get(*r)).sum()
    }
}

/// A snapshot of the data plane counters.
///
/// `rx_*`: GRE packets received from the underlay that passed the checks (before
/// dispatch). `tx_*`: GRE packets sent to the underlay (data, NHRP and hub-forwarded).
/// `tun_rx_*`: packets read from the TUN; `tun_tx_*`: packets written to it.
/// `hub_forwarded_*`: packets the hub re-encapsulated from one spoke to another (hairpin).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub tun_rx_packets: u64,
    pub tun_rx_bytes: u64,
    pub tun_tx_packets: u64,
    pub tun_tx_bytes: u64,
    pub hub_forwarded_packets: u64,
    pub hub_forwarded_bytes: u64,
    pub nhrp_rx_packets: u64,
    pub nhrp_tx_packets: u64,
    /// Events sent to the agent.
    pub events_sent: u64,
    /// Hairpin/Miss/Used events not sent because the same flow was reported less than
    /// the dedupe window ago.
    pub events_suppressed: u64,
    /// ESP packets opened (inbound, raw or UDP-encapsulated) and sealed (outbound).
    pub esp_rx_packets: u64,
    pub esp_tx_packets: u64,
    /// IKE datagrams on UDP 4500 handed to the agent.
    pub ike_rx_packets: u64,
    /// NHRP packets queued until their peer's SA came up, and sent once it did.
    pub nhrp_queued: u64,
    pub nhrp_dequeued: u64,
    pub drops: DropCounters,
}

/// The live counters. Fields mirror [`Counters`].
#[derive(Debug, Default)]
pub(crate) struct AtomicCounters {
    vals: [AtomicU64; Field::COUNT],
    drops: [AtomicU64; DropReason::ALL.len()],
}

/// Counter fields, used to index the atomic array and the per-batch accumulator.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Field {
    RxPackets,
    RxBytes,
    TxPackets,
    TxBytes,
    TunRxPackets,
    TunRxBytes,
    TunTxPackets,
    TunTxBytes,
    HubFwdPackets,
    HubFwdBytes,
    NhrpRx,
    NhrpTx,
    EventsSent,
    EventsSuppressed,
    EspRx,
    EspTx,
    IkeRx,
    NhrpQueued,
    NhrpDequeued,
}

impl Field {
    const COUNT: usize = 19;
}

/// Per-batch accumulator, owned by one task; flushed with one atomic add per touched field.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    vals: [u64; Field::COUNT],
    drops: [u64; DropReason::ALL.len()],
}

impl Batch {
    pub(crate) fn add(&mut self, f: Field, n: u64) {
        if let Some(v) = self.vals.get_mut(f as usize) {
            *v = v.wrapping_add(n);
        }
    }

    pub(crate) fn drop(&mut self, r: DropReason) {
        if let Some(v) = self.drops.get_mut(r.index()) {
            *v = v.wrapping_add(1);
        }
    }
}

impl AtomicCounters {
    pub(crate) fn flush(&self, b: &mut Batch) {
        for (a, v) in self.vals.iter().zip(b.vals.iter_mut()) {
            if *v != 0 {
                a.fetch_add(*v, Ordering::Relaxed);
                *v = 0;
            }
        }
        for (a, v) in self.drops.iter().zip(b.drops.iter_mut()) {
            if *v != 0 {
                a.fetch_add(*v, Ordering::Relaxed);
                *v = 0;
            }
        }
    }

    pub(crate) fn snapshot(&self) -> Counters {
        let v = |f: Field| {
            self.vals
                .get(f as usize)
                .map_or(0, |a| a.load(Ordering::Relaxed))
        };
        let d = |r: DropReason| {
            self.drops
                .get(r.index())
                .map_or(0, |a| a.load(Ordering::Relaxed))
        };
        Counters {
            rx_packets: v(Field::RxPackets),
            rx_bytes: v(Field::RxBytes),
            tx_packets: v(Field::TxPackets),
            tx_bytes: v(Field::TxBytes),
            tun_rx_packets: v(Field::TunRxPackets),
            tun_rx_bytes: v(Field::TunRxBytes),
            tun_tx_packets: v(Field::TunTxPackets),
            tun_tx_bytes: v(Field::TunTxBytes),
            hub_forwarded_packets: v(Field::HubFwdPackets),
            hub_forwarded_bytes: v(Field::HubFwdBytes),
            nhrp_rx_packets: v(Field::NhrpRx),
            nhrp_tx_packets: v(Field::NhrpTx),
            events_sent: v(Field::EventsSent),
            events_suppressed: v(Field::EventsSuppressed),
            esp_rx_packets: v(Field::EspRx),
            esp_tx_packets: v(Field::EspTx),
            ike_rx_packets: v(Field::IkeRx),
            nhrp_queued: v(Field::NhrpQueued),
            nhrp_dequeued: v(Field::NhrpDequeued),
            drops: DropCounters {
                bad_outer: d(DropReason::BadOuter),
                not_for_us: d(DropReason::NotForUs),
                bad_gre: d(DropReason::BadGre),
                wrong_key: d(DropReason::WrongKey),
                unknown_protocol: d(DropReason::UnknownProtocol),
                bad_inner: d(DropReason::BadInner),
                no_route: d(DropReason::NoRoute),
                no_neighbor: d(DropReason::NoNeighbor),
                hairpin_loop: d(DropReason::HairpinLoop),
                tun_write_error: d(DropReason::TunWriteError),
                send_error: d(DropReason::SendError),
                event_queue_full: d(DropReason::EventQueueFull),
                no_sa: d(DropReason::NoSa),
                unprotected: d(DropReason::Unprotected),
                esp_unknown_spi: d(DropReason::EspUnknownSpi),
                esp_replay: d(DropReason::EspReplay),
                esp_auth: d(DropReason::EspAuth),
                esp_invalid: d(DropReason::EspInvalid),
                nhrp_queue_full: d(DropReason::NhrpQueueFull),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_flush_into_snapshot_and_reset() {
        let c = AtomicCounters::default();
        let mut b = Batch::default();
        b.add(Field::TxPackets, 2);
        b.add(Field::TxBytes, 300);
        b.drop(DropReason::WrongKey);
        b.drop(DropReason::WrongKey);
        b.drop(DropReason::EventQueueFull);
        c.flush(&mut b);
        c.flush(&mut b); // a second flush of the reset batch adds nothing
        let s = c.snapshot();
        assert_eq!((s.tx_packets, s.tx_bytes), (2, 300));
        assert_eq!(s.drops.wrong_key, 2);
        assert_eq!(s.drops.event_queue_full, 1);
        assert_eq!(s.drops.total(), 3);
        let json = serde_json::to_value(s).unwrap();
        assert_eq!(json["drops"]["wrong_key"], 2);
        for r in DropReason::ALL {
            assert!(json["drops"].get(r.as_str()).is_some(), "{}", r.as_str());
        }
    }
}
