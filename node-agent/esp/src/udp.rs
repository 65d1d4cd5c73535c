//! UDP encapsulation of ESP for NAT traversal (RFC 3948) and NAT keepalives.
//!
//! On UDP port 4500 three kinds of datagram share the socket: IKE messages, prefixed with a
//! 4-byte zero "non-ESP marker" (an SPI can never be 0); ESP packets, starting directly with
//! their SPI; and NAT keepalives, a single 0xFF byte.

use std::time::{Duration, Instant};

use crate::error::{ConfigError, EspError};

/// The IKE/ESP NAT traversal port.
pub const NAT_T_PORT: u16 = 4500;
/// Prefix of IKE messages on port 4500 (RFC 3948 §2.2).
pub const NON_ESP_MARKER: [u8; 4] = [0; 4];
/// The NAT keepalive payload (RFC 3948 §2.3).
pub const NAT_KEEPALIVE: [u8; 1] = [0xFF];
pub const UDP_HEADER_LEN: usize = 8;
/// Default NAT keepalive interval (RFC 3948 §4 suggests 20 seconds).
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);

/// What a UDP payload received on port 4500 holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Udp4500<'a> {
    /// NAT keepalive: ignore.
    Keepalive,
    /// An IKE message, marker stripped.
    Ike(&'a [u8]),
    /// An ESP packet, starting at the SPI.
    Esp(&'a [u8]),
}

/// Classifies a UDP payload received on port 4500. Too short for any kind gives
/// [`EspError::Truncated`].
pub fn classify_udp_4500(payload: &[u8]) -> Result<Udp4500<'_>, EspError> {
    if payload == NAT_KEEPALIVE {
        return Ok(Udp4500::Keepalive);
    }
    match payload.split_first_chunk::<4>() {
        Some((marker, ike)) if *marker == NON_ESP_MARKER => Ok(Udp4500::Ike(ike)),
        // An ESP packet carries at least SPI and sequence number.
        _ if payload.len() >= 8 => Ok(Udp4500::Esp(payload)),
        _ => Err(EspError::Truncated { len: payload.len() }),
    }
}

/// Writes the non-ESP marker in front of an IKE message: `buf[..4]` gets the marker, the IKE
/// message must follow at `buf[4..]`. Returns the length of the marker.
pub fn write_non_esp_marker(buf: &mut [u8]) -> Result<usize, EspError> {
    let have = buf.len();
    let m = buf
        .first_chunk_mut::<4>()
        .ok_or(EspError::BufferTooSmall { needed: 4, have })?;
    *m = NON_ESP_MARKER;
    Ok(NON_ESP_MARKER.len())
}

/// A UDP header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpHeader {
    pub src_port: u16,
    pub dst_port: u16,
    /// Header plus payload, as on the wire.
    pub length: u16,
    pub checksum: u16,
}

/// Writes a UDP header into `buf[..8]` for a payload of `payload_len` bytes, with checksum 0:
/// RFC 3948 §2.1 lets IPv4 senders of ESP-in-UDP leave it zero, ESP's ICV protects the content.
/// (IPv6 needs a real checksum; let the kernel's UDP socket build that header.)
pub fn write_udp_header(
    buf: &mut [u8],
    src_port: u16,
    dst_port: u16,
    payload_len: usize,
) -> Result<(), EspError> {
    let have = buf.len();
    let total = payload_len
        .checked_add(UDP_HEADER_LEN)
        .and_then(|t| u16::try_from(t).ok())
        .ok_or(EspError::BufferTooSmall {
            needed: payload_len.saturating_add(UDP_HEADER_LEN),
            have: usize::from(u16::MAX),
        })?;
    let h = buf
        .first_chunk_mut::<UDP_HEADER_LEN>()
        .ok_or(EspError::BufferTooSmall {
            needed: UDP_HEADER_LEN,
            have,
        })?;
    let [s, d, l] = [src_port, dst_port, total].map(u16::to_be_bytes);
    *h = [s[0], s[1], d[0], d[1], l[0], l[1], 0, 0];
    Ok(())
}

/// Parses a UDP datagram (header and payload). The payload is cut to the header's length;
/// a length field below 8 or beyond the buffer is [`EspError::Truncated`].
pub fn parse_udp(datagram: &[u8]) -> Result<(UdpHeader, &[u8]), EspError> {
    let len = datagram.len();
    let (h, rest) = datagram
        .split_first_chunk::<UDP_HEADER_LEN>()
        .ok_or(EspError::Truncated { len })?;
    let [s0, s1, d0, d1, l0, l1, c0, c1] = *h;
    let hdr = UdpHeader {
        src_port: u16::from_be_bytes([s0, s1]),
        dst_port: u16::from_be_bytes([d0, d1]),
        length: u16::from_be_bytes([l0, l1]),
        checksum: u16::from_be_bytes([c0, c1]),
    };
    let payload = usize::from(hdr.length)
        .checked_sub(UDP_HEADER_LEN)
        .and_then(|n| rest.get(..n))
        .ok_or(EspError::Truncated { len })?;
    Ok((hdr, payload))
}

/// When to send NAT keepalives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatKeepaliveConfig {
    pub interval: Duration,
    /// Send keepalives even if IKE detected no NAT (configuration `force_encap`-style).
    pub force: bool,
}

