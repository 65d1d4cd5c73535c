//! Decoder: bytes to [`Packet`]. Total: every input gives a packet or a typed error, and every
//! allocation is bounded by the input length (each `Vec` grows only by bytes actually consumed).
//!
//! The decoder accepts exactly what the encoder produces: for any accepted input,
//! `Packet::decode(b)?.to_bytes()` equals `b[..ar$pktsz]`. Deliberate choices:
//! - bytes after `ar$pktsz` are ignored (link-layer padding); `ar$pktsz` above the input is an error;
//! - an extension part must end with the End extension, and nothing may follow End (RFC 2332 §5.3
//!   says the list "is terminated by" End; accepting data after it would make a packet whose
//!   re-encoding differs from what was received, which matters for transit NHSs that re-sign);
//! - known extension types must parse as their RFC/Cisco layout, otherwise the packet is rejected
//!   (an unparseable Responder or NAT extension is a broken peer, not something to relay).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{
    Authentication, Body, Cie, DecodeError, ErrorIndication, Extension, ExtensionBody,
    FIXED_HEADER_LEN, Header, Mandatory, Op, Packet, checksum, ext_type,
};

/// A bounds-checked cursor over one region of the packet. `base` is the region's offset from the
/// first byte of the NHRP packet, so that errors name absolute offsets.
pub(super) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    base: usize,
}

impl<'a> Reader<'a> {
    pub(super) fn new(buf: &'a [u8], base: usize) -> Self {
        Reader { buf, pos: 0, base }
    }

    fn offset(&self) -> usize {
        self.base + self.pos
    }

    fn remaining(&self) -> &'a [u8] {
        self.buf.get(self.pos..).unwrap_or_default()
    }

    fn is_empty(&self) -> bool {
        self.remaining().is_empty()
    }

    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let rest = self.remaining();
        match rest.get(..n) {
            Some(head) => {
                self.pos += n;
                Ok(head)
            }
            None => Err(DecodeError::Truncated {
                field,
                offset: self.offset(),
                needed: n,
                available: rest.len(),
            }),
        }
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let rest = self.remaining();
        match rest.first_chunk::<N>() {
            Some(a) => {
                self.pos += N;
                Ok(*a)
            }
            None => Err(DecodeError::Truncated {
                field,
                offset: self.offset(),
                needed: N,
                available: rest.len(),
            }),
        }
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        self.array::<1>(field).map(|[b]| b)
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        self.array(field).map(u16::from_be_bytes)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        self.array(field).map(u32::from_be_bytes)
    }

    /// A protocol or NBMA address of `len` bytes: 0 is absent, 4 is IPv4, 16 is IPv6.
    fn addr(&mut self, len: usize, field: &'static str) -> Result<Option<IpAddr>, DecodeError> {
        match len {
            0 => Ok(None),
            4 => Ok(Some(IpAddr::V4(Ipv4Addr::from(self.array::<4>(field)?)))),
            16 => Ok(Some(IpAddr::V6(Ipv6Addr::from(self.array::<16>(field)?)))),
            _ => Err(DecodeError::BadAddressLength { field, len }),
        }
    }
}

/// Length from an NBMA (sub)address type/length byte (`ar$shtl`, `ar$sstl`, CIE `Cli Addr T/L`):
/// bit 7 is reserved, bit 6 selects E.164 (which no IP NBMA uses), bits 0-5 are the length.
/// Both high bits are rejected rather than dropped so that a decoded packet re-encodes identically.
fn type_len(tl: u8, field: &'static str) -> Result<usize, DecodeError> {
    if tl & 0x40 != 0 {
        return Err(DecodeError::E164NotSupported { field });
    }
    if tl & 0x80 != 0 {
        // The reserved bit makes the byte read as a length above 63, which no address has.
        return Err(DecodeError::BadAddressLength {
            field,
            len: usize::from(tl),
        });
    }
    Ok(usize::from(tl & 0x3F))
}

fn cie(r: &mut Reader<'_>) -> Result<Cie, DecodeError> {
    let code = r.u8("CIE code")?;
    let prefix_len = r.u8("CIE prefix length")?;
    let unused = r.u16("CIE unused")?;
    let mtu = r.u16("CIE MTU")?;
    let holding_time = r.u16("CIE holding time")?;
    let nbma_len = type_len(r.u8("CIE Cli Addr T/L")?, "CIE client NBMA address")?;
    let sub_len = type_len(r.u8("CIE Cli SAddr T/L")?, "CIE client NBMA subaddress")?;
    let proto_len = usize::from(r.u8("CIE Cli Proto Len")?);
    let preference = r.u8("CIE preference")?;
    let client_nbma = r.addr(nbma_len, "CIE client NBMA address")?;
    let client_nbma_sub = r.take(sub_len, "CIE client NBMA subaddress")?.to_vec();
    let client_proto = r.addr(proto_len, "CIE client protocol address")?;
    Ok(Cie {
        code,
        prefix_len,
        unused,
        mtu,
        holding_time,
        preference,
        client_nbma,
        client_nbma_sub,
        client_proto,
    })
}

