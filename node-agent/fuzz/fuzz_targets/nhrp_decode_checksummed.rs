//! NHRP decoder behind a valid checksum: the input's ar$chksum is recomputed before decoding, so
//! that mutations reach the mandatory-part, CIE and extension parsers instead of stopping at the
//! checksum. Same properties as `nhrp_decode`.
#![no_main]

use dmvpn_nhrp::wire::{Packet, checksum};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut data = data.to_vec();
    if data.len() >= 14 {
        data[12] = 0;
        data[13] = 0;
        let pktsz = usize::from(u16::from_be_bytes([data[10], data[11]])).min(data.len());
        let sum = checksum(&data[..pktsz]);
        data[12..14].copy_from_slice(&sum.to_be_bytes());
    }
    let Ok(packet) = Packet::decode(&data) else {
        return;
    };
    let bytes = packet.to_bytes().expect("a decoded packet must encode");
    let pktsz = usize::from(u16::from_be_bytes([data[10], data[11]]));
    assert_eq!(bytes, data[..pktsz], "re-encoding differs from the input");
    assert_eq!(Packet::decode(&bytes), Ok(packet), "decode(encode(p)) != p");
});
