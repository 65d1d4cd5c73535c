//! IKEv2 wire format (RFC 7296 §3, RFC 7383 for SKF): header and payloads.
//!
//! Decoding is total: every length is checked against the input, every error is a
//! [`DecodeError`], and nothing is allocated beyond what the input itself holds.
//! Encrypted payloads (SK, SKF) stay opaque here; `crate::crypto` opens and seals them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Length of the fixed IKE header.
pub const HEADER_LEN: usize = 28;
/// Length of a generic payload header.
pub const GENERIC_LEN: usize = 4;
/// IKE major version 2, minor 0.
pub const VERSION_2: u8 = 0x20;

/// Header flag: the sender is the original initiator of the IKE SA.
pub const FLAG_INITIATOR: u8 = 0x08;
/// Header flag: the sender could speak a higher major version.
pub const FLAG_VERSION: u8 = 0x10;
/// Header flag: this message is a response.
pub const FLAG_RESPONSE: u8 = 0x20;

/// Exchange types (RFC 7296 §3.1).
pub mod exchange {
    pub const IKE_SA_INIT: u8 = 34;
    pub const IKE_AUTH: u8 = 35;
    pub const CREATE_CHILD_SA: u8 = 36;
    pub const INFORMATIONAL: u8 = 37;
}

/// Payload type numbers (RFC 7296 §3.2, RFC 7383).
pub mod payload_type {
    pub const NONE: u8 = 0;
    pub const SA: u8 = 33;
    pub const KE: u8 = 34;
    pub const IDI: u8 = 35;
    pub const IDR: u8 = 36;
    pub const CERT: u8 = 37;
    pub const CERTREQ: u8 = 38;
    pub const AUTH: u8 = 39;
    pub const NONCE: u8 = 40;
    pub const NOTIFY: u8 = 41;
    pub const DELETE: u8 = 42;
    pub const VENDOR_ID: u8 = 43;
    pub const TSI: u8 = 44;
    pub const TSR: u8 = 45;
    pub const SK: u8 = 46;
    pub const SKF: u8 = 53;
}

/// Security protocol identifiers used in proposals, notifies and deletes.
pub mod protocol {
    pub const IKE: u8 = 1;
    pub const AH: u8 = 2;
    pub const ESP: u8 = 3;
}

/// Transform types and the IDs this implementation knows (IANA IKEv2 registries).
pub mod transform {
    pub const ENCR: u8 = 1;
    pub const PRF: u8 = 2;
    pub const INTEG: u8 = 3;
    pub const DH: u8 = 4;
    pub const ESN: u8 = 5;

    pub const ENCR_AES_CBC: u16 = 12;
    pub const ENCR_AES_GCM_16: u16 = 20;
    pub const ENCR_CHACHA20_POLY1305: u16 = 28;
    pub const PRF_HMAC_SHA2_256: u16 = 5;
    pub const PRF_HMAC_SHA2_384: u16 = 6;
    pub const DH_P256: u16 = 19;
    pub const DH_X25519: u16 = 31;
    pub const ESN_NO: u16 = 0;
    pub const ESN_YES: u16 = 1;

    /// Transform attribute "Key Length" (TV format).
    pub const ATTR_KEY_LENGTH: u16 = 14;
}

/// Notify message types (RFC 7296 §3.10.1 and later RFCs).
pub mod notify {
    pub const UNSUPPORTED_CRITICAL_PAYLOAD: u16 = 1;
    pub const INVALID_IKE_SPI: u16 = 4;
    pub const INVALID_MAJOR_VERSION: u16 = 5;
    pub const INVALID_SYNTAX: u16 = 7;
    pub const INVALID_MESSAGE_ID: u16 = 9;
    pub const INVALID_SPI: u16 = 11;
    pub const NO_PROPOSAL_CHOSEN: u16 = 14;
    pub const INVALID_KE_PAYLOAD: u16 = 17;
    pub const AUTHENTICATION_FAILED: u16 = 24;
    pub const SINGLE_PAIR_REQUIRED: u16 = 34;
    pub const NO_ADDITIONAL_SAS: u16 = 35;
    pub const INTERNAL_ADDRESS_FAILURE: u16 = 36;
    pub const FAILED_CP_REQUIRED: u16 = 37;
    pub const TS_UNACCEPTABLE: u16 = 38;
    pub const INVALID_SELECTORS: u16 = 39;
    pub const TEMPORARY_FAILURE: u16 = 43;
    pub const CHILD_SA_NOT_FOUND: u16 = 44;

