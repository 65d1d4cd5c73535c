//! Property tests of the NHRP codec: valid packets round-trip, any input decodes without panic
//! (and what decodes re-encodes identically), and single-bit corruption is caught.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use dmvpn_nhrp::wire::{
    Authentication, Body, Cie, DecodeError, ErrorIndication, Extension, ExtensionBody, Header,
    Mandatory, Op, Packet, checksum, ext_type,
};
use proptest::prelude::*;

fn addr() -> impl Strategy<Value = Option<IpAddr>> {
    prop_oneof![
        2 => Just(None),
        6 => any::<[u8; 4]>().prop_map(|a| Some(IpAddr::V4(Ipv4Addr::from(a)))),
        2 => any::<[u8; 16]>().prop_map(|a| Some(IpAddr::V6(Ipv6Addr::from(a)))),
    ]
}

/// Subaddresses are empty on IP NBMA; keep some non-empty ones (up to the 63-byte limit).
fn subaddr() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![8 => Just(Vec::new()), 1 => prop::collection::vec(any::<u8>(), 1..=63)]
}

fn cie() -> impl Strategy<Value = Cie> {
    (
        (
            any::<u8>(),
            any::<u8>(),
            any::<u16>(),
            any::<u16>(),
            any::<u16>(),
            any::<u8>(),
        ),
        (addr(), subaddr(), addr()),
    )
        .prop_map(
            |((code, prefix_len, unused, mtu, holding_time, preference), (nbma, sub, proto))| Cie {
                code,
                prefix_len,
                unused,
                mtu,
                holding_time,
                preference,
                client_nbma: nbma,
                client_nbma_sub: sub,
                client_proto: proto,
            },
        )
}

fn cies(max: usize) -> impl Strategy<Value = Vec<Cie>> {
    prop::collection::vec(cie(), 0..=max)
}

fn is_known(ty: u16) -> bool {
    matches!(ty, 0 | 3 | 4 | 5 | 7 | 8 | 9)
}

fn authentication() -> impl Strategy<Value = Authentication> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..=8).prop_map(Authentication::CiscoCleartext),
        // Any other form: not "type 1 + at most 8 bytes", which is the Cisco form.
        prop::collection::vec(any::<u8>(), 0..40)
            .prop_filter("Cisco cleartext form", |v| !(v.len() <= 12
                && v.starts_with(&[0, 0, 0, 1])))
            .prop_map(Authentication::Other),
    ]
}

/// Any extension but End (End is added last by the packet strategy).
fn extension() -> impl Strategy<Value = Extension> {
    let body = prop_oneof![
        prop::option::of(cie()).prop_map(ExtensionBody::ResponderAddress),
        cies(3).prop_map(ExtensionBody::ForwardTransitNhs),
        cies(3).prop_map(ExtensionBody::ReverseTransitNhs),
        authentication().prop_map(ExtensionBody::Authentication),
        (any::<[u8; 3]>(), prop::collection::vec(any::<u8>(), 0..20))
            .prop_map(|(oui, data)| ExtensionBody::VendorPrivate { oui, data }),
        cies(3).prop_map(ExtensionBody::CiscoNatAddress),
        (0u16..0x8000, prop::collection::vec(any::<u8>(), 0..20))
            .prop_filter("known type", |(ty, _)| !is_known(*ty))
            .prop_map(|(ty, data)| ExtensionBody::Unknown { ty, data }),
    ];
    (any::<bool>(), body).prop_map(|(c, b)| Extension::new(c, b))
}

fn op() -> impl Strategy<Value = Op> {
    (1u8..=8).prop_map(|v| Op::from_u8(v).unwrap())
}

