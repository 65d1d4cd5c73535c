//! Security Associations: sealing (outbound) and opening (inbound) in transport mode.

use std::ops::Range;
use std::time::Instant;

use aws_lc_rs::aead::{Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use zeroize::Zeroizing;

use crate::error::{ConfigError, EspError};
use crate::lifetime::{Lifetime, SaSignal, Tracker};
use crate::replay::{DEFAULT_REPLAY_WINDOW, MAX_REPLAY_WINDOW, MIN_REPLAY_WINDOW, ReplayWindow};
use crate::suite::{SALT_LEN, Suite};

/// SPI + sequence number.
pub const ESP_HEADER_LEN: usize = 8;
/// Explicit IV of every suite here (RFC 4106 §3.1, RFC 7634 §2).
pub const IV_LEN: usize = 8;
/// Integrity check value (AEAD tag) length.
pub const ICV_LEN: usize = 16;
/// Bytes in front of the payload in a sealed packet: header and IV. The caller leaves this much
/// room before the payload it hands to [`OutboundSa::seal_in_place`].
pub const ESP_HEADROOM: usize = ESP_HEADER_LEN + IV_LEN;
/// Most bytes a sealed packet adds after the payload: up to 3 padding bytes, pad length, next
/// header, ICV.
pub const ESP_MAX_TAILROOM: usize = 3 + 2 + ICV_LEN;
/// IP protocol number of GRE, the payload of DMVPN transport-mode ESP.
pub const NEXT_HEADER_GRE: u8 = 47;
/// "No next header": a dummy packet (RFC 4303 §2.6) that the receiver discards.
pub const NEXT_HEADER_NONE: u8 = 59;

/// Smallest valid packet: header, IV, pad length, next header, ICV.
const MIN_PACKET_LEN: usize = ESP_HEADROOM + 2 + ICV_LEN;

/// Padding so that payload + padding + 2 trailer bytes is a multiple of 4 (RFC 4303 §2.4).
#[inline]
const fn pad_len(payload_len: usize) -> usize {
    // Wrapping is exact here: 2^64 is a multiple of 4.
    (4 - payload_len.wrapping_add(2) % 4) % 4
}

/// Length of the ESP packet that sealing `payload_len` bytes produces (saturating).
#[inline]
pub const fn sealed_len(payload_len: usize) -> usize {
    payload_len.saturating_add(ESP_HEADROOM + pad_len(payload_len) + 2 + ICV_LEN)
}

/// The SPI of an ESP packet, if it is long enough to have one.
#[inline]
pub fn peek_spi(esp: &[u8]) -> Option<u32> {
    esp.first_chunk::<4>().map(|b| u32::from_be_bytes(*b))
}

/// What IKE negotiated for one direction of a CHILD_SA: SPI, suite, key material, ESN,
/// anti-replay window and lifetime. Turn it into an [`OutboundSa`] or an [`InboundSa`].
#[derive(Clone)]
pub struct SecurityAssociation {
    spi: u32,
    suite: Suite,
    keymat: Zeroizing<Vec<u8>>,
    esn: bool,
    replay_window: u32,
    lifetime: Lifetime,
}

impl std::fmt::Debug for SecurityAssociation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecurityAssociation")
            .field("spi", &format_args!("{:#010x}", self.spi))
            .field("suite", &self.suite)
            .field("keymat", &"<redacted>")
            .field("esn", &self.esn)
            .field("replay_window", &self.replay_window)
            .field("lifetime", &self.lifetime)
            .finish()
    }
}

impl SecurityAssociation {
    /// `keymat` is the cipher key followed by the 4-byte salt, as IKEv2 derives it (RFC 4106
    /// §8.1, RFC 7634 §4). Defaults: ESN on, replay window 1024, [`Lifetime::default`].
    pub fn new(spi: u32, suite: Suite, keymat: &[u8]) -> Result<Self, ConfigError> {
        if spi < 256 {
            return Err(ConfigError::ReservedSpi { spi });
        }
        if keymat.len() != suite.keymat_len() {
            return Err(ConfigError::BadKeyLength {
                suite,
                expected: suite.keymat_len(),
                got: keymat.len(),
            });
        }
        Ok(SecurityAssociation {
            spi,
            suite,
            keymat: Zeroizing::new(keymat.to_vec()),
            esn: true,
            replay_window: DEFAULT_REPLAY_WINDOW,
            lifetime: Lifetime::default(),
        })
    }

