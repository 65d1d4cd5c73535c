//! ESP (RFC 4303) for DMVPN tunnels, sans-IO.
//!
//! Transport mode only: the payload is the GRE packet (next header 47) exchanged between the
//! two NBMA addresses. AEAD suites: AES-GCM with a 16-byte ICV (RFC 4106, 128- and 256-bit
//! keys) and ChaCha20-Poly1305 (RFC 7634), all from aws-lc-rs. Extended sequence numbers
//! (RFC 4303 §2.2.1), an anti-replay bitmap with ESN inference (RFC 4303 Appendix A2),
//! lifetimes in time, bytes and packets, and UDP encapsulation for NAT traversal (RFC 3948).
//!
//! Nothing here owns a socket or reads a clock: time comes in as [`std::time::Instant`].
//! Sealing and opening work in place on caller-provided buffers, so the data path does not
//! allocate per packet.
//!
//! ```
//! use std::time::Instant;
//! use dmvpn_esp::{SecurityAssociation, Suite, ESP_HEADROOM, sealed_len};
//!
//! let now = Instant::now();
//! let keymat = [7u8; 36]; // 32-byte key + 4-byte salt, from IKEv2 KEYMAT
//! let params = SecurityAssociation::new(0x1000, Suite::Aes256Gcm, &keymat).unwrap();
//! let mut tx = params.clone().into_outbound(now).unwrap();
//! let mut rx = params.into_inbound(now).unwrap();
//!
//! let gre = b"GRE packet bytes";
//! let mut buf = vec![0u8; sealed_len(gre.len())];
//! buf[ESP_HEADROOM..ESP_HEADROOM + gre.len()].copy_from_slice(gre);
//! let len = tx.seal_in_place(now, 47, &mut buf, gre.len()).unwrap();
//! let opened = rx.open_in_place(now, &mut buf[..len]).unwrap();
//! assert_eq!(opened.next_header, 47);
//! assert_eq!(&buf[opened.payload], gre);
//! ```
#![cfg_attr(
    not(test),
    deny(
        clippy::indexing_slicing,
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic
    )
)]

mod db;
mod error;
mod lifetime;
mod replay;
mod sa;
mod suite;
pub mod udp;

pub use db::{Direction, MAX_INBOUND_PER_PEER, OpenedFrom, SaDatabase, SaEvent, Totals};
pub use error::{ConfigError, EspError};
pub use lifetime::{Lifetime, LimitKind, SaSignal};
pub use replay::{DEFAULT_REPLAY_WINDOW, MAX_REPLAY_WINDOW, MIN_REPLAY_WINDOW};
pub use sa::{
    ESP_HEADER_LEN, ESP_HEADROOM, ESP_MAX_TAILROOM, ICV_LEN, IV_LEN, InboundCounters, InboundSa,
    NEXT_HEADER_GRE, NEXT_HEADER_NONE, Opened, OutboundCounters, OutboundSa, SecurityAssociation,
    peek_spi, sealed_len,
};
pub use suite::{SALT_LEN, Suite};