/// Valid packets, in the canonical form the decoder returns (extensions end with End).
fn packet() -> impl Strategy<Value = Packet> {
    let header = (
        op(),
        any::<u16>(),
        any::<u16>(),
        any::<[u8; 5]>(),
        any::<u8>(),
    )
        .prop_map(|(op, afn, pro_type, pro_snap, hop_count)| Header {
            afn,
            pro_type,
            pro_snap,
            hop_count,
            version: 1,
            op,
        });
    let common = (
        any::<u16>(),
        any::<u32>(),
        addr(),
        subaddr(),
        addr(),
        addr(),
    );
    let payload = prop::collection::vec(any::<u8>(), 0..64);
    let exts = (prop::collection::vec(extension(), 0..6), any::<bool>());
    (header, common, cies(3), payload, exts).prop_map(
        |(
            header,
            (w1, w2, src_nbma, src_nbma_sub, src_proto, dst_proto),
            cies,
            payload,
            (mut extensions, end_c),
        )| {
            let body = match header.op {
                Op::ErrorIndication => {
                    extensions.clear();
                    Body::Error(ErrorIndication {
                        unused: w1,
                        code: (w2 >> 16) as u16,
                        offset: w2 as u16,
                        src_nbma,
                        src_nbma_sub,
                        src_proto,
                        dst_proto,
                        offending: payload,
                    })
                }
                Op::TrafficIndication => Body::Mandatory(Mandatory {
                    flags: w1,
                    request_id: w2,
                    src_nbma,
                    src_nbma_sub,
                    src_proto,
                    dst_proto,
                    cies: Vec::new(),
                    payload,
                }),
                _ => Body::Mandatory(Mandatory {
                    flags: w1,
                    request_id: w2,
                    src_nbma,
                    src_nbma_sub,
                    src_proto,
                    dst_proto,
                    cies,
                    payload: Vec::new(),
                }),
            };
            if !extensions.is_empty() {
                extensions.push(Extension::new(end_c, ExtensionBody::End));
            }
            Packet {
                header,
                body,
                extensions,
            }
        },
    )
}

/// Rewrites ar$chksum so that mutated bytes get past the checksum and reach the parsers.
fn fix_checksum(b: &mut [u8]) {
    if b.len() >= 14 {
        b[12] = 0;
        b[13] = 0;
        let pktsz = usize::from(u16::from_be_bytes([b[10], b[11]])).min(b.len());
        let c = checksum(&b[..pktsz]);
        b[12..14].copy_from_slice(&c.to_be_bytes());
    }
}

/// What every successful decode must satisfy: the packet re-encodes to exactly the bytes it came
/// from (up to ar$pktsz), and that encoding decodes to the same packet.
fn assert_canonical(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(p) = Packet::decode(bytes) {
        let again = p
            .to_bytes()
            .map_err(|e| TestCaseError::fail(format!("re-encode: {e}")))?;
        let pktsz = usize::from(u16::from_be_bytes([bytes[10], bytes[11]]));
        prop_assert_eq!(&again[..], &bytes[..pktsz]);
        prop_assert_eq!(Packet::decode(&again), Ok(p));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn valid_packets_round_trip(p in packet()) {
        let bytes = p.to_bytes().unwrap();
        prop_assert_eq!(checksum(&bytes), 0);
        prop_assert_eq!(usize::from(u16::from_be_bytes([bytes[10], bytes[11]])), bytes.len());
        let extoff = u16::from_be_bytes([bytes[14], bytes[15]]);
        prop_assert_eq!(extoff == 0, p.extensions.is_empty());
        prop_assert_eq!(Packet::decode(&bytes), Ok(p.clone()));
        // encode() appends and leaves earlier content alone.
        let mut out = vec![0xAA; 3];
        p.encode(&mut out).unwrap();
        prop_assert_eq!(&out[..3], &[0xAA; 3]);
        prop_assert_eq!(&out[3..], &bytes[..]);
        // Bytes after ar$pktsz (link padding) are ignored.
        let mut padded = bytes.clone();
        padded.extend_from_slice(&[0; 7]);
        prop_assert_eq!(Packet::decode(&padded), Ok(p));
    }

    #[test]
    fn missing_end_is_appended(p in packet()) {
        prop_assume!(!p.extensions.is_empty());
        let mut without_end = p.clone();
        without_end.extensions.pop();
        let decoded = Packet::decode(&without_end.to_bytes().unwrap()).unwrap();
        prop_assert_eq!(decoded.extensions.last(), Some(&Extension::end()));
        prop_assert_eq!(decoded.extensions.len(), p.extensions.len());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        assert_canonical(&bytes)?;
    }

    #[test]
    fn mutated_packets_with_fixed_checksum(
        p in packet(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut bytes = p.to_bytes().unwrap();
        for (i, v) in edits {
            let i = i.index(bytes.len());
            bytes[i] = v;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len() + 1));
        }
        fix_checksum(&mut bytes);
        assert_canonical(&bytes)?;
    }

    #[test]
    fn single_bit_flip_is_caught(p in packet(), bit in any::<prop::sample::Index>()) {
        let bytes = p.to_bytes().unwrap();
        // ar$pktsz (bytes 10-11) is excluded: a flip there changes which bytes are checksummed
        // rather than their sum, and is covered by `pktsz_must_fit_the_input`.
        let candidates: Vec<usize> = (0..bytes.len() * 8).filter(|b| !(80..96).contains(b)).collect();
        let b = candidates[bit.index(candidates.len())];
        let mut flipped = bytes.clone();
        flipped[b / 8] ^= 0x80 >> (b % 8);
        match Packet::decode(&flipped) {
            Err(DecodeError::BadChecksum { .. }) => {}
            other => prop_assert!(false, "bit {} flipped: {:?}", b, other),
        }
    }
}