    /// Extended sequence numbers (64-bit counter, high half only in the ICV input).
    pub fn with_esn(mut self, esn: bool) -> Self {
        self.esn = esn;
        self
    }

    /// Anti-replay window in packets (inbound only).
    pub fn with_replay_window(mut self, packets: u32) -> Result<Self, ConfigError> {
        if !(MIN_REPLAY_WINDOW..=MAX_REPLAY_WINDOW).contains(&packets) {
            return Err(ConfigError::ReplayWindow {
                got: packets,
                min: MIN_REPLAY_WINDOW,
                max: MAX_REPLAY_WINDOW,
            });
        }
        self.replay_window = packets;
        Ok(self)
    }

    pub fn with_lifetime(mut self, lifetime: Lifetime) -> Result<Self, ConfigError> {
        lifetime.validate()?;
        self.lifetime = lifetime;
        Ok(self)
    }

    pub fn spi(&self) -> u32 {
        self.spi
    }
    pub fn suite(&self) -> Suite {
        self.suite
    }
    pub fn esn(&self) -> bool {
        self.esn
    }
    pub fn replay_window(&self) -> u32 {
        self.replay_window
    }
    pub fn lifetime(&self) -> &Lifetime {
        &self.lifetime
    }

    fn crypto(&self) -> Result<Crypto, ConfigError> {
        let bad = || ConfigError::BadKeyLength {
            suite: self.suite,
            expected: self.suite.keymat_len(),
            got: self.keymat.len(),
        };
        let (key, salt) = self
            .keymat
            .split_at_checked(self.suite.key_len())
            .ok_or_else(bad)?;
        let salt: [u8; SALT_LEN] = salt.try_into().map_err(|_| bad())?;
        let key = UnboundKey::new(self.suite.algorithm(), key).map_err(|_| bad())?;
        Ok(Crypto {
            key: LessSafeKey::new(key),
            salt: Zeroizing::new(salt),
        })
    }

    /// An SA for sealing packets to the peer. `now` starts its time lifetime.
    pub fn into_outbound(self, now: Instant) -> Result<OutboundSa, ConfigError> {
        let crypto = self.crypto()?;
        let seq_max = if self.esn {
            u64::MAX
        } else {
            u64::from(u32::MAX)
        };
        Ok(OutboundSa {
            spi: self.spi,
            suite: self.suite,
            esn: self.esn,
            crypto,
            next_seq: 1,
            seq_max,
            life: Tracker::new(&self.lifetime, now),
            counters: OutboundCounters::default(),
        })
    }

    /// An SA for opening packets from the peer. `now` starts its time lifetime.
    pub fn into_inbound(self, now: Instant) -> Result<InboundSa, ConfigError> {
        let crypto = self.crypto()?;
        Ok(InboundSa {
            spi: self.spi,
            suite: self.suite,
            esn: self.esn,
            crypto,
            replay: ReplayWindow::new(self.replay_window, self.esn),
            life: Tracker::new(&self.lifetime, now),
            counters: InboundCounters::default(),
        })
    }
}

struct Crypto {
    key: LessSafeKey,
    salt: Zeroizing<[u8; SALT_LEN]>,
}

impl Crypto {
    #[inline]
    fn nonce(&self, iv: &[u8; IV_LEN]) -> Nonce {
        let mut n = [0u8; NONCE_LEN];
        let (s, i) = n.split_at_mut(SALT_LEN);
        s.copy_from_slice(&*self.salt);
        i.copy_from_slice(iv);
        Nonce::assume_unique_for_key(n)
    }
}

/// AAD of RFC 4106 §5 / RFC 7634 §2.1: SPI and the sequence number, 32 or 64 bits.
#[inline]
fn aad(spi: u32, seq: u64, esn: bool) -> ([u8; 12], usize) {
    let mut a = [0u8; 12];
    let (s, rest) = a.split_at_mut(4);
    s.copy_from_slice(&spi.to_be_bytes());
    if esn {
        rest.copy_from_slice(&seq.to_be_bytes());
        (a, 12)
    } else {
        if let Some(low) = rest.first_chunk_mut::<4>() {
            *low = (seq as u32).to_be_bytes();
        }
        (a, 8)
    }
}

/// Outbound counters (monotonic).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutboundCounters {
    pub packets: u64,
    /// Payload (plaintext) bytes sealed.
    pub bytes: u64,
    /// Packets refused because the SA reached a hard limit.
    pub expired: u64,
    pub buffer_too_small: u64,
}

