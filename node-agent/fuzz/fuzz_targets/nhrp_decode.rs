//! NHRP decoder: arbitrary bytes must decode or fail with a typed error, never panic. Whatever
//! decodes must re-encode to exactly the bytes it came from (up to ar$pktsz) and decode again
//! to the same packet.
#![no_main]

use dmvpn_nhrp::wire::Packet;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(packet) = Packet::decode(data) else {
        return;
    };
    let bytes = packet.to_bytes().expect("a decoded packet must encode");
    let pktsz = usize::from(u16::from_be_bytes([data[10], data[11]]));
    assert_eq!(bytes, data[..pktsz], "re-encoding differs from the input");
    assert_eq!(Packet::decode(&bytes), Ok(packet), "decode(encode(p)) != p");
});
