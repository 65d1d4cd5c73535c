//! NHRP (RFC 2332) as used by DMVPN, with the Cisco extensions (Traffic Indication, NAT address
//! extension, cleartext authentication).
//!
//! - [`wire`]: the total codec. Any byte string decodes to a [`wire::Packet`] or a typed
//!   [`wire::DecodeError`]; encoding computes lengths, offsets and the checksum.
//! - [`engine`]: the sans-IO protocol engine. It owns no sockets and reads no clock: packets,
//!   time and commands go in; packets to send, timer deadlines and events come out.

pub mod engine;
pub mod wire;