fn cie_list(r: &mut Reader<'_>) -> Result<Vec<Cie>, DecodeError> {
    // Every CIE takes at least 12 bytes, so this capacity is bounded by the input.
    let mut cies = Vec::with_capacity((r.remaining().len() / super::CIE_FIXED_LEN).min(8));
    while !r.is_empty() {
        cies.push(cie(r)?);
    }
    Ok(cies)
}

/// The 8-byte common header and the four addresses shared by every mandatory part.
struct Common {
    word: u16,
    word2: u32,
    src_nbma: Option<IpAddr>,
    src_nbma_sub: Vec<u8>,
    src_proto: Option<IpAddr>,
    dst_proto: Option<IpAddr>,
}

fn common(r: &mut Reader<'_>, shtl: u8, sstl: u8) -> Result<Common, DecodeError> {
    let nbma_len = type_len(shtl, "ar$shtl source NBMA address")?;
    let sub_len = type_len(sstl, "ar$sstl source NBMA subaddress")?;
    let src_proto_len = usize::from(r.u8("source protocol length")?);
    let dst_proto_len = usize::from(r.u8("destination protocol length")?);
    let word = r.u16("flags")?;
    let word2 = r.u32("request id")?;
    let src_nbma = r.addr(nbma_len, "source NBMA address")?;
    let src_nbma_sub = r.take(sub_len, "source NBMA subaddress")?.to_vec();
    let src_proto = r.addr(src_proto_len, "source protocol address")?;
    let dst_proto = r.addr(dst_proto_len, "destination protocol address")?;
    Ok(Common {
        word,
        word2,
        src_nbma,
        src_nbma_sub,
        src_proto,
        dst_proto,
    })
}

fn authentication(data: &[u8]) -> Authentication {
    match data.split_first_chunk::<4>() {
        Some((ty, password))
            if u32::from_be_bytes(*ty) == super::CISCO_AUTH_CLEARTEXT
                && password.len() <= super::CISCO_PASSWORD_MAX_LEN =>
        {
            Authentication::CiscoCleartext(password.to_vec())
        }
        _ => Authentication::Other(data.to_vec()),
    }
}

fn extension_body(
    ty: u16,
    data: &[u8],
    base: usize,
    offset: usize,
) -> Result<ExtensionBody, DecodeError> {
    let bad = |reason| DecodeError::BadExtension { ty, offset, reason };
    let mut r = Reader::new(data, base);
    Ok(match ty {
        ext_type::END => {
            if !data.is_empty() {
                return Err(bad("End extension with a non-zero length"));
            }
            ExtensionBody::End
        }
        ext_type::RESPONDER_ADDRESS => {
            if data.is_empty() {
                ExtensionBody::ResponderAddress(None)
            } else {
                let c = cie(&mut r)?;
                if !r.is_empty() {
                    return Err(bad("Responder Address holds more than one CIE"));
                }
                ExtensionBody::ResponderAddress(Some(c))
            }
        }
        ext_type::FORWARD_TRANSIT_NHS => ExtensionBody::ForwardTransitNhs(cie_list(&mut r)?),
        ext_type::REVERSE_TRANSIT_NHS => ExtensionBody::ReverseTransitNhs(cie_list(&mut r)?),
        ext_type::AUTHENTICATION => ExtensionBody::Authentication(authentication(data)),
        ext_type::VENDOR_PRIVATE => match data.split_first_chunk::<3>() {
            Some((oui, rest)) => ExtensionBody::VendorPrivate {
                oui: *oui,
                data: rest.to_vec(),
            },
            None => return Err(bad("Vendor-Private extension shorter than its 3-byte OUI")),
        },
        // RFC 2735 also numbers Device Capabilities 9 (8 bytes, not a CIE list); DMVPN peers
        // never send it, so an 8-byte type 9 fails here as a truncated CIE.
        ext_type::CISCO_NAT_ADDRESS => ExtensionBody::CiscoNatAddress(cie_list(&mut r)?),
        _ => ExtensionBody::Unknown {
            ty,
            data: data.to_vec(),
        },
    })
}

