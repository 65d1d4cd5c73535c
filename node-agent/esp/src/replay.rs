//! Anti-replay window with extended sequence number inference (RFC 4303 §3.4.3, Appendix A2).

use crate::error::EspError;

/// Default anti-replay window, in packets.
pub const DEFAULT_REPLAY_WINDOW: u32 = 1024;
/// Smallest accepted window.
pub const MIN_REPLAY_WINDOW: u32 = 32;
/// Largest accepted window (bounds the bitmap at 8 KiB per SA).
pub const MAX_REPLAY_WINDOW: u32 = 65536;

/// Receiver state: the highest authenticated sequence number `top` (full 64 bits with ESN) and
/// a ring bitmap of the last `window` numbers. The ring has one more word than the window needs,
/// so advancing only ever clears whole words.
#[derive(Clone, Debug)]
pub(crate) struct ReplayWindow {
    top: u64,
    window: u64,
    esn: bool,
    ring: Box<[u64]>,
}

impl ReplayWindow {
    /// `window` must already be validated (MIN..=MAX).
    pub(crate) fn new(window: u32, esn: bool) -> ReplayWindow {
        let words = (window as usize).div_ceil(64) + 1;
        ReplayWindow {
            top: 0,
            window: u64::from(window),
            esn,
            ring: vec![0; words].into_boxed_slice(),
        }
    }

    /// Highest authenticated sequence number so far (0: none yet).
    pub(crate) fn top(&self) -> u64 {
        self.top
    }

    /// The full sequence number of a packet carrying `seq_low` (ESN: RFC 4303 Appendix A2.2).
    ///
    /// Picks the 64-bit number with these low bits nearest to the highest one seen (at most
    /// 2^31 behind or less than 2^31 ahead). For every packet inside the window or ahead of it
    /// by less than 2^31 this is exactly the Appendix A2.2 result; A2.2 would read a number
    /// just below the window as belonging to the next subspace, 2^32 - W ahead, and hand it to
    /// the ICV check, whereas here it is reported as too old without spending a decryption.
    /// `None`: it would lie before sequence number 0.
    #[inline]
    pub(crate) fn infer(&self, seq_low: u32) -> Option<u64> {
        if !self.esn {
            return Some(u64::from(seq_low));
        }
        let delta = seq_low.wrapping_sub(self.top as u32) as i32;
        self.top.checked_add_signed(i64::from(delta))
    }

    /// Cheap pre-authentication check; the window is only moved by [`Self::accept`].
    #[inline]
    pub(crate) fn check(&self, seq: u64) -> Result<(), EspError> {
        if seq == 0 {
            return Err(EspError::TooOld { seq });
        }
        if seq > self.top {
            return Ok(());
        }
        if seq.saturating_add(self.window) <= self.top {
            return Err(EspError::TooOld { seq });
        }
        let (word, bit) = self.slot(seq);
        match self.ring.get(word) {
            Some(w) if w & bit != 0 => Err(EspError::Replayed { seq }),
            _ => Ok(()),
        }
    }

    /// Records an authenticated packet. Re-checks, so a call without [`Self::check`] is safe.
    #[inline]
    pub(crate) fn accept(&mut self, seq: u64) -> Result<(), EspError> {
        self.check(seq)?;
        if seq > self.top {
            let words = self.ring.len() as u64;
            let from = self.top / 64;
            let steps = (seq / 64 - from).min(words);
            for i in 1..=steps {
                let idx = ((from + i) % words) as usize;
                if let Some(w) = self.ring.get_mut(idx) {
                    *w = 0;
                }
            }
            self.top = seq;
        }
        let (word, bit) = self.slot(seq);
        if let Some(w) = self.ring.get_mut(word) {
            *w |= bit;
        }
        Ok(())
    }

    #[inline]
    fn slot(&self, seq: u64) -> (usize, u64) {
        let words = self.ring.len() as u64;
        (((seq / 64) % words) as usize, 1u64 << (seq % 64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_duplicates_and_too_old() {
        let mut w = ReplayWindow::new(1024, false);
        for s in 1..=3000u64 {
            w.check(s).unwrap();
            w.accept(s).unwrap();
            assert_eq!(w.check(s), Err(EspError::Replayed { seq: s }));
        }
        assert_eq!(
            w.check(3000 - 1024),
            Err(EspError::TooOld { seq: 3000 - 1024 })
        );
        assert_eq!(
            w.check(3000 - 1023),
            Err(EspError::Replayed { seq: 3000 - 1023 })
        );
        assert_eq!(w.check(0), Err(EspError::TooOld { seq: 0 }));
    }

    #[test]
    fn out_of_order_inside_window_accepted_once() {
        let mut w = ReplayWindow::new(1024, false);
        w.accept(2000).unwrap();
        // Everything in (2000-1024, 2000) is still acceptable, each exactly once.
        for s in (977..2000u64).rev() {
            w.accept(s).unwrap();
        }
        for s in 977..=2000u64 {
            assert_eq!(w.check(s), Err(EspError::Replayed { seq: s }));
        }
        assert_eq!(w.check(976), Err(EspError::TooOld { seq: 976 }));
    }

    #[test]
    fn big_jump_clears_stale_bits() {
        let mut w = ReplayWindow::new(1024, false);
        for s in 1..=1024u64 {
            w.accept(s).unwrap();
        }
        // Jump by exactly the ring size in bits: stale bits must not alias into the new window.
        let ring_bits = 64 * (1024 / 64 + 1);
        w.accept(1024 + ring_bits).unwrap();
        for s in (ring_bits + 1)..(1024 + ring_bits) {
            assert!(w.check(s).is_ok(), "seq {s} wrongly flagged");
        }
    }

    #[test]
    fn esn_inference_across_wrap() {
        let mut w = ReplayWindow::new(1024, true);
        let base = (1u64 << 32) - 10;
        w.accept(base).unwrap();
        // Low bits wrapped to small values: next subspace.
        assert_eq!(w.infer(5), Some((1u64 << 32) + 5));
        // Slightly older numbers in the same subspace.
        assert_eq!(w.infer(u32::MAX - 100), Some(u64::from(u32::MAX - 100)));
        w.accept((1u64 << 32) + 5).unwrap();
        // Now the window straddles: high low-bits mean the previous subspace.
        assert_eq!(w.infer(u32::MAX - 3), Some(u64::from(u32::MAX - 3)));
        assert_eq!(w.infer(6), Some((1u64 << 32) + 6));
        // Less than 2^31 ahead: this subspace.
        assert_eq!(w.infer(0x8000_0004), Some((1u64 << 32) + 0x8000_0004));
        // 2^31 or more ahead is read as behind (previous subspace), hence too old.
        assert_eq!(w.infer(0x8000_0005), Some(0x8000_0005));
        assert!(w.check(0x8000_0005).is_err());
        // Just below the window in the same subspace: too old (A2.2 would say next subspace).
        w.accept((1u64 << 32) + 5000).unwrap();
        assert_eq!(w.infer(3000), Some((1u64 << 32) + 3000));
        assert_eq!(
            w.check((1u64 << 32) + 3000),
            Err(EspError::TooOld {
                seq: (1u64 << 32) + 3000
            })
        );
    }

    #[test]
    fn esn_fresh_window_rejects_previous_subspace() {
        let w = ReplayWindow::new(1024, true);
        assert_eq!(w.infer(1), Some(1));
        assert_eq!(w.infer(0x7FFF_FFFF), Some(0x7FFF_FFFF));
        assert_eq!(w.infer(0x8000_0000), None);
        assert_eq!(w.infer(u32::MAX), None);
    }
}
