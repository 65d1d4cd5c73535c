//! NHRP wire format (RFC 2332 §5, Cisco DMVPN extensions).
//!
//! Layout: 20-byte fixed header, then the mandatory part (or the Error Indication body), then
//! the extensions (`ar$extoff`). Addresses are carried as `Option<IpAddr>`: a zero length
//! decodes to `None`; lengths other than 0, 4 and 16 are a typed error.

use std::net::IpAddr;

/// GRE protocol type that carries NHRP (no IP header inside the GRE payload).
pub const GRE_PROTO_NHRP: u16 = 0x2001;
/// IANA address family number for IPv4 NBMA addresses.
pub const AFN_IPV4: u16 = 1;
/// IANA address family number for IPv6 NBMA addresses.
pub const AFN_IPV6: u16 = 2;
/// Ethertype of IPv4, the protocol type of an IPv4 overlay.
pub const PROTO_IPV4: u16 = 0x0800;
/// Ethertype of IPv6.
pub const PROTO_IPV6: u16 = 0x86DD;
pub const FIXED_HEADER_LEN: usize = 20;

/// ar$op.type
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Op {
    ResolutionRequest = 1,
    ResolutionReply = 2,
    RegistrationRequest = 3,
    RegistrationReply = 4,
    PurgeRequest = 5,
    PurgeReply = 6,
    ErrorIndication = 7,
    /// Cisco Traffic Indication (redirect), DMVPN phase 3.
    TrafficIndication = 8,
}

/// Flags of the mandatory part; their meaning depends on the packet type.
pub mod flags {
    // Resolution Request / Reply
    pub const RES_Q: u16 = 0x8000;
    pub const RES_A: u16 = 0x4000;
    pub const RES_D: u16 = 0x2000;
    pub const RES_U: u16 = 0x1000;
    pub const RES_S: u16 = 0x0800;
    // Registration
    pub const REG_U: u16 = 0x8000;
    // Purge: no reply expected
    pub const PURGE_N: u16 = 0x8000;
    /// Cisco: sender is NAT-capable (all types)
    pub const CISCO_NAT: u16 = 0x0002;
}

/// CIE codes (RFC 2332 §5.2.0.1 and the per-type sections).
pub mod cie_code {
    pub const SUCCESS: u8 = 0;
    pub const ADMIN_PROHIBITED: u8 = 4;
    pub const INSUFFICIENT_RESOURCES: u8 = 5;
    pub const NO_BINDING: u8 = 11;
    pub const BINDING_NOT_UNIQUE: u8 = 13;
    pub const UNIQUE_ALREADY_REGISTERED: u8 = 14;
}

/// Error Indication codes (RFC 2332 §5.2.7). Loop detected is 3 (FRR and OpenNHRP use 2).
pub mod error_code {
    pub const UNRECOGNIZED_EXTENSION: u16 = 1;
    pub const LOOP_DETECTED: u16 = 3;
    pub const PROTOCOL_ADDRESS_UNREACHABLE: u16 = 6;
    pub const PROTOCOL_ERROR: u16 = 7;
    pub const SDU_SIZE_EXCEEDED: u16 = 8;
    pub const INVALID_EXTENSION: u16 = 9;
    pub const INVALID_RESOLUTION_REPLY: u16 = 10;
    pub const AUTHENTICATION_FAILURE: u16 = 11;
    pub const HOP_COUNT_EXCEEDED: u16 = 15;
}

/// Extension type numbers (low 14 bits of the type word).
pub mod ext_type {
    pub const END: u16 = 0;
    pub const RESPONDER_ADDRESS: u16 = 3;
    pub const FORWARD_TRANSIT_NHS: u16 = 4;
    pub const REVERSE_TRANSIT_NHS: u16 = 5;
    pub const AUTHENTICATION: u16 = 7;
    pub const VENDOR_PRIVATE: u16 = 8;
    pub const CISCO_NAT_ADDRESS: u16 = 9;
    /// Compulsory bit of the type word.
    pub const COMPULSORY: u16 = 0x8000;
}

/// The fixed header minus the fields the encoder computes (pktsz, chksum, extoff).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// ar$afn: NBMA address family (1 = IPv4).
    pub afn: u16,
    /// ar$pro.type: overlay protocol (0x0800 = IPv4).
    pub pro_type: u16,
    /// ar$pro.snap, only meaningful when pro_type is 0x0080.
    pub pro_snap: [u8; 5],
    /// ar$hopcnt. Never 0 on Registration and Traffic Indication (Cisco drops those).
    pub hop_count: u8,
    /// ar$op.version, 1.
    pub version: u8,
    pub op: Op,
}

