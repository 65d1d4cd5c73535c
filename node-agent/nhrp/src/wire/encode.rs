//! Encoder: [`Packet`] to bytes. Computes `ar$pktsz`, `ar$extoff`, `ar$chksum`, `ar$shtl`/`ar$sstl`
//! and every length and type/length byte from the packet's fields, and refuses packets that the
//! decoder would read back differently (so that encode then decode is the identity).

use std::net::IpAddr;

use super::{
    Authentication, Body, Cie, EncodeError, Extension, ExtensionBody, FIXED_HEADER_LEN, Op, Packet,
    checksum, ext_type,
};

fn addr_len(a: Option<IpAddr>) -> u8 {
    match a {
        None => 0,
        Some(IpAddr::V4(_)) => 4,
        Some(IpAddr::V6(_)) => 16,
    }
}

fn put_addr(out: &mut Vec<u8>, a: Option<IpAddr>) {
    match a {
        None => {}
        Some(IpAddr::V4(a)) => out.extend_from_slice(&a.octets()),
        Some(IpAddr::V6(a)) => out.extend_from_slice(&a.octets()),
    }
}

/// Type/length byte of a subaddress: the length must fit the 6-bit field.
fn sub_len(sub: &[u8], what: &'static str) -> Result<u8, EncodeError> {
    u8::try_from(sub.len())
        .ok()
        .filter(|l| *l <= 0x3F)
        .ok_or(EncodeError::Invalid(what))
}

fn put_u16_at(out: &mut [u8], at: usize, v: u16) {
    if let Some(dst) = out.get_mut(at..at + 2) {
        dst.copy_from_slice(&v.to_be_bytes());
    }
}

fn put_cie(out: &mut Vec<u8>, c: &Cie) -> Result<(), EncodeError> {
    let sub = sub_len(
        &c.client_nbma_sub,
        "CIE client NBMA subaddress longer than 63 bytes",
    )?;
    out.push(c.code);
    out.push(c.prefix_len);
    out.extend_from_slice(&c.unused.to_be_bytes());
    out.extend_from_slice(&c.mtu.to_be_bytes());
    out.extend_from_slice(&c.holding_time.to_be_bytes());
    out.push(addr_len(c.client_nbma));
    out.push(sub);
    out.push(addr_len(c.client_proto));
    out.push(c.preference);
    put_addr(out, c.client_nbma);
    out.extend_from_slice(&c.client_nbma_sub);
    put_addr(out, c.client_proto);
    Ok(())
}

fn put_cies(out: &mut Vec<u8>, cies: &[Cie]) -> Result<(), EncodeError> {
    cies.iter().try_for_each(|c| put_cie(out, c))
}

/// Whether the decoder maps this type number to a typed [`ExtensionBody`] variant.
fn is_known_type(ty: u16) -> bool {
    matches!(
        ty,
        ext_type::END
            | ext_type::RESPONDER_ADDRESS
            | ext_type::FORWARD_TRANSIT_NHS
            | ext_type::REVERSE_TRANSIT_NHS
            | ext_type::AUTHENTICATION
            | ext_type::VENDOR_PRIVATE
            | ext_type::CISCO_NAT_ADDRESS
    )
}

fn put_extension(out: &mut Vec<u8>, e: &Extension) -> Result<(), EncodeError> {
    let ty = e.body.ty();
    if let ExtensionBody::Unknown { ty, .. } = &e.body {
        if ty & ext_type::COMPULSORY != 0 {
            return Err(EncodeError::Invalid(
                "unknown extension type has the compulsory bit (0x8000) set: use Extension::compulsory",
            ));
        }
        if is_known_type(*ty) {
            return Err(EncodeError::Invalid(
                "ExtensionBody::Unknown uses a known extension type number: use its typed variant",
            ));
        }
    }
    let word = if e.compulsory {
        ty | ext_type::COMPULSORY
    } else {
        ty
    };
    out.extend_from_slice(&word.to_be_bytes());
    let len_at = out.len();
    out.extend_from_slice(&[0, 0]);
    let start = out.len();
    match &e.body {
        ExtensionBody::End => {}
        ExtensionBody::ResponderAddress(c) => {
            if let Some(c) = c {
                put_cie(out, c)?;
            }
        }
        ExtensionBody::ForwardTransitNhs(cies)
        | ExtensionBody::ReverseTransitNhs(cies)
        | ExtensionBody::CiscoNatAddress(cies) => put_cies(out, cies)?,
        ExtensionBody::Authentication(Authentication::CiscoCleartext(password)) => {
            if password.len() > super::CISCO_PASSWORD_MAX_LEN {
                return Err(EncodeError::Invalid(
                    "Cisco cleartext NHRP password longer than 8 bytes (Cisco truncates it to 8)",
                ));
            }
            out.extend_from_slice(&super::CISCO_AUTH_CLEARTEXT.to_be_bytes());
            out.extend_from_slice(password);
        }
        ExtensionBody::Authentication(Authentication::Other(raw)) => {
            if let Some((t, rest)) = raw.split_first_chunk::<4>()
                && u32::from_be_bytes(*t) == super::CISCO_AUTH_CLEARTEXT
                && rest.len() <= super::CISCO_PASSWORD_MAX_LEN
            {
                return Err(EncodeError::Invalid(
                    "Authentication::Other holds a Cisco cleartext body: use Authentication::CiscoCleartext",
                ));
            }
            out.extend_from_slice(raw);
        }
        ExtensionBody::VendorPrivate { oui, data } => {
            out.extend_from_slice(oui);
            out.extend_from_slice(data);
        }
        ExtensionBody::Unknown { data, .. } => out.extend_from_slice(data),
    }
    let len = out.len() - start;
    let len = u16::try_from(len).map_err(|_| EncodeError::TooLong(FIXED_HEADER_LEN + len))?;
    put_u16_at(out, len_at, len);
    Ok(())
}