/// Inbound counters (monotonic): delivered packets and every drop reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InboundCounters {
    pub packets: u64,
    /// Payload (plaintext) bytes delivered.
    pub bytes: u64,
    pub truncated: u64,
    /// Packets handed to this SA whose SPI is not its own.
    pub wrong_spi: u64,
    pub bad_padding: u64,
    pub auth_failed: u64,
    pub replayed: u64,
    pub too_old: u64,
    pub expired: u64,
}

impl InboundCounters {
    /// Sum of all drop counters.
    pub fn dropped(&self) -> u64 {
        self.truncated
            + self.wrong_spi
            + self.bad_padding
            + self.auth_failed
            + self.replayed
            + self.too_old
            + self.expired
    }

    pub(crate) fn add(&mut self, o: &InboundCounters) {
        self.packets += o.packets;
        self.bytes += o.bytes;
        self.truncated += o.truncated;
        self.wrong_spi += o.wrong_spi;
        self.bad_padding += o.bad_padding;
        self.auth_failed += o.auth_failed;
        self.replayed += o.replayed;
        self.too_old += o.too_old;
        self.expired += o.expired;
    }

    fn count(&mut self, e: &EspError) {
        let c = match e {
            EspError::Truncated { .. } => &mut self.truncated,
            EspError::UnknownSpi { .. } => &mut self.wrong_spi,
            EspError::BadPadding => &mut self.bad_padding,
            EspError::AuthFailed => &mut self.auth_failed,
            EspError::Replayed { .. } => &mut self.replayed,
            EspError::TooOld { .. } => &mut self.too_old,
            EspError::LifetimeExpired { .. } => &mut self.expired,
            // Not produced by open.
            EspError::BufferTooSmall { .. } | EspError::NoOutboundSa => return,
        };
        *c += 1;
    }
}

impl OutboundCounters {
    pub(crate) fn add(&mut self, o: &OutboundCounters) {
        self.packets += o.packets;
        self.bytes += o.bytes;
        self.expired += o.expired;
        self.buffer_too_small += o.buffer_too_small;
    }
}

/// The sending half of an SA.
pub struct OutboundSa {
    spi: u32,
    suite: Suite,
    esn: bool,
    crypto: Crypto,
    next_seq: u64,
    seq_max: u64,
    life: Tracker,
    counters: OutboundCounters,
}