impl Default for NatKeepaliveConfig {
    fn default() -> Self {
        NatKeepaliveConfig {
            interval: DEFAULT_KEEPALIVE_INTERVAL,
            force: false,
        }
    }
}

/// Sans-IO NAT keepalive timer for one peer. Active when NAT was detected (by IKE's
/// NAT_DETECTION payloads) or forced by configuration. A keepalive is due when nothing was sent
/// to the peer for one interval: any packet refreshes the NAT mapping just as well.
#[derive(Clone, Debug)]
pub struct NatKeepalive {
    interval: Duration,
    force: bool,
    nat_detected: bool,
    last_sent: Instant,
}

impl NatKeepalive {
    pub fn new(now: Instant, config: NatKeepaliveConfig) -> Result<Self, ConfigError> {
        if config.interval < Duration::from_secs(1) {
            return Err(ConfigError::KeepaliveInterval);
        }
        Ok(NatKeepalive {
            interval: config.interval,
            force: config.force,
            nat_detected: false,
            last_sent: now,
        })
    }

    /// IKE's NAT detection result (either side behind NAT).
    pub fn set_nat_detected(&mut self, now: Instant, detected: bool) {
        if detected && !self.is_active() {
            self.last_sent = now;
        }
        self.nat_detected = detected;
    }

    pub fn is_active(&self) -> bool {
        self.nat_detected || self.force
    }

    /// Any packet (ESP, IKE or keepalive) was sent to the peer on port 4500.
    pub fn on_packet_sent(&mut self, now: Instant) {
        self.last_sent = self.last_sent.max(now);
    }

    /// When the next keepalive is due, if active.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.is_active() {
            self.last_sent.checked_add(self.interval)
        } else {
            None
        }
    }

    /// Returns `true` when a keepalive ([`NAT_KEEPALIVE`]) must be sent now; it then counts as
    /// sent.
    pub fn handle_timeout(&mut self, now: Instant) -> bool {
        match self.poll_timeout() {
            Some(due) if now >= due => {
                self.last_sent = now;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify() {
        assert_eq!(classify_udp_4500(&[0xFF]), Ok(Udp4500::Keepalive));
        assert_eq!(
            classify_udp_4500(&[0, 0, 0, 0, 1, 2, 3]),
            Ok(Udp4500::Ike(&[1, 2, 3][..]))
        );
        let esp = [0, 0, 0x10, 0x01, 0, 0, 0, 1, 9, 9];
        assert_eq!(classify_udp_4500(&esp), Ok(Udp4500::Esp(&esp[..])));
        assert_eq!(
            classify_udp_4500(&[0, 0, 1]),
            Err(EspError::Truncated { len: 3 })
        );
        assert_eq!(
            classify_udp_4500(&[1, 2, 3, 4, 5]),
            Err(EspError::Truncated { len: 5 })
        );
        assert_eq!(classify_udp_4500(&[]), Err(EspError::Truncated { len: 0 }));
    }

    #[test]
    fn udp_header_roundtrip() {
        let mut b = [0u8; 8 + 5];
        write_udp_header(&mut b, 4500, 4500, 5).unwrap();
        assert_eq!(&b[..8], &[0x11, 0x94, 0x11, 0x94, 0, 13, 0, 0]);
        b[8..].copy_from_slice(&[1, 2, 3, 4, 5]);
        let (h, p) = parse_udp(&b).unwrap();
        assert_eq!(
            (h.src_port, h.dst_port, h.length, h.checksum),
            (4500, 4500, 13, 0)
        );
        assert_eq!(p, &[1, 2, 3, 4, 5]);
        // Length field beyond the buffer, or below the header size.
        b[5] = 14;
        assert!(parse_udp(&b).is_err());
        b[5] = 7;
        assert!(parse_udp(&b).is_err());
        assert!(write_udp_header(&mut b, 1, 2, 70000).is_err());
        assert!(write_udp_header(&mut b[..7], 1, 2, 0).is_err());
        let mut m = [9u8; 6];
        assert_eq!(write_non_esp_marker(&mut m), Ok(4));
        assert_eq!(m, [0, 0, 0, 0, 9, 9]);
    }

    #[test]
    fn keepalive_timer() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut k = NatKeepalive::new(t0, NatKeepaliveConfig::default()).unwrap();
        assert_eq!(k.poll_timeout(), None);
        assert!(!k.handle_timeout(t0 + 100 * s));
        k.set_nat_detected(t0 + 100 * s, true);
        assert_eq!(k.poll_timeout(), Some(t0 + 120 * s));
        assert!(!k.handle_timeout(t0 + 119 * s));
        // Traffic postpones the keepalive.
        k.on_packet_sent(t0 + 110 * s);
        assert!(!k.handle_timeout(t0 + 120 * s));
        assert!(k.handle_timeout(t0 + 130 * s));
        assert_eq!(k.poll_timeout(), Some(t0 + 150 * s));
        k.set_nat_detected(t0 + 131 * s, false);
        assert_eq!(k.poll_timeout(), None);

        let forced = NatKeepalive::new(
            t0,
            NatKeepaliveConfig {
                interval: 5 * s,
                force: true,
            },
        )
        .unwrap();
        assert_eq!(forced.poll_timeout(), Some(t0 + 5 * s));
        assert!(
            NatKeepalive::new(
                t0,
                NatKeepaliveConfig {
                    interval: Duration::ZERO,
                    force: true
                }
            )
            .is_err()
        );
    }
}