/// Writes everything but the three computed header fields, which stay zero.
fn put_packet(p: &Packet, out: &mut Vec<u8>, start: usize) -> Result<usize, EncodeError> {
    let h = &p.header;
    if h.version != 1 {
        return Err(EncodeError::Invalid("ar$op.version must be 1"));
    }
    let (src_nbma, src_nbma_sub, src_proto, dst_proto) = match (&p.body, h.op) {
        (Body::Error(_), op) if op != Op::ErrorIndication => {
            return Err(EncodeError::Invalid(
                "an Error Indication body needs op ErrorIndication",
            ));
        }
        (Body::Mandatory(_), Op::ErrorIndication) => {
            return Err(EncodeError::Invalid(
                "op ErrorIndication needs an Error Indication body",
            ));
        }
        (Body::Error(_), _) if !p.extensions.is_empty() => {
            return Err(EncodeError::Invalid(
                "an Error Indication cannot carry extensions (RFC 2332 §5.2.7)",
            ));
        }
        (Body::Error(e), _) => (e.src_nbma, &e.src_nbma_sub, e.src_proto, e.dst_proto),
        (Body::Mandatory(m), Op::TrafficIndication) if !m.cies.is_empty() => {
            return Err(EncodeError::Invalid("a Traffic Indication carries no CIEs"));
        }
        (Body::Mandatory(m), op) if op != Op::TrafficIndication && !m.payload.is_empty() => {
            return Err(EncodeError::Invalid(
                "only a Traffic Indication carries a payload",
            ));
        }
        (Body::Mandatory(m), _) => (m.src_nbma, &m.src_nbma_sub, m.src_proto, m.dst_proto),
    };
    let sstl = sub_len(src_nbma_sub, "source NBMA subaddress longer than 63 bytes")?;
    if let Some(i) = p
        .extensions
        .iter()
        .position(|e| e.body == ExtensionBody::End)
        && i + 1 != p.extensions.len()
    {
        return Err(EncodeError::Invalid(
            "the End extension must be the last one",
        ));
    }

    out.extend_from_slice(&h.afn.to_be_bytes());
    out.extend_from_slice(&h.pro_type.to_be_bytes());
    out.extend_from_slice(&h.pro_snap);
    out.push(h.hop_count);
    out.extend_from_slice(&[0; 6]); // ar$pktsz, ar$chksum, ar$extoff: filled in by encode()
    out.push(h.version);
    out.push(h.op as u8);
    out.push(addr_len(src_nbma));
    out.push(sstl);

    out.push(addr_len(src_proto));
    out.push(addr_len(dst_proto));
    match &p.body {
        Body::Mandatory(m) => {
            out.extend_from_slice(&m.flags.to_be_bytes());
            out.extend_from_slice(&m.request_id.to_be_bytes());
        }
        Body::Error(e) => {
            out.extend_from_slice(&e.unused.to_be_bytes());
            out.extend_from_slice(&e.code.to_be_bytes());
            out.extend_from_slice(&e.offset.to_be_bytes());
        }
    }
    put_addr(out, src_nbma);
    out.extend_from_slice(src_nbma_sub);
    put_addr(out, src_proto);
    put_addr(out, dst_proto);
    match &p.body {
        Body::Mandatory(m) => {
            put_cies(out, &m.cies)?;
            out.extend_from_slice(&m.payload);
        }
        Body::Error(e) => out.extend_from_slice(&e.offending),
    }

    if p.extensions.is_empty() {
        return Ok(0);
    }
    let extoff = out.len() - start;
    for e in &p.extensions {
        put_extension(out, e)?;
    }
    if p.extensions.last().map(|e| &e.body) != Some(&ExtensionBody::End) {
        put_extension(out, &Extension::end())?;
    }
    Ok(extoff)
}

pub(super) fn encode(p: &Packet, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let start = out.len();
    let extoff = match put_packet(p, out, start) {
        Ok(e) => e,
        Err(e) => {
            out.truncate(start);
            return Err(e);
        }
    };
    let len = out.len() - start;
    let (Ok(pktsz), Ok(extoff)) = (u16::try_from(len), u16::try_from(extoff)) else {
        out.truncate(start);
        return Err(EncodeError::TooLong(len));
    };
    let pkt = out.get_mut(start..).unwrap_or_default();
    put_u16_at(pkt, 10, pktsz);
    put_u16_at(pkt, 14, extoff);
    let sum = checksum::checksum(pkt);
    put_u16_at(pkt, 12, sum);
    Ok(())
}