impl std::fmt::Debug for OutboundSa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboundSa")
            .field("spi", &format_args!("{:#010x}", self.spi))
            .field("suite", &self.suite)
            .field("esn", &self.esn)
            .field("next_seq", &self.next_seq)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl OutboundSa {
    /// Seals one packet in place.
    ///
    /// The caller writes the payload (the GRE packet) at `buf[ESP_HEADROOM..ESP_HEADROOM +
    /// payload_len]`; `buf` must be at least [`sealed_len`]`(payload_len)` long. On success the
    /// ESP packet (SPI, sequence number, IV, ciphertext, ICV) occupies `buf[..returned len]`.
    /// The explicit IV is the 64-bit sequence number, unique for the key by construction.
    pub fn seal_in_place(
        &mut self,
        now: Instant,
        next_header: u8,
        buf: &mut [u8],
        payload_len: usize,
    ) -> Result<usize, EspError> {
        let r = self.seal_inner(now, next_header, buf, payload_len);
        match &r {
            Ok(_) => {}
            Err(EspError::BufferTooSmall { .. }) => self.counters.buffer_too_small += 1,
            Err(_) => self.counters.expired += 1,
        }
        r
    }

    /// Seals `payload` into `out` (cleared first). `out` keeps its capacity between calls, so a
    /// reused vector does not allocate per packet.
    pub fn seal_to_vec(
        &mut self,
        now: Instant,
        next_header: u8,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<usize, EspError> {
        out.clear();
        out.resize(sealed_len(payload.len()), 0);
        if let Some(dst) = out.get_mut(ESP_HEADROOM..ESP_HEADROOM + payload.len()) {
            dst.copy_from_slice(payload);
        }
        let r = self.seal_in_place(now, next_header, out, payload.len());
        if r.is_err() {
            out.clear();
        }
        r
    }

    #[inline]
    fn seal_inner(
        &mut self,
        now: Instant,
        next_header: u8,
        buf: &mut [u8],
        payload_len: usize,
    ) -> Result<usize, EspError> {
        let pad = pad_len(payload_len);
        let needed = payload_len
            .checked_add(ESP_HEADROOM + pad + 2 + ICV_LEN)
            .ok_or(EspError::BufferTooSmall {
                needed: usize::MAX,
                have: buf.len(),
            })?;
        let have = buf.len();
        let packet = buf
            .get_mut(..needed)
            .ok_or(EspError::BufferTooSmall { needed, have })?;
        self.life
            .admit(now)
            .map_err(|limit| EspError::LifetimeExpired { limit })?;
        let seq = self.next_seq;
        if seq > self.seq_max {
            // Only reachable through skip_to_seq; still report the expiry.
            self.life.note_seq(seq, self.seq_max);
            return Err(EspError::LifetimeExpired {
                limit: crate::LimitKind::SequenceNumbers,
            });
        }
        self.next_seq = seq.saturating_add(1);

        let (head, rest) = packet.split_at_mut(ESP_HEADROOM);
        let (body, icv) = rest.split_at_mut(rest.len() - ICV_LEN);
        let iv = seq.to_be_bytes();
        let (spi_seq, iv_out) = head.split_at_mut(ESP_HEADER_LEN);
        let (spi_out, seq_out) = spi_seq.split_at_mut(4);
        spi_out.copy_from_slice(&self.spi.to_be_bytes());
        seq_out.copy_from_slice(&(seq as u32).to_be_bytes());
        iv_out.copy_from_slice(&iv);

        // Trailer: padding 1, 2, 3..., pad length, next header.
        let (_, trailer) = body.split_at_mut(payload_len);
        let mut k = 0u8;
        for (b, _) in trailer.iter_mut().zip(0..pad) {
            k += 1;
            *b = k;
        }
        if let [.., pl, nh] = trailer {
            *pl = pad as u8;
            *nh = next_header;
        }

        let (a, alen) = aad(self.spi, seq, self.esn);
        let tag = self
            .crypto
            .key
            .seal_in_place_separate_tag(
                self.crypto.nonce(&iv),
                Aad::from(a.get(..alen).unwrap_or(&a)),
                body,
            )
            // Only fails on inputs larger than the AEAD allows (GiBs); treat as unusable key.
            .map_err(|_| EspError::LifetimeExpired {
                limit: crate::LimitKind::Bytes,
            })?;
        icv.copy_from_slice(tag.as_ref());

        self.life.record(payload_len);
        self.life.note_seq(seq, self.seq_max);
        self.counters.packets += 1;
        self.counters.bytes += payload_len as u64;
        Ok(needed)
    }

    pub fn spi(&self) -> u32 {
        self.spi
    }
    pub fn suite(&self) -> Suite {
        self.suite
    }
    pub fn esn(&self) -> bool {
        self.esn
    }
    /// The sequence number the next sealed packet gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }
    pub fn counters(&self) -> &OutboundCounters {
        &self.counters
    }
    /// A soft limit was reached (the signal may already have been polled).
    pub fn rekey_needed(&self) -> bool {
        self.life.rekey_needed()
    }
    /// A hard limit was reached: every seal fails.
    pub fn expired(&self) -> bool {
        self.life.expired()
    }
    /// Checks the time limits; call at [`Self::poll_timeout`].
    pub fn handle_timeout(&mut self, now: Instant) {
        self.life.check_time(now);
    }
    /// When the next time limit falls due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.life.next_deadline()
    }
    /// Lifetime signals not yet reported: at most one `RekeyNeeded` and one `Expired`, ever.
    pub fn poll_signal(&mut self) -> Option<SaSignal> {
        self.life.poll_signal()
    }
    pub(crate) fn has_signal(&self) -> bool {
        self.life.has_signal()
    }

    /// Moves the sequence counter forward, e.g. to exercise ESN wrap-around in tests. Never
    /// moves it back (that would reuse IVs).
    pub fn skip_to_seq(&mut self, next_seq: u64) {
        self.next_seq = self.next_seq.max(next_seq);
    }
}

/// An opened packet: the payload is decrypted in place at `buf[payload]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opened {
    /// Protocol of the payload; 47 (GRE) for DMVPN, 59 for dummy packets (discard).
    pub next_header: u8,
    pub payload: Range<usize>,
    /// The full (ESN-inferred) sequence number.
    pub seq: u64,
}