    pub const INITIAL_CONTACT: u16 = 16384;
    pub const SET_WINDOW_SIZE: u16 = 16385;
    pub const NAT_DETECTION_SOURCE_IP: u16 = 16388;
    pub const NAT_DETECTION_DESTINATION_IP: u16 = 16389;
    pub const COOKIE: u16 = 16390;
    pub const USE_TRANSPORT_MODE: u16 = 16391;
    pub const REKEY_SA: u16 = 16393;
    pub const ESP_TFC_PADDING_NOT_SUPPORTED: u16 = 16394;
    pub const NON_FIRST_FRAGMENTS_ALSO: u16 = 16395;
    pub const MOBIKE_SUPPORTED: u16 = 16396;
    pub const MULTIPLE_AUTH_SUPPORTED: u16 = 16404;
    pub const IKEV2_FRAGMENTATION_SUPPORTED: u16 = 16430;
    pub const SIGNATURE_HASH_ALGORITHMS: u16 = 16431;

    /// Types below this value are errors (RFC 7296 §3.10.1).
    pub const FIRST_STATUS: u16 = 16384;
}

/// ID types (RFC 7296 §3.5).
pub mod id_type {
    pub const IPV4_ADDR: u8 = 1;
    pub const FQDN: u8 = 2;
    pub const RFC822_ADDR: u8 = 3;
    pub const IPV6_ADDR: u8 = 5;
    pub const DER_ASN1_DN: u8 = 9;
    pub const KEY_ID: u8 = 11;
}

/// AUTH methods (RFC 7296 §3.8, RFC 7427).
pub mod auth_method {
    pub const SHARED_KEY_MIC: u8 = 2;
    pub const DIGITAL_SIGNATURE: u8 = 14;
}

/// Certificate encodings (RFC 7296 §3.6).
pub mod cert_encoding {
    pub const X509_SIGNATURE: u8 = 4;
}

/// Traffic selector types.
pub mod ts_type {
    pub const IPV4_ADDR_RANGE: u8 = 7;
    pub const IPV6_ADDR_RANGE: u8 = 8;
}

/// Why a datagram could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("message shorter than the IKE header ({0} bytes)")]
    ShortHeader(usize),
    #[error("IKE header length {header} does not match the datagram length {actual}")]
    LengthMismatch { header: u32, actual: usize },
    #[error("unsupported IKE major version {0:#x}")]
    Version(u8),
    #[error("payload {kind} truncated: needs {needed} bytes, {available} left")]
    Truncated {
        kind: u8,
        needed: usize,
        available: usize,
    },
    #[error("payload {kind} has length {length}, below its minimum {min}")]
    PayloadTooShort { kind: u8, length: usize, min: usize },
    #[error("malformed payload {kind}: {what}")]
    Malformed { kind: u8, what: &'static str },
    #[error("encrypted payload {0} is not the last payload")]
    EncryptedNotLast(u8),
}

/// The fixed IKE header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub spi_i: u64,
    pub spi_r: u64,
    pub next_payload: u8,
    pub version: u8,
    pub exchange: u8,
    pub flags: u8,
    pub message_id: u32,
    pub length: u32,
}

impl Header {
    pub fn is_response(&self) -> bool {
        self.flags & FLAG_RESPONSE != 0
    }
    pub fn is_initiator(&self) -> bool {
        self.flags & FLAG_INITIATOR != 0
    }

