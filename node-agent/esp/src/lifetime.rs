//! SA lifetimes: soft limits ask for a rekey, hard limits stop the SA.

use std::time::{Duration, Instant};

use crate::error::ConfigError;

/// Which limit a lifetime signal or expiry refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LimitKind {
    Time,
    Bytes,
    Packets,
    /// The sequence number space (2^32 - 1 packets without ESN, 2^64 - 1 with ESN).
    SequenceNumbers,
}

impl std::fmt::Display for LimitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LimitKind::Time => "time",
            LimitKind::Bytes => "bytes",
            LimitKind::Packets => "packets",
            LimitKind::SequenceNumbers => "sequence number",
        })
    }
}

/// Lifetime limits of one SA. `None` means no limit of that kind. A hard limit without a soft
/// one gets a soft limit at 7/8 of it, so a rekey is always asked for before traffic stops.
/// Independently of these, the sequence number space has a soft limit at 7/8 and a hard limit at
/// its end (outbound SAs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetime {
    pub soft_time: Option<Duration>,
    pub hard_time: Option<Duration>,
    /// Payload bytes (plaintext handed to seal / returned by open).
    pub soft_bytes: Option<u64>,
    pub hard_bytes: Option<u64>,
    pub soft_packets: Option<u64>,
    pub hard_packets: Option<u64>,
}

impl Default for Lifetime {
    /// Rekey after 50 minutes, expire after 60; no byte or packet limits besides the sequence
    /// number space.
    fn default() -> Self {
        Lifetime {
            soft_time: Some(Duration::from_secs(50 * 60)),
            hard_time: Some(Duration::from_secs(60 * 60)),
            soft_bytes: None,
            hard_bytes: None,
            soft_packets: None,
            hard_packets: None,
        }
    }
}

impl Lifetime {
    /// No limits at all except the sequence number space.
    pub const UNLIMITED: Lifetime = Lifetime {
        soft_time: None,
        hard_time: None,
        soft_bytes: None,
        hard_bytes: None,
        soft_packets: None,
        hard_packets: None,
    };

    /// Checks that no limit is zero and every soft limit is below its hard limit.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let ms = |d: Option<Duration>| d.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        check_pair(LimitKind::Time, ms(self.soft_time), ms(self.hard_time))?;
        check_pair(LimitKind::Bytes, self.soft_bytes, self.hard_bytes)?;
        check_pair(LimitKind::Packets, self.soft_packets, self.hard_packets)
    }
}

fn check_pair(limit: LimitKind, soft: Option<u64>, hard: Option<u64>) -> Result<(), ConfigError> {
    if soft == Some(0) || hard == Some(0) {
        return Err(ConfigError::ZeroLifetime { limit });
    }
    if let (Some(soft), Some(hard)) = (soft, hard)
        && soft >= hard
    {
        return Err(ConfigError::SoftNotBeforeHard { limit, soft, hard });
    }
    Ok(())
}

/// A lifetime event of one SA, reported once each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SaSignal {
    /// A soft limit was reached: negotiate a replacement SA now.
    RekeyNeeded(LimitKind),
    /// A hard limit was reached: the SA refuses every further packet; delete it.
    Expired(LimitKind),
}

/// 7/8 of a limit: the default soft point.
const fn seven_eighths(x: u64) -> u64 {
    x - x / 8
}

#[derive(Clone, Debug)]
pub(crate) struct Tracker {
    soft_deadline: Option<Instant>,
    hard_deadline: Option<Instant>,
    soft_bytes: u64,
    hard_bytes: u64,
    soft_packets: u64,
    hard_packets: u64,
    bytes: u64,
    packets: u64,
    soft: Option<LimitKind>,
    hard: Option<LimitKind>,
    soft_reported: bool,
    hard_reported: bool,
}

impl Tracker {
    pub(crate) fn new(life: &Lifetime, now: Instant) -> Tracker {
        let soft_time = life.soft_time.or_else(|| life.hard_time.map(|h| h - h / 8));
        let deadline = |d: Option<Duration>| d.and_then(|d| now.checked_add(d));
        let soft_or_derived = |soft: Option<u64>, hard: Option<u64>| {
            soft.or(hard.map(seven_eighths)).unwrap_or(u64::MAX)
        };
        Tracker {
            soft_deadline: deadline(soft_time),
            hard_deadline: deadline(life.hard_time),
            soft_bytes: soft_or_derived(life.soft_bytes, life.hard_bytes),
            hard_bytes: life.hard_bytes.unwrap_or(u64::MAX),
            soft_packets: soft_or_derived(life.soft_packets, life.hard_packets),
            hard_packets: life.hard_packets.unwrap_or(u64::MAX),
            bytes: 0,
            packets: 0,
            soft: None,
            hard: None,
            soft_reported: false,
            hard_reported: false,
        }
    }

    /// Outbound: the sequence number `seq` was just used, `seq_max` is the last usable one.
    /// Asks for a rekey at 7/8 of the space and expires when it is used up.
    #[inline]
    pub(crate) fn note_seq(&mut self, seq: u64, seq_max: u64) {
        if seq >= seven_eighths(seq_max) {
            self.fire_soft(LimitKind::SequenceNumbers);
        }
        if seq >= seq_max {
            self.fire_hard(LimitKind::SequenceNumbers);
        }
    }

    fn fire_soft(&mut self, kind: LimitKind) {
        if self.soft.is_none() {
            self.soft = Some(kind);
        }
    }

    fn fire_hard(&mut self, kind: LimitKind) {
        // A jump past both limits still asks for the rekey first.
        self.fire_soft(kind);
        if self.hard.is_none() {
            self.hard = Some(kind);
        }
    }

