//! Error types.

use crate::lifetime::LimitKind;
use crate::suite::Suite;

/// Why a packet was not sealed or opened. Every variant is also counted (see
/// [`crate::InboundCounters`], [`crate::OutboundCounters`], [`crate::Totals`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EspError {
    /// The packet is shorter than the smallest ESP packet of this suite (header, IV, pad length,
    /// next header and ICV), or too short to carry an SPI.
    #[error("ESP packet truncated: {len} bytes")]
    Truncated { len: usize },
    /// No inbound SA has this SPI (or the packet went to an SA with another SPI).
    #[error("no inbound SA with SPI {spi:#010x}")]
    UnknownSpi { spi: u32 },
    /// The packet authenticated but its pad length or padding bytes are invalid (RFC 4303 §2.4).
    #[error("ESP padding invalid")]
    BadPadding,
    /// ICV check failed: wrong key, tampered or corrupted packet.
    #[error("ESP authentication failed")]
    AuthFailed,
    /// This sequence number was already received (inside the anti-replay window).
    #[error("ESP sequence number {seq} replayed")]
    Replayed { seq: u64 },
    /// This sequence number is older than the anti-replay window (or is 0).
    #[error("ESP sequence number {seq} is older than the anti-replay window")]
    TooOld { seq: u64 },
    /// The SA reached a hard lifetime limit; the IKE layer must rekey or delete it.
    #[error("SA lifetime expired ({limit})")]
    LifetimeExpired { limit: LimitKind },
    /// The caller's buffer cannot hold the sealed packet.
    #[error("buffer too small for the ESP packet: need {needed} bytes, have {have}")]
    BufferTooSmall { needed: usize, have: usize },
    /// No outbound SA is installed for this peer (SA database only).
    #[error("no outbound SA for this peer")]
    NoOutboundSa,
}

impl EspError {
    /// A short stable label, e.g. for a metrics `reason` label.
    pub const fn reason(&self) -> &'static str {
        match self {
            EspError::Truncated { .. } => "truncated",
            EspError::UnknownSpi { .. } => "unknown_spi",
            EspError::BadPadding => "bad_padding",
            EspError::AuthFailed => "auth_failed",
            EspError::Replayed { .. } => "replayed",
            EspError::TooOld { .. } => "too_old",
            EspError::LifetimeExpired { .. } => "lifetime_expired",
            EspError::BufferTooSmall { .. } => "buffer_too_small",
            EspError::NoOutboundSa => "no_outbound_sa",
        }
    }
}

/// Invalid SA parameters or database operations (from IKE or configuration, not from packets).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "key material for {suite} must be {expected} bytes (key + 4-byte salt), got {got}: take it from the IKEv2 KEYMAT with the negotiated key length"
    )]
    BadKeyLength {
        suite: Suite,
        expected: usize,
        got: usize,
    },
    #[error("SPI {spi:#x} is reserved (RFC 4303 §2.1: 0..=255); allocate an SPI of 256 or more")]
    ReservedSpi { spi: u32 },
    #[error("replay window {got} out of range: use {min}..={max} packets")]
    ReplayWindow { got: u32, min: u32, max: u32 },
    #[error(
        "soft {limit} lifetime must be below the hard one (soft {soft}, hard {hard}): the soft limit triggers the rekey before the hard limit stops traffic"
    )]
    SoftNotBeforeHard {
        limit: LimitKind,
        soft: u64,
        hard: u64,
    },
    #[error("{limit} lifetime must not be zero")]
    ZeroLifetime { limit: LimitKind },
    #[error("inbound SPI {spi:#010x} is already installed; allocate a fresh SPI")]
    SpiInUse { spi: u32 },
    #[error(
        "peer already has {max} inbound SAs; delete the old SA of a finished rekey before installing another"
    )]
    TooManyInbound { max: usize },
    #[error("NAT keepalive interval must be at least 1 second")]
    KeepaliveInterval,
}