    /// Decodes only the header and checks the length and version: enough to route the
    /// datagram to an IKE SA before anything else is parsed.
    pub fn decode(bytes: &[u8]) -> Result<Header, DecodeError> {
        let h: &[u8; HEADER_LEN] = bytes
            .first_chunk()
            .ok_or(DecodeError::ShortHeader(bytes.len()))?;
        let [
            i0,
            i1,
            i2,
            i3,
            i4,
            i5,
            i6,
            i7,
            r0,
            r1,
            r2,
            r3,
            r4,
            r5,
            r6,
            r7,
            next_payload,
            version,
            exchange,
            flags,
            m0,
            m1,
            m2,
            m3,
            l0,
            l1,
            l2,
            l3,
        ] = *h;
        let header = Header {
            spi_i: u64::from_be_bytes([i0, i1, i2, i3, i4, i5, i6, i7]),
            spi_r: u64::from_be_bytes([r0, r1, r2, r3, r4, r5, r6, r7]),
            next_payload,
            version,
            exchange,
            flags,
            message_id: u32::from_be_bytes([m0, m1, m2, m3]),
            length: u32::from_be_bytes([l0, l1, l2, l3]),
        };
        if header.version >> 4 != 2 {
            return Err(DecodeError::Version(header.version));
        }
        if header.length as usize != bytes.len() {
            return Err(DecodeError::LengthMismatch {
                header: header.length,
                actual: bytes.len(),
            });
        }
        Ok(header)
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.spi_i.to_be_bytes());
        out.extend_from_slice(&self.spi_r.to_be_bytes());
        out.push(self.next_payload);
        out.push(self.version);
        out.push(self.exchange);
        out.push(self.flags);
        out.extend_from_slice(&self.message_id.to_be_bytes());
        out.extend_from_slice(&self.length.to_be_bytes());
    }
}

/// A transform attribute: TV (short, 16-bit value) or TLV.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attribute {
    Tv { kind: u16, value: u16 },
    Tlv { kind: u16, value: Vec<u8> },
}

/// One transform of a proposal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transform {
    pub kind: u8,
    pub id: u16,
    pub attributes: Vec<Attribute>,
}

impl Transform {
    pub fn new(kind: u8, id: u16) -> Self {
        Transform {
            kind,
            id,
            attributes: Vec::new(),
        }
    }
    pub fn with_key_len(kind: u8, id: u16, bits: u16) -> Self {
        Transform {
            kind,
            id,
            attributes: vec![Attribute::Tv {
                kind: transform::ATTR_KEY_LENGTH,
                value: bits,
            }],
        }
    }
    /// The Key Length attribute in bits, if present.
    pub fn key_len(&self) -> Option<u16> {
        self.attributes.iter().find_map(|a| match a {
            Attribute::Tv { kind, value } if *kind == transform::ATTR_KEY_LENGTH => Some(*value),
            _ => None,
        })
    }
}

/// One proposal of an SA payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proposal {
    pub number: u8,
    pub protocol: u8,
    pub spi: Vec<u8>,
    pub transforms: Vec<Transform>,
}

/// An identification payload body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Id {
    pub id_type: u8,
    pub data: Vec<u8>,
}

/// A Notify payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notify {
    pub protocol: u8,
    pub spi: Vec<u8>,
    pub kind: u16,
    pub data: Vec<u8>,
}

impl Notify {
    pub fn status(kind: u16, data: Vec<u8>) -> Self {
        Notify {
            protocol: 0,
            spi: Vec::new(),
            kind,
            data,
        }
    }
}

/// A Delete payload: no SPIs for the IKE SA, 4-byte SPIs for ESP/AH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    pub protocol: u8,
    pub spi_size: u8,
    pub spis: Vec<Vec<u8>>,
}

/// A traffic selector (address range, protocol, port range).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrafficSelector {
    pub ip_protocol: u8,
    pub start_port: u16,
    pub end_port: u16,
    pub start_addr: IpAddr,
    pub end_addr: IpAddr,
}

impl TrafficSelector {
    /// Exactly one host and one IP protocol, all ports.
    pub fn host(addr: IpAddr, ip_protocol: u8) -> Self {
        TrafficSelector {
            ip_protocol,
            start_port: 0,
            end_port: 0xffff,
            start_addr: addr,
            end_addr: addr,
        }
    }