    /// Before processing a packet: refuses once a hard limit is reached.
    #[inline]
    pub(crate) fn admit(&mut self, now: Instant) -> Result<(), LimitKind> {
        if let Some(kind) = self.hard {
            return Err(kind);
        }
        self.check_time(now);
        if self.packets >= self.hard_packets {
            self.fire_hard(LimitKind::Packets);
        } else if self.bytes >= self.hard_bytes {
            self.fire_hard(LimitKind::Bytes);
        }
        match self.hard {
            Some(kind) => Err(kind),
            None => Ok(()),
        }
    }

    /// After a packet was processed.
    #[inline]
    pub(crate) fn record(&mut self, bytes: usize) {
        self.packets = self.packets.saturating_add(1);
        self.bytes = self
            .bytes
            .saturating_add(u64::try_from(bytes).unwrap_or(u64::MAX));
        if self.packets >= self.soft_packets {
            self.fire_soft(LimitKind::Packets);
        }
        if self.bytes >= self.soft_bytes {
            self.fire_soft(LimitKind::Bytes);
        }
        // Expire as soon as the limit is used up, so the signal precedes the next refused packet.
        if self.packets >= self.hard_packets {
            self.fire_hard(LimitKind::Packets);
        }
        if self.bytes >= self.hard_bytes {
            self.fire_hard(LimitKind::Bytes);
        }
    }

    #[inline]
    pub(crate) fn check_time(&mut self, now: Instant) {
        if self.hard_deadline.is_some_and(|d| now >= d) {
            self.fire_hard(LimitKind::Time);
        } else if self.soft_deadline.is_some_and(|d| now >= d) {
            self.fire_soft(LimitKind::Time);
        }
    }

    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        if self.soft.is_none() {
            self.soft_deadline.or(self.hard_deadline)
        } else if self.hard.is_none() {
            self.hard_deadline
        } else {
            None
        }
    }

    #[inline]
    pub(crate) fn has_signal(&self) -> bool {
        (self.soft.is_some() && !self.soft_reported) || (self.hard.is_some() && !self.hard_reported)
    }

    pub(crate) fn poll_signal(&mut self) -> Option<SaSignal> {
        if let Some(kind) = self.soft
            && !self.soft_reported
        {
            self.soft_reported = true;
            return Some(SaSignal::RekeyNeeded(kind));
        }
        if let Some(kind) = self.hard
            && !self.hard_reported
        {
            self.hard_reported = true;
            return Some(SaSignal::Expired(kind));
        }
        None
    }

    pub(crate) fn rekey_needed(&self) -> bool {
        self.soft.is_some()
    }

    pub(crate) fn expired(&self) -> bool {
        self.hard.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_defaults_to_seven_eighths_of_hard() {
        let now = Instant::now();
        let life = Lifetime {
            hard_packets: Some(800),
            ..Lifetime::UNLIMITED
        };
        let mut t = Tracker::new(&life, now);
        for _ in 0..699 {
            t.admit(now).unwrap();
            t.record(1);
        }
        assert!(!t.rekey_needed());
        t.admit(now).unwrap();
        t.record(1);
        assert_eq!(
            t.poll_signal(),
            Some(SaSignal::RekeyNeeded(LimitKind::Packets))
        );
        assert_eq!(t.poll_signal(), None);
    }

    #[test]
    fn sequence_space_soft_then_hard() {
        let now = Instant::now();
        let max = u64::from(u32::MAX);
        let mut t = Tracker::new(&Lifetime::UNLIMITED, now);
        t.note_seq(seven_eighths(max) - 1, max);
        assert!(!t.rekey_needed());
        t.note_seq(seven_eighths(max), max);
        assert_eq!(
            t.poll_signal(),
            Some(SaSignal::RekeyNeeded(LimitKind::SequenceNumbers))
        );
        assert!(t.admit(now).is_ok());
        t.note_seq(max, max);
        assert_eq!(t.admit(now), Err(LimitKind::SequenceNumbers));
        assert_eq!(
            t.poll_signal(),
            Some(SaSignal::Expired(LimitKind::SequenceNumbers))
        );
    }

    #[test]
    fn validate_rejects_bad_pairs() {
        let bad = Lifetime {
            soft_bytes: Some(10),
            hard_bytes: Some(10),
            ..Lifetime::UNLIMITED
        };
        assert!(matches!(
            bad.validate(),
            Err(ConfigError::SoftNotBeforeHard {
                limit: LimitKind::Bytes,
                ..
            })
        ));
        let zero = Lifetime {
            hard_time: Some(Duration::ZERO),
            ..Lifetime::UNLIMITED
        };
        assert!(matches!(
            zero.validate(),
            Err(ConfigError::ZeroLifetime {
                limit: LimitKind::Time
            })
        ));
        assert!(Lifetime::default().validate().is_ok());
    }

    #[test]
    fn time_jump_past_hard_reports_both() {
        let now = Instant::now();
        let mut t = Tracker::new(&Lifetime::default(), now);
        assert_eq!(t.next_deadline(), Some(now + Duration::from_secs(3000)));
        assert_eq!(
            t.admit(now + Duration::from_secs(4000)),
            Err(LimitKind::Time)
        );
        assert_eq!(
            t.poll_signal(),
            Some(SaSignal::RekeyNeeded(LimitKind::Time))
        );
        assert_eq!(t.poll_signal(), Some(SaSignal::Expired(LimitKind::Time)));
        assert_eq!(t.next_deadline(), None);
    }
}