/// The receiving half of an SA.
pub struct InboundSa {
    spi: u32,
    suite: Suite,
    esn: bool,
    crypto: Crypto,
    replay: ReplayWindow,
    life: Tracker,
    counters: InboundCounters,
}

impl std::fmt::Debug for InboundSa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundSa")
            .field("spi", &format_args!("{:#010x}", self.spi))
            .field("suite", &self.suite)
            .field("esn", &self.esn)
            .field("highest_seq", &self.replay.top())
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl InboundSa {
    /// Authenticates, replay-checks and decrypts one ESP packet in place. `buf` is exactly the
    /// ESP packet (starting at the SPI; without the outer IP or UDP header). Every failure is
    /// counted in [`Self::counters`]; on failure `buf` may have been partly overwritten.
    pub fn open_in_place(&mut self, now: Instant, buf: &mut [u8]) -> Result<Opened, EspError> {
        let r = self.open_inner(now, buf);
        if let Err(e) = &r {
            self.counters.count(e);
        }
        r
    }

    #[inline]
    fn open_inner(&mut self, now: Instant, buf: &mut [u8]) -> Result<Opened, EspError> {
        let len = buf.len();
        if len < MIN_PACKET_LEN {
            return Err(EspError::Truncated { len });
        }
        let (head, rest) = buf.split_at_mut(ESP_HEADROOM);
        let (spi, seq_low, iv) = match head {
            [s0, s1, s2, s3, q0, q1, q2, q3, iv @ ..] => (
                u32::from_be_bytes([*s0, *s1, *s2, *s3]),
                u32::from_be_bytes([*q0, *q1, *q2, *q3]),
                <[u8; IV_LEN]>::try_from(&*iv).map_err(|_| EspError::Truncated { len })?,
            ),
            _ => return Err(EspError::Truncated { len }),
        };
        if spi != self.spi {
            return Err(EspError::UnknownSpi { spi });
        }
        let seq = self.replay.infer(seq_low).ok_or(EspError::TooOld {
            seq: u64::from(seq_low),
        })?;
        self.replay.check(seq)?;
        self.life
            .admit(now)
            .map_err(|limit| EspError::LifetimeExpired { limit })?;

        let (body, icv) = rest.split_at_mut(rest.len() - ICV_LEN);
        let (a, alen) = aad(spi, seq, self.esn);
        self.crypto
            .key
            .open_in_place_separate_tag(
                self.crypto.nonce(&iv),
                Aad::from(a.get(..alen).unwrap_or(&a)),
                icv,
                body,
            )
            .map_err(|_| EspError::AuthFailed)?;
        // Authentic: move the window even if the trailer turns out malformed, so the same packet
        // is not processed twice.
        self.replay.accept(seq)?;

        let (next_header, pad) = match body {
            [.., pl, nh] => (*nh, usize::from(*pl)),
            _ => return Err(EspError::BadPadding),
        };
        let payload_len = body
            .len()
            .checked_sub(pad + 2)
            .ok_or(EspError::BadPadding)?;
        let padding = body
            .get(payload_len..payload_len + pad)
            .ok_or(EspError::BadPadding)?;
        // RFC 4303 §2.4: default padding is 1, 2, 3, ...
        if padding.iter().zip(1..=u8::MAX).any(|(b, want)| *b != want) {
            return Err(EspError::BadPadding);
        }

        self.life.record(payload_len);
        self.counters.packets += 1;
        self.counters.bytes += payload_len as u64;
        Ok(Opened {
            next_header,
            payload: ESP_HEADROOM..ESP_HEADROOM + payload_len,
            seq,
        })
    }

    pub fn spi(&self) -> u32 {
        self.spi
    }
    pub fn suite(&self) -> Suite {
        self.suite
    }
    pub fn esn(&self) -> bool {
        self.esn
    }
    /// Highest authenticated sequence number (0 before the first packet).
    pub fn highest_seq(&self) -> u64 {
        self.replay.top()
    }
    pub fn counters(&self) -> &InboundCounters {
        &self.counters
    }
    pub fn rekey_needed(&self) -> bool {
        self.life.rekey_needed()
    }
    pub fn expired(&self) -> bool {
        self.life.expired()
    }
    pub fn handle_timeout(&mut self, now: Instant) {
        self.life.check_time(now);
    }
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.life.next_deadline()
    }
    pub fn poll_signal(&mut self) -> Option<SaSignal> {
        self.life.poll_signal()
    }
    pub(crate) fn has_signal(&self) -> bool {
        self.life.has_signal()
    }
}
