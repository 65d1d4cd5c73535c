//! IKEv2 (RFC 7296) for DMVPN tunnels, sans-IO.
//!
//! [`Endpoint`] holds every IKE SA of a node. It owns no socket and reads no clock (except
//! the wall clock for certificate validity): the caller feeds it datagrams
//! ([`Endpoint::handle_datagram`]) and timeouts ([`Endpoint::handle_timeout`] once
//! [`Endpoint::poll_timeout`] has passed), issues commands ([`Endpoint::initiate`],
//! [`Endpoint::delete`], [`Endpoint::rekey_child`], [`Endpoint::rekey_ike`]) and drains
//! [`Endpoint::poll_transmit`] and [`Endpoint::poll_event`] after each call.
//!
//! Supported: IKE_SA_INIT with X25519 and P-256, AES-GCM/ChaCha20-Poly1305 SK payloads,
//! HMAC-SHA-256/384 PRF, NAT detection and the move to port 4500, cookies when half-open
//! SAs pile up, IKE fragmentation (RFC 7383), IKE_AUTH with a PSK or with certificates
//! (RFC 7427 ECDSA P-256/SHA-256 and Ed25519, chained to a configured CA), one CHILD SA per
//! IKE SA in transport mode for GRE between the NBMA addresses (keys in [`ChildSaKeys`] for
//! `dmvpn_esp`), INFORMATIONAL delete and liveness, retransmission with backoff, and
//! CREATE_CHILD_SA rekeying.
//!
//! ```
//! use std::time::Instant;
//! use dmvpn_ike::{AuthConfig, Config, Endpoint, Event};
//! use zeroize::Zeroizing;
//!
//! let psk = || AuthConfig::Psk(Zeroizing::new(b"a long shared secret".to_vec()));
//! let now = Instant::now();
//! let mut hub = Endpoint::new(Config::new("198.51.100.1".parse()?, psk()), now)?;
//! let mut spoke = Endpoint::new(Config::new("198.51.100.2".parse()?, psk()), now)?;
//! spoke.initiate(now, "198.51.100.1".parse()?)?;
//! // The caller's UDP sockets stand between the two; here they are wired directly.
//! for _ in 0..4 {
//!     while let Some(t) = spoke.poll_transmit() {
//!         hub.handle_datagram(now, t.src, t.dst, &t.payload);
//!     }
//!     while let Some(t) = hub.poll_transmit() {
//!         spoke.handle_datagram(now, t.src, t.dst, &t.payload);
//!     }
//! }
//! let mut up = false;
//! while let Some(ev) = spoke.poll_event() {
//!     if let Event::ChildSaUp { keys, .. } = ev {
//!         // Hand the keys to dmvpn_esp: keys.inbound()?, keys.outbound()?
//!         let _outbound = keys.outbound()?.into_outbound(now)?;
//!         up = true;
//!     }
//! }
//! assert!(up);
//! # Ok::<(), Box<dyn std::error::Error>>(())
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

pub mod auth;
mod config;
pub mod crypto;
mod endpoint;
pub mod wire;

pub use auth::{CredentialError, Identity};
pub use config::{AuthConfig, ChildMode, Config, ConfigError};
pub use crypto::{DhGroup, Encr, Prf};
pub use endpoint::{
    ChildSaInfo, ChildSaKeys, CommandError, Endpoint, Event, FailReason, IKE_PORT, IkeSaInfo,
    IkeSaState, NAT_T_PORT, Stats, Transmit,
};