/// Parses the extension part `bytes[extoff..pktsz]`.
fn extensions(part: &[u8], extoff: usize) -> Result<Vec<Extension>, DecodeError> {
    let mut r = Reader::new(part, extoff);
    // Every extension takes at least 4 bytes, so this capacity is bounded by the input.
    let mut out = Vec::with_capacity((part.len() / 4).min(8));
    let mut ended = false;
    while !r.is_empty() {
        if ended {
            return Err(DecodeError::DataAfterEnd);
        }
        let offset = r.offset();
        let word = r.u16("extension type")?;
        let len = usize::from(r.u16("extension length")?);
        let compulsory = word & ext_type::COMPULSORY != 0;
        // Bit 14 ("u", must be zero) stays part of the type so that it survives a round trip:
        // such an extension is unknown to us.
        let ty = word & !ext_type::COMPULSORY;
        let body_base = r.offset();
        let data = r
            .take(len, "extension value")
            .map_err(|_| DecodeError::BadExtension {
                ty,
                offset,
                reason: "extension length runs past ar$pktsz",
            })?;
        let body = extension_body(ty, data, body_base, offset)?;
        ended = body == ExtensionBody::End;
        out.push(Extension { compulsory, body });
    }
    if !ended {
        return Err(DecodeError::BadExtension {
            ty: ext_type::END,
            offset: extoff + part.len(),
            reason: "extension part not terminated by the End extension",
        });
    }
    Ok(out)
}

pub(super) fn decode(bytes: &[u8]) -> Result<Packet, DecodeError> {
    let Some(fixed) = bytes.first_chunk::<FIXED_HEADER_LEN>() else {
        return Err(DecodeError::Truncated {
            field: "fixed header",
            offset: 0,
            needed: FIXED_HEADER_LEN,
            available: bytes.len(),
        });
    };
    let mut h = Reader::new(fixed, 0);
    let afn = h.u16("ar$afn")?;
    let pro_type = h.u16("ar$pro.type")?;
    let pro_snap = h.array::<5>("ar$pro.snap")?;
    let hop_count = h.u8("ar$hopcnt")?;
    let pktsz = usize::from(h.u16("ar$pktsz")?);
    let carried = h.u16("ar$chksum")?;
    let extoff = usize::from(h.u16("ar$extoff")?);
    let version = h.u8("ar$op.version")?;
    let op_type = h.u8("ar$op.type")?;
    let shtl = h.u8("ar$shtl")?;
    let sstl = h.u8("ar$sstl")?;

    let Some(pkt) = bytes.get(..pktsz).filter(|_| pktsz >= FIXED_HEADER_LEN) else {
        return Err(DecodeError::BadLength {
            pktsz,
            available: bytes.len(),
        });
    };
    // Checksum over the packet with ar$chksum (bytes 12..14) taken as zero. Both parts start
    // on an even offset, so summing them separately keeps the word alignment.
    let computed = checksum::finish(
        checksum::sum(pkt.get(..12).unwrap_or_default())
            + checksum::sum(pkt.get(14..).unwrap_or_default()),
    );
    if computed != carried {
        return Err(DecodeError::BadChecksum { carried, computed });
    }
    if version != 1 {
        return Err(DecodeError::BadVersion(version));
    }
    let op = Op::from_u8(op_type).ok_or(DecodeError::UnknownOp(op_type))?;

    let body_end = match extoff {
        0 => pktsz,
        _ if op == Op::ErrorIndication => return Err(DecodeError::ExtensionsOnErrorIndication),
        e if (FIXED_HEADER_LEN..=pktsz).contains(&e) => e,
        _ => return Err(DecodeError::BadExtensionOffset { extoff, pktsz }),
    };
    let mut r = Reader::new(
        pkt.get(FIXED_HEADER_LEN..body_end).unwrap_or_default(),
        FIXED_HEADER_LEN,
    );
    let c = common(&mut r, shtl, sstl)?;
    let rest = r.remaining();
    let body = match op {
        Op::ErrorIndication => Body::Error(ErrorIndication {
            unused: c.word,
            code: (c.word2 >> 16) as u16,
            offset: (c.word2 & 0xFFFF) as u16,
            src_nbma: c.src_nbma,
            src_nbma_sub: c.src_nbma_sub,
            src_proto: c.src_proto,
            dst_proto: c.dst_proto,
            offending: rest.to_vec(),
        }),
        Op::TrafficIndication => Body::Mandatory(Mandatory {
            flags: c.word,
            request_id: c.word2,
            src_nbma: c.src_nbma,
            src_nbma_sub: c.src_nbma_sub,
            src_proto: c.src_proto,
            dst_proto: c.dst_proto,
            cies: Vec::new(),
            payload: rest.to_vec(),
        }),
        _ => Body::Mandatory(Mandatory {
            flags: c.word,
            request_id: c.word2,
            src_nbma: c.src_nbma,
            src_nbma_sub: c.src_nbma_sub,
            src_proto: c.src_proto,
            dst_proto: c.dst_proto,
            cies: cie_list(&mut r)?,
            payload: Vec::new(),
        }),
    };
    let extensions = match extoff {
        0 => Vec::new(),
        _ => extensions(pkt.get(extoff..).unwrap_or_default(), extoff)?,
    };
    Ok(Packet {
        header: Header {
            afn,
            pro_type,
            pro_snap,
            hop_count,
            version,
            op,
        },
        body,
        extensions,
    })
}