    /// Whether `self` contains `other` entirely (protocol 0 and full port ranges are wildcards).
    pub fn contains(&self, other: &TrafficSelector) -> bool {
        let proto_ok = self.ip_protocol == 0 || self.ip_protocol == other.ip_protocol;
        let ports_ok = self.start_port <= other.start_port && other.end_port <= self.end_port;
        let addrs_ok = match (
            self.start_addr,
            self.end_addr,
            other.start_addr,
            other.end_addr,
        ) {
            (IpAddr::V4(a), IpAddr::V4(b), IpAddr::V4(c), IpAddr::V4(d)) => a <= c && d <= b,
            (IpAddr::V6(a), IpAddr::V6(b), IpAddr::V6(c), IpAddr::V6(d)) => a <= c && d <= b,
            _ => false,
        };
        proto_ok && ports_ok && addrs_ok
    }
}

/// One decoded payload. SK and SKF bodies stay encrypted (IV, ciphertext, ICV).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    Sa(Vec<Proposal>),
    Ke {
        group: u16,
        data: Vec<u8>,
    },
    IdI(Id),
    IdR(Id),
    Cert {
        encoding: u8,
        data: Vec<u8>,
    },
    CertReq {
        encoding: u8,
        data: Vec<u8>,
    },
    Auth {
        method: u8,
        data: Vec<u8>,
    },
    Nonce(Vec<u8>),
    Notify(Notify),
    Delete(Delete),
    VendorId(Vec<u8>),
    TsI(Vec<TrafficSelector>),
    TsR(Vec<TrafficSelector>),
    /// `first_inner` is the type of the first payload inside the encrypted data.
    Sk {
        first_inner: u8,
        body: Vec<u8>,
    },
    Skf {
        first_inner: u8,
        number: u16,
        total: u16,
        body: Vec<u8>,
    },
    /// A payload this implementation does not interpret (kept so the sender's critical bit
    /// can be honoured).
    Unknown {
        kind: u8,
        critical: bool,
        data: Vec<u8>,
    },
}

impl Payload {
    pub fn kind(&self) -> u8 {
        use payload_type as t;
        match self {
            Payload::Sa(_) => t::SA,
            Payload::Ke { .. } => t::KE,
            Payload::IdI(_) => t::IDI,
            Payload::IdR(_) => t::IDR,
            Payload::Cert { .. } => t::CERT,
            Payload::CertReq { .. } => t::CERTREQ,
            Payload::Auth { .. } => t::AUTH,
            Payload::Nonce(_) => t::NONCE,
            Payload::Notify(_) => t::NOTIFY,
            Payload::Delete(_) => t::DELETE,
            Payload::VendorId(_) => t::VENDOR_ID,
            Payload::TsI(_) => t::TSI,
            Payload::TsR(_) => t::TSR,
            Payload::Sk { .. } => t::SK,
            Payload::Skf { .. } => t::SKF,
            Payload::Unknown { kind, .. } => *kind,
        }
    }
}

/// A whole IKE message: header and the outer payload chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub header: Header,
    pub payloads: Vec<Payload>,
}

impl Message {
    /// Decodes a datagram (without the non-ESP marker of port 4500).
    pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
        let header = Header::decode(bytes)?;
        let body = bytes.get(HEADER_LEN..).unwrap_or_default();
        let payloads = decode_chain(header.next_payload, body)?;
        Ok(Message { header, payloads })
    }

    /// Encodes the message; the header's `next_payload` and `length` are computed.
    pub fn encode(&self) -> Vec<u8> {
        let (first, body) = encode_chain(&self.payloads);
        let mut header = self.header;
        header.next_payload = first;
        header.length = u32::try_from(HEADER_LEN + body.len()).unwrap_or(u32::MAX);
        let mut out = Vec::with_capacity(HEADER_LEN + body.len());
        header.encode(&mut out);
        out.extend_from_slice(&body);
        out
    }

    pub fn notifies(&self) -> impl Iterator<Item = &Notify> {
        notifies(&self.payloads)
    }
}

/// The Notify payloads of a chain.
pub fn notifies(payloads: &[Payload]) -> impl Iterator<Item = &Notify> {
    payloads.iter().filter_map(|p| match p {
        Payload::Notify(n) => Some(n),
        _ => None,
    })
}

