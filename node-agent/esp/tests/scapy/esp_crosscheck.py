#!/usr/bin/env python3
"""Cross-check of dmvpn-esp against scapy's independent ESP implementation (scapy.layers.ipsec).

Usage: unshare -n python3 esp_crosscheck.py JOBS OUT

Each line of JOBS is `OP SUITE ESN SPI KEYMAT SEQ NH DATA` (numbers in hex where noted):
  OP      D = decrypt DATA (an ESP packet sealed by dmvpn-esp), E = encrypt DATA (a payload);
          V and U: the same with UDP encapsulation on port 4500 (RFC 3948): DATA / the output is
          the whole UDP datagram
  SUITE   aes128gcm16 | aes256gcm16 | chacha20poly1305
  ESN     0 | 1
  SPI     hex;  KEYMAT: hex, key followed by the 4-byte salt;  SEQ: full 64-bit sequence number, hex
  NH      next header (decimal, E only; 0 for D);  DATA: hex, `-` when empty
Each output line is `D NH PAYLOAD_HEX`, `D ERR reason`, or `E ESP_HEX` (V and U alike), in
job order.
Transport mode over IPv4 198.51.100.1 -> 198.51.100.2. No packet is sent anywhere; it refuses to
run where a network interface other than lo exists (run it under `unshare -n`).
"""
import socket
import sys

_ifaces = [name for _, name in socket.if_nameindex() if name != "lo"]
if _ifaces:
    sys.exit("refusing to run with network interfaces %s: run it as `unshare -n python3 %s`" % (_ifaces, sys.argv[0]))

from scapy.all import IP, UDP, Raw  # noqa: E402
from scapy.layers.ipsec import ESP, SecurityAssociation  # noqa: E402

ALGO = {"aes128gcm16": "AES-GCM", "aes256gcm16": "AES-GCM", "chacha20poly1305": "CHACHA20-POLY1305"}
SRC, DST = "198.51.100.1", "198.51.100.2"


def sa_for(suite, esn, spi, keymat, seq, udp=False):
    nat_t = UDP(sport=4500, dport=4500) if udp else None
    return SecurityAssociation(ESP, spi=spi, crypt_algo=ALGO[suite], crypt_key=keymat,
                               esn_en=esn, esn=seq >> 32, seq_num=seq & 0xFFFFFFFF,
                               nat_t_header=nat_t)


def main():
    jobs, out_path = sys.argv[1], sys.argv[2]
    out = []
    for line in open(jobs):
        op, suite, esn, spi, keymat, seq, nh, data = line.split()
        esn, spi, seq, nh = esn == "1", int(spi, 16), int(seq, 16), int(nh)
        keymat, data = bytes.fromhex(keymat), bytes.fromhex(data.replace("-", ""))
        udp = op in ("U", "V")
        sa = sa_for(suite, esn, spi, keymat, seq, udp)
        if op in ("D", "V"):
            pkt = IP(bytes(IP(src=SRC, dst=DST, proto=17 if udp else 50) / Raw(data)))
            try:
                dec = sa.decrypt(pkt)
            except Exception as e:  # scapy raises IPSecIntegrityError on an ICV mismatch
                out.append("D ERR %s" % type(e).__name__)
                continue
            # Cut by the IP length: re-dissection as GRE would make up a header for empty data.
            payload = bytes(dec)[dec.ihl * 4:dec.len]
            out.append("D %d %s" % (dec.proto, payload.hex() or "-"))
        elif op in ("E", "U"):
            enc = sa.encrypt(IP(src=SRC, dst=DST, proto=nh) / Raw(data), seq_num=seq & 0xFFFFFFFF)
            assert enc.proto == (17 if udp else 50)
            out.append("E %s" % bytes(enc[UDP if udp else ESP]).hex())
        else:
            sys.exit("bad job line: %r" % line)
    with open(out_path, "w") as f:
        f.write("\n".join(out) + "\n")


main()