fn sample() -> Packet {
    Packet {
        header: Header::ipv4(Op::RegistrationRequest, 1),
        body: Body::Mandatory(Mandatory {
            flags: 0x8002,
            request_id: 7,
            src_nbma: Some(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 2))),
            src_nbma_sub: vec![],
            src_proto: Some(IpAddr::V4(Ipv4Addr::new(10, 42, 0, 2))),
            dst_proto: Some(IpAddr::V4(Ipv4Addr::new(10, 42, 0, 1))),
            cies: vec![Cie {
                prefix_len: 0xFF,
                holding_time: 600,
                ..Cie::default()
            }],
            payload: vec![],
        }),
        extensions: vec![
            Extension::new(true, ExtensionBody::ResponderAddress(None)),
            Extension::end(),
        ],
    }
}

fn with_checksum(mut b: Vec<u8>) -> Vec<u8> {
    fix_checksum(&mut b);
    b
}

#[test]
fn pktsz_must_fit_the_input() {
    let bytes = sample().to_bytes().unwrap();
    assert_eq!(
        Packet::decode(&bytes[..bytes.len() - 1]),
        Err(DecodeError::BadLength {
            pktsz: bytes.len(),
            available: bytes.len() - 1
        })
    );
    let mut small = bytes.clone();
    small[10..12].copy_from_slice(&19u16.to_be_bytes());
    assert!(matches!(
        Packet::decode(&small),
        Err(DecodeError::BadLength { pktsz: 19, .. })
    ));
    assert!(matches!(
        Packet::decode(&bytes[..10]),
        Err(DecodeError::Truncated { needed: 20, .. })
    ));
}

#[test]
fn header_checks() {
    let bytes = sample().to_bytes().unwrap();
    let mut v = bytes.clone();
    v[16] = 2;
    assert_eq!(
        Packet::decode(&with_checksum(v)),
        Err(DecodeError::BadVersion(2))
    );
    let mut t = bytes.clone();
    t[17] = 9;
    assert_eq!(
        Packet::decode(&with_checksum(t)),
        Err(DecodeError::UnknownOp(9))
    );
    for extoff in [1u16, 19] {
        let mut e = bytes.clone();
        e[14..16].copy_from_slice(&extoff.to_be_bytes());
        assert!(matches!(
            Packet::decode(&with_checksum(e)),
            Err(DecodeError::BadExtensionOffset { .. })
        ));
    }
    let mut e = bytes.clone();
    e[14..16].copy_from_slice(&(bytes.len() as u16 + 1).to_be_bytes());
    assert!(matches!(
        Packet::decode(&with_checksum(e)),
        Err(DecodeError::BadExtensionOffset { .. })
    ));
    // ar$extoff == ar$pktsz announces extensions but holds none: no End.
    let mut e = bytes.clone();
    e[14..16].copy_from_slice(&(bytes.len() as u16).to_be_bytes());
    assert!(matches!(
        Packet::decode(&with_checksum(e)),
        Err(DecodeError::BadExtension { ty: 0, .. }) | Err(DecodeError::Truncated { .. })
    ));
}

#[test]
fn address_fields_checks() {
    let bytes = sample().to_bytes().unwrap();
    // ar$shtl with the E.164 bit.
    let mut e = bytes.clone();
    e[18] |= 0x40;
    assert!(matches!(
        Packet::decode(&with_checksum(e)),
        Err(DecodeError::E164NotSupported { .. })
    ));
    // Source protocol length 5.
    let mut l = bytes.clone();
    l[20] = 5;
    assert!(matches!(
        Packet::decode(&with_checksum(l)),
        Err(DecodeError::BadAddressLength { len: 5, .. })
    ));
}