/// A cursor over a byte slice that never panics.
struct Reader<'a> {
    buf: &'a [u8],
    kind: u8,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], kind: u8) -> Self {
        Reader { buf, kind }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.buf.len() {
            return Err(DecodeError::Truncated {
                kind: self.kind,
                needed: n,
                available: self.buf.len(),
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        let b = self.take(1)?;
        Ok(b.first().copied().unwrap_or_default())
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(b.first_chunk::<2>()
            .map(|b| u16::from_be_bytes(*b))
            .unwrap_or_default())
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

fn malformed(kind: u8, what: &'static str) -> DecodeError {
    DecodeError::Malformed { kind, what }
}

/// Decodes a payload chain starting with type `first` (also used for SK plaintext).
pub fn decode_chain(first: u8, bytes: &[u8]) -> Result<Vec<Payload>, DecodeError> {
    let mut payloads = Vec::new();
    let mut next = first;
    let mut rd = Reader::new(bytes, first);
    while next != payload_type::NONE {
        let kind = next;
        rd.kind = kind;
        let hdr = rd.take(GENERIC_LEN)?;
        let [np, flags, l0, l1] = hdr else {
            return Err(malformed(kind, "generic header"));
        };
        let length = usize::from(u16::from_be_bytes([*l0, *l1]));
        if length < GENERIC_LEN {
            return Err(DecodeError::PayloadTooShort {
                kind,
                length,
                min: GENERIC_LEN,
            });
        }
        let body = rd.take(length - GENERIC_LEN)?;
        let critical = flags & 0x80 != 0;
        let payload = decode_payload(kind, *np, critical, body)?;
        let encrypted = matches!(payload, Payload::Sk { .. } | Payload::Skf { .. });
        payloads.push(payload);
        if encrypted {
            // The SK payload's "next payload" names the first inner payload, and it must be
            // the last one of the outer chain (RFC 7296 §3.14).
            if !rd.is_empty() {
                return Err(DecodeError::EncryptedNotLast(kind));
            }
            return Ok(payloads);
        }
        next = *np;
    }
    // Bytes after the last payload are not allowed: the header length covers only payloads.
    if !rd.is_empty() {
        return Err(malformed(first, "trailing bytes after the last payload"));
    }
    Ok(payloads)
}

fn decode_payload(kind: u8, np: u8, critical: bool, body: &[u8]) -> Result<Payload, DecodeError> {
    use payload_type as t;
    let mut rd = Reader::new(body, kind);
    let p = match kind {
        t::SA => Payload::Sa(decode_proposals(body)?),
        t::KE => {
            let group = rd.u16()?;
            rd.take(2)?;
            Payload::Ke {
                group,
                data: rd.rest().to_vec(),
            }
        }
        t::IDI | t::IDR => {
            let id_type = rd.u8()?;
            rd.take(3)?;
            let id = Id {
                id_type,
                data: rd.rest().to_vec(),
            };
            if kind == t::IDI {
                Payload::IdI(id)
            } else {
                Payload::IdR(id)
            }
        }
        t::CERT | t::CERTREQ => {
            let encoding = rd.u8()?;
            let data = rd.rest().to_vec();
            if kind == t::CERT {
                Payload::Cert { encoding, data }
            } else {
                Payload::CertReq { encoding, data }
            }
        }
        t::AUTH => {
            let method = rd.u8()?;
            rd.take(3)?;
            Payload::Auth {
                method,
                data: rd.rest().to_vec(),
            }
        }
        t::NONCE => Payload::Nonce(body.to_vec()),
        t::NOTIFY => {
            let protocol = rd.u8()?;
            let spi_size = rd.u8()?;
            let n_kind = rd.u16()?;
            let spi = rd.take(usize::from(spi_size))?.to_vec();
            Payload::Notify(Notify {
                protocol,
                spi,
                kind: n_kind,
                data: rd.rest().to_vec(),
            })
        }
        t::DELETE => {
            let protocol = rd.u8()?;
            let spi_size = rd.u8()?;
            let count = rd.u16()?;
            let mut spis = Vec::new();
            if spi_size == 0 && count != 0 {
                return Err(malformed(kind, "SPIs counted with SPI size 0"));
            }
            for _ in 0..count {
                spis.push(rd.take(usize::from(spi_size))?.to_vec());
            }
            if !rd.is_empty() {
                return Err(malformed(kind, "bytes after the counted SPIs"));
            }
            Payload::Delete(Delete {
                protocol,
                spi_size,
                spis,
            })
        }
        t::VENDOR_ID => Payload::VendorId(body.to_vec()),
        t::TSI | t::TSR => {
            let count = rd.u8()?;
            rd.take(3)?;
            let mut sel = Vec::new();
            for _ in 0..count {
                sel.push(decode_ts(&mut rd)?);
            }
            if !rd.is_empty() {
                return Err(malformed(kind, "bytes after the counted selectors"));
            }
            if kind == t::TSI {
                Payload::TsI(sel)
            } else {
                Payload::TsR(sel)
            }
        }
        t::SK => Payload::Sk {
            first_inner: np,
            body: body.to_vec(),
        },
        t::SKF => {
            let number = rd.u16()?;
            let total = rd.u16()?;
            if number == 0 || number > total {
                return Err(malformed(kind, "fragment number outside 1..=total"));
            }
            Payload::Skf {
                first_inner: np,
                number,
                total,
                body: rd.rest().to_vec(),
            }
        }
        _ => Payload::Unknown {
            kind,
            critical,
            data: body.to_vec(),
        },
    };
    Ok(p)
}

fn decode_ts(rd: &mut Reader<'_>) -> Result<TrafficSelector, DecodeError> {
    let kind = rd.kind;
    let ts_type = rd.u8()?;
    let ip_protocol = rd.u8()?;
    let len = usize::from(rd.u16()?);
    let start_port = rd.u16()?;
    let end_port = rd.u16()?;
    let (start_addr, end_addr) = match (ts_type, len) {
        (ts_type::IPV4_ADDR_RANGE, 16) => {
            let a = rd.take(4)?;
            let b = rd.take(4)?;
            (ip4(a), ip4(b))
        }
        (ts_type::IPV6_ADDR_RANGE, 40) => {
            let a = rd.take(16)?;
            let b = rd.take(16)?;
            (ip6(a), ip6(b))
        }
        _ => return Err(malformed(kind, "traffic selector type/length")),
    };
    Ok(TrafficSelector {
        ip_protocol,
        start_port,
        end_port,
        start_addr,
        end_addr,
    })
}

fn ip4(b: &[u8]) -> IpAddr {
    let a: [u8; 4] = b.first_chunk().copied().unwrap_or_default();
    IpAddr::V4(Ipv4Addr::from(a))
}
fn ip6(b: &[u8]) -> IpAddr {
    let a: [u8; 16] = b.first_chunk().copied().unwrap_or_default();
    IpAddr::V6(Ipv6Addr::from(a))
}

fn decode_proposals(body: &[u8]) -> Result<Vec<Proposal>, DecodeError> {
    let kind = payload_type::SA;
    let mut rd = Reader::new(body, kind);
    let mut proposals = Vec::new();
    loop {
        let last = rd.u8()?;
        rd.take(1)?;
        let len = usize::from(rd.u16()?);
        if len < 8 {
            return Err(DecodeError::PayloadTooShort {
                kind,
                length: len,
                min: 8,
            });
        }
        let mut p = Reader::new(rd.take(len - 4)?, kind);
        let number = p.u8()?;
        let protocol = p.u8()?;
        let spi_size = p.u8()?;
        let count = p.u8()?;
        let spi = p.take(usize::from(spi_size))?.to_vec();
        let mut transforms = Vec::new();
        let mut more = count > 0;
        while more {
            let t_last = p.u8()?;
            p.take(1)?;
            let t_len = usize::from(p.u16()?);
            if t_len < 8 {
                return Err(DecodeError::PayloadTooShort {
                    kind,
                    length: t_len,
                    min: 8,
                });
            }
            let mut t = Reader::new(p.take(t_len - 4)?, kind);
            let t_kind = t.u8()?;
            t.take(1)?;
            let id = t.u16()?;
            let mut attributes = Vec::new();
            while !t.is_empty() {
                let af_type = t.u16()?;
                let a_kind = af_type & 0x7fff;
                if af_type & 0x8000 != 0 {
                    attributes.push(Attribute::Tv {
                        kind: a_kind,
                        value: t.u16()?,
                    });
                } else {
                    let a_len = usize::from(t.u16()?);
                    attributes.push(Attribute::Tlv {
                        kind: a_kind,
                        value: t.take(a_len)?.to_vec(),
                    });
                }
            }
            transforms.push(Transform {
                kind: t_kind,
                id,
                attributes,
            });
            match t_last {
                0 => more = false,
                3 => {}
                _ => return Err(malformed(kind, "transform substructure type")),
            }
        }
        if transforms.len() != usize::from(count) {
            return Err(malformed(kind, "transform count"));
        }
        if !p.is_empty() {
            return Err(malformed(kind, "bytes after the last transform"));
        }
        proposals.push(Proposal {
            number,
            protocol,
            spi,
            transforms,
        });
        match last {
            0 => break,
            2 => {}
            _ => return Err(malformed(kind, "proposal substructure type")),
        }
    }
    if !rd.is_empty() {
        return Err(malformed(kind, "bytes after the last proposal"));
    }
    Ok(proposals)
}

fn put_u16(out: &mut Vec<u8>, v: usize) {
    out.extend_from_slice(&u16::try_from(v).unwrap_or(u16::MAX).to_be_bytes());
}

/// Encodes a payload chain; returns the type of the first payload and the bytes.
/// An SK/SKF payload, if present, must be last (its next-payload field is its inner type).
pub fn encode_chain(payloads: &[Payload]) -> (u8, Vec<u8>) {
    let mut out = Vec::new();
    for (i, p) in payloads.iter().enumerate() {
        let np = match p {
            Payload::Sk { first_inner, .. } | Payload::Skf { first_inner, .. } => *first_inner,
            _ => payloads
                .get(i + 1)
                .map_or(payload_type::NONE, Payload::kind),
        };
        let critical = matches!(p, Payload::Unknown { critical: true, .. });
        out.push(np);
        out.push(if critical { 0x80 } else { 0 });
        let len_at = out.len();
        out.extend_from_slice(&[0, 0]);
        encode_body(p, &mut out);
        let len = out.len() - len_at + 2;
        let len = u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes();
        if let Some(slot) = out.get_mut(len_at..len_at + 2) {
            slot.copy_from_slice(&len);
        }
    }
    (
        payloads.first().map_or(payload_type::NONE, Payload::kind),
        out,
    )
}

fn encode_body(p: &Payload, out: &mut Vec<u8>) {
    match p {
        Payload::Sa(proposals) => {
            for (i, pr) in proposals.iter().enumerate() {
                let start = out.len();
                out.push(if i + 1 == proposals.len() { 0 } else { 2 });
                out.push(0);
                out.extend_from_slice(&[0, 0]);
                out.push(pr.number);
                out.push(pr.protocol);
                out.push(u8::try_from(pr.spi.len()).unwrap_or(u8::MAX));
                out.push(u8::try_from(pr.transforms.len()).unwrap_or(u8::MAX));
                out.extend_from_slice(&pr.spi);
                for (j, t) in pr.transforms.iter().enumerate() {
                    let t_start = out.len();
                    out.push(if j + 1 == pr.transforms.len() { 0 } else { 3 });
                    out.push(0);
                    out.extend_from_slice(&[0, 0]);
                    out.push(t.kind);
                    out.push(0);
                    out.extend_from_slice(&t.id.to_be_bytes());
                    for a in &t.attributes {
                        match a {
                            Attribute::Tv { kind, value } => {
                                out.extend_from_slice(&(kind | 0x8000).to_be_bytes());
                                out.extend_from_slice(&value.to_be_bytes());
                            }
                            Attribute::Tlv { kind, value } => {
                                out.extend_from_slice(&(kind & 0x7fff).to_be_bytes());
                                put_u16(out, value.len());
                                out.extend_from_slice(value);
                            }
                        }
                    }
                    patch_len(out, t_start);
                }
                patch_len(out, start);
            }
        }
        Payload::Ke { group, data } => {
            out.extend_from_slice(&group.to_be_bytes());
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(data);
        }
        Payload::IdI(id) | Payload::IdR(id) => {
            out.push(id.id_type);
            out.extend_from_slice(&[0, 0, 0]);
            out.extend_from_slice(&id.data);
        }
        Payload::Cert { encoding, data } | Payload::CertReq { encoding, data } => {
            out.push(*encoding);
            out.extend_from_slice(data);
        }
        Payload::Auth { method, data } => {
            out.push(*method);
            out.extend_from_slice(&[0, 0, 0]);
            out.extend_from_slice(data);
        }
        Payload::Nonce(d) | Payload::VendorId(d) => out.extend_from_slice(d),
        Payload::Notify(n) => {
            out.push(n.protocol);
            out.push(u8::try_from(n.spi.len()).unwrap_or(u8::MAX));
            out.extend_from_slice(&n.kind.to_be_bytes());
            out.extend_from_slice(&n.spi);
            out.extend_from_slice(&n.data);
        }
        Payload::Delete(d) => {
            out.push(d.protocol);
            out.push(d.spi_size);
            put_u16(out, d.spis.len());
            for s in &d.spis {
                out.extend_from_slice(s);
            }
        }
        Payload::TsI(sel) | Payload::TsR(sel) => {
            out.push(u8::try_from(sel.len()).unwrap_or(u8::MAX));
            out.extend_from_slice(&[0, 0, 0]);
            for ts in sel {
                let (t, len) = match ts.start_addr {
                    IpAddr::V4(_) => (ts_type::IPV4_ADDR_RANGE, 16u16),
                    IpAddr::V6(_) => (ts_type::IPV6_ADDR_RANGE, 40u16),
                };
                out.push(t);
                out.push(ts.ip_protocol);
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(&ts.start_port.to_be_bytes());
                out.extend_from_slice(&ts.end_port.to_be_bytes());
                for a in [ts.start_addr, ts.end_addr] {
                    match a {
                        IpAddr::V4(a) => out.extend_from_slice(&a.octets()),
                        IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
                    }
                }
            }
        }
        Payload::Sk { body, .. } => out.extend_from_slice(body),
        Payload::Skf {
            number,
            total,
            body,
            ..
        } => {
            out.extend_from_slice(&number.to_be_bytes());
            out.extend_from_slice(&total.to_be_bytes());
            out.extend_from_slice(body);
        }
        Payload::Unknown { data, .. } => out.extend_from_slice(data),
    }
}

/// Writes the 16-bit length of a substructure that starts at `start` (length at `start + 2`).
fn patch_len(out: &mut [u8], start: usize) {
    let len = u16::try_from(out.len() - start)
        .unwrap_or(u16::MAX)
        .to_be_bytes();
    if let Some(slot) = out.get_mut(start + 2..start + 4) {
        slot.copy_from_slice(&len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_rejects_wrong_version_and_length() {
        let mut m = Message {
            header: Header {
                spi_i: 1,
                spi_r: 0,
                next_payload: 0,
                version: VERSION_2,
                exchange: exchange::IKE_SA_INIT,
                flags: FLAG_INITIATOR,
                message_id: 0,
                length: 0,
            },
            payloads: vec![Payload::Nonce(vec![1; 32])],
        }
        .encode();
        assert!(Message::decode(&m).is_ok());
        m.push(0);
        assert!(matches!(
            Message::decode(&m),
            Err(DecodeError::LengthMismatch { .. })
        ));
        m.pop();
        m[17] = 0x10;
        assert_eq!(Message::decode(&m), Err(DecodeError::Version(0x10)));
    }

    #[test]
    fn sk_must_be_last() {
        let payloads = vec![
            Payload::Sk {
                first_inner: payload_type::IDI,
                body: vec![0; 24],
            },
            Payload::Nonce(vec![0; 16]),
        ];
        let (_, bytes) = encode_chain(&payloads);
        assert_eq!(
            decode_chain(payload_type::SK, &bytes),
            Err(DecodeError::EncryptedNotLast(payload_type::SK))
        );
    }
}