/// Client Information Entry (RFC 2332 §5.2.0.1).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Cie {
    pub code: u8,
    /// 0xFF on a unique registration (RFC §5.2.1).
    pub prefix_len: u8,
    /// The 2 reserved bytes, kept so that a decoded packet re-encodes byte-identical.
    pub unused: u16,
    pub mtu: u16,
    pub holding_time: u16,
    pub preference: u8,
    pub client_nbma: Option<IpAddr>,
    /// Client NBMA subaddress: raw bytes (empty for IP NBMA).
    pub client_nbma_sub: Vec<u8>,
    pub client_proto: Option<IpAddr>,
}

/// Mandatory part of types 1-6 and 8.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mandatory {
    pub flags: u16,
    /// For Traffic Indication this is 0 (Cisco: "traffic code: redirect(0)" lives in `flags`).
    pub request_id: u32,
    pub src_nbma: Option<IpAddr>,
    /// Source NBMA subaddress: raw bytes (empty for IP NBMA).
    pub src_nbma_sub: Vec<u8>,
    pub src_proto: Option<IpAddr>,
    pub dst_proto: Option<IpAddr>,
    /// CIEs for types 1-6. Empty for Traffic Indication.
    pub cies: Vec<Cie>,
    /// Traffic Indication only: the leading bytes of the redirected data packet.
    pub payload: Vec<u8>,
}

/// Error Indication body (RFC 2332 §5.2.7). No extensions are allowed after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorIndication {
    pub unused: u16,
    pub code: u16,
    /// Offset in the offending packet of the field that caused the error.
    pub offset: u16,
    pub src_nbma: Option<IpAddr>,
    pub src_nbma_sub: Vec<u8>,
    pub src_proto: Option<IpAddr>,
    pub dst_proto: Option<IpAddr>,
    /// The offending NHRP packet (its leading bytes).
    pub offending: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Mandatory(Mandatory),
    Error(ErrorIndication),
}

/// Cisco cleartext authentication (`type = 1` then the password, at most 8 bytes, no padding),
/// or any other authentication form kept as raw bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authentication {
    CiscoCleartext(Vec<u8>),
    Other(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtensionBody {
    /// Type 0. Always last; FRR writes it with the compulsory bit set.
    End,
    /// Type 3: empty in requests, one CIE in replies.
    ResponderAddress(Option<Cie>),
    /// Type 4: one CIE per NHS crossed on the way to the responder.
    ForwardTransitNhs(Vec<Cie>),
    /// Type 5: one CIE per NHS crossed on the way back.
    ReverseTransitNhs(Vec<Cie>),
    /// Type 7.
    Authentication(Authentication),
    /// Type 8: OUI then data.
    VendorPrivate { oui: [u8; 3], data: Vec<u8> },
    /// Type 9 (Cisco): list of CIEs carrying NAT-observed NBMA addresses.
    CiscoNatAddress(Vec<Cie>),
    /// Any other type, kept verbatim.
    Unknown { ty: u16, data: Vec<u8> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    pub compulsory: bool,
    pub body: ExtensionBody,
}

/// A whole NHRP packet. `extensions` is in wire order and, when non-empty, normally ends with
/// [`ExtensionBody::End`]; the encoder appends a compulsory End when it is missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub header: Header,
    pub body: Body,
    pub extensions: Vec<Extension>,
}

/// Why a byte string is not a valid NHRP packet. Every variant names the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("packet too short: {field} needs {needed} bytes at offset {offset}, {available} available")]
    Truncated { field: &'static str, offset: usize, needed: usize, available: usize },
    #[error("ar$pktsz {pktsz} does not match the {available} bytes received")]
    BadLength { pktsz: usize, available: usize },
    #[error("bad checksum: packet carries {carried:#06x}, computed {computed:#06x}")]
    BadChecksum { carried: u16, computed: u16 },
    #[error("unsupported ar$op.version {0}")]
    BadVersion(u8),
    #[error("unknown ar$op.type {0}")]
    UnknownOp(u8),
    #[error("ar$extoff {extoff} invalid (packet size {pktsz})")]
    BadExtensionOffset { extoff: usize, pktsz: usize },
    #[error("{field}: address length {len} is neither 0, 4 nor 16")]
    BadAddressLength { field: &'static str, len: usize },
    #[error("{field}: E.164 addresses are not supported")]
    E164NotSupported { field: &'static str },
    #[error("extension type {ty:#06x} at offset {offset}: {reason}")]
    BadExtension { ty: u16, offset: usize, reason: &'static str },
    #[error("Error Indication must not carry extensions")]
    ExtensionsOnErrorIndication,
    #[error("extensions continue after the End extension")]
    DataAfterEnd,
}

/// Why a [`Packet`] cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("encoded packet would be {0} bytes, above the 65535 limit")]
    TooLong(usize),
    #[error("{0}")]
    Invalid(&'static str),
}