#[test]
fn extension_checks() {
    let bytes = sample().to_bytes().unwrap();
    let extoff = usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
    // Data after End.
    let mut after = bytes.clone();
    after.extend_from_slice(&[0x80, 0x00, 0x00, 0x00]);
    let n = after.len() as u16;
    after[10..12].copy_from_slice(&n.to_be_bytes());
    assert_eq!(
        Packet::decode(&with_checksum(after)),
        Err(DecodeError::DataAfterEnd)
    );
    // Missing End.
    let mut no_end = bytes[..bytes.len() - 4].to_vec();
    let n = no_end.len() as u16;
    no_end[10..12].copy_from_slice(&n.to_be_bytes());
    assert!(matches!(
        Packet::decode(&with_checksum(no_end)),
        Err(DecodeError::BadExtension { ty: 0, .. })
    ));
    // Extension length past the end of the packet.
    let mut long = bytes.clone();
    long[extoff + 2..extoff + 4].copy_from_slice(&200u16.to_be_bytes());
    assert!(matches!(
        Packet::decode(&with_checksum(long)),
        Err(DecodeError::BadExtension { ty: 3, .. })
    ));
    // Error Indication with an extension offset.
    let ei = Packet {
        header: Header::ipv4(Op::ErrorIndication, 0),
        body: Body::Error(ErrorIndication {
            unused: 0,
            code: 3,
            offset: 0,
            src_nbma: None,
            src_nbma_sub: vec![],
            src_proto: None,
            dst_proto: None,
            offending: bytes.clone(),
        }),
        extensions: vec![],
    };
    let mut eb = ei.to_bytes().unwrap();
    assert_eq!(Packet::decode(&eb).unwrap(), ei);
    eb[14..16].copy_from_slice(&28u16.to_be_bytes());
    assert_eq!(
        Packet::decode(&with_checksum(eb)),
        Err(DecodeError::ExtensionsOnErrorIndication)
    );
}

#[test]
fn encoder_refuses_what_would_not_round_trip() {
    let mut p = sample();
    p.extensions.insert(0, Extension::end());
    assert!(p.to_bytes().is_err(), "End must be last");

    let mut p = sample();
    p.extensions[0] = Extension::new(
        false,
        ExtensionBody::Unknown {
            ty: ext_type::RESPONDER_ADDRESS,
            data: vec![],
        },
    );
    assert!(p.to_bytes().is_err(), "Unknown with a known type");

    let mut p = sample();
    p.extensions[0] = Extension::new(
        true,
        ExtensionBody::Authentication(Authentication::CiscoCleartext(b"123456789".to_vec())),
    );
    assert!(p.to_bytes().is_err(), "password above 8 bytes");

    let mut p = sample();
    p.header.op = Op::ErrorIndication;
    assert!(p.to_bytes().is_err(), "op/body mismatch");

    let mut p = sample();
    p.header.op = Op::TrafficIndication;
    assert!(p.to_bytes().is_err(), "Traffic Indication with CIEs");

    let mut p = sample();
    p.mandatory_mut().unwrap().src_nbma_sub = vec![0; 64];
    let mut out = vec![1, 2, 3];
    assert!(p.encode(&mut out).is_err(), "subaddress above 63 bytes");
    assert_eq!(
        out,
        vec![1, 2, 3],
        "a failed encode leaves the buffer as it was"
    );

    let mut p = sample();
    p.mandatory_mut().unwrap().cies = vec![Cie::default(); 6000];
    assert!(matches!(
        p.to_bytes(),
        Err(dmvpn_nhrp::wire::EncodeError::TooLong(_))
    ));
}

#[test]
fn helpers() {
    let mut p = sample();
    assert_eq!(p.op(), Op::RegistrationRequest);
    assert!(p.error_indication().is_none());
    assert_eq!(
        p.extension(ext_type::RESPONDER_ADDRESS | ext_type::COMPULSORY)
            .map(|e| e.compulsory),
        Some(true)
    );
    assert!(p.extension(ext_type::AUTHENTICATION).is_none());
    p.extension_mut(ext_type::RESPONDER_ADDRESS).unwrap().body =
        ExtensionBody::ResponderAddress(Some(Cie::default()));
    assert_eq!(Packet::decode(&p.to_bytes().unwrap()).unwrap(), p);
    for v in 0..=255u8 {
        match Op::from_u8(v) {
            Some(op) => assert_eq!(op.as_u8(), v),
            None => assert!(v == 0 || v > 8),
        }
    }
    assert_eq!(Op::RegistrationRequest.reply(), Some(Op::RegistrationReply));
    assert_eq!(Op::TrafficIndication.reply(), None);
}
