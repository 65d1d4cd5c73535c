//! Traffic Indication rate limiting: a GCRA token bucket per (source, destination) pair plus
//! a global bucket, with a bounded pair table.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::config::RedirectLimit;

/// One token bucket in GCRA form: `tat` is the theoretical arrival time of the next
/// conforming event; a burst of `burst` events is allowed ahead of it.
#[derive(Debug, Clone, Copy)]
struct Gcra {
    tat: Instant,
}

impl Gcra {
    fn check(&mut self, now: Instant, interval: Duration, burst: u32) -> bool {
        let tolerance = interval.saturating_mul(burst.saturating_sub(1));
        // Allowed when now >= tat - tolerance, written without going below the epoch.
        if now + tolerance < self.tat {
            return false;
        }
        self.tat = self.tat.max(now) + interval;
        true
    }

    fn idle(&self, now: Instant) -> bool {
        self.tat <= now
    }
}

/// Why a Traffic Indication was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limited {
    Pair,
    Global,
    TableFull,
}

#[derive(Debug)]
pub(crate) struct RedirectLimiter {
    cfg: RedirectLimit,
    pairs: HashMap<(IpAddr, IpAddr), Gcra>,
    global: Gcra,
}

impl RedirectLimiter {
    pub(crate) fn new(cfg: RedirectLimit, now: Instant) -> RedirectLimiter {
        RedirectLimiter {
            cfg,
            pairs: HashMap::new(),
            global: Gcra { tat: now },
        }
    }

    /// Takes a token for (src, dst) if both the pair and the global bucket have one.
    pub(crate) fn allow(&mut self, now: Instant, src: IpAddr, dst: IpAddr) -> Result<(), Limited> {
        let interval = self.cfg.interval;
        let burst = self.cfg.burst;
        if let Some(g) = self.pairs.get(&(src, dst)) {
            // Check without consuming first, so that a globally limited event does not use up
            // the pair's token.
            let mut probe = *g;
            if !probe.check(now, interval, burst) {
                return Err(Limited::Pair);
            }
        } else if self.pairs.len() >= self.cfg.max_pairs {
            self.pairs.retain(|_, g| !g.idle(now));
            if self.pairs.len() >= self.cfg.max_pairs {
                return Err(Limited::TableFull);
            }
        }
        let global_interval = Duration::from_secs(1) / self.cfg.global_per_second.max(1);
        if !self
            .global
            .check(now, global_interval, self.cfg.global_per_second)
        {
            return Err(Limited::Global);
        }
        let g = self.pairs.entry((src, dst)).or_insert(Gcra { tat: now });
        g.check(now, interval, burst);
        Ok(())
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.pairs.len()
    }

    pub(crate) fn clear(&mut self) {
        self.pairs.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn one_per_interval_per_pair() {
        let t0 = Instant::now();
        let mut l = RedirectLimiter::new(RedirectLimit::default(), t0);
        let (a, b, c) = (ip("10.0.0.1"), ip("10.0.0.2"), ip("10.0.0.3"));
        assert_eq!(l.allow(t0, a, b), Ok(()));
        assert_eq!(
            l.allow(t0 + Duration::from_secs(9), a, b),
            Err(Limited::Pair)
        );
        // another pair is independent
        assert_eq!(l.allow(t0 + Duration::from_secs(1), a, c), Ok(()));
        assert_eq!(l.allow(t0 + Duration::from_secs(10), a, b), Ok(()));
    }

    #[test]
    fn burst_and_global_and_table_bound() {
        let t0 = Instant::now();
        let cfg = RedirectLimit {
            interval: Duration::from_secs(10),
            burst: 2,
            global_per_second: 3,
            max_pairs: 4,
        };
        let mut l = RedirectLimiter::new(cfg, t0);
        let a = ip("10.0.0.1");
        assert_eq!(l.allow(t0, a, ip("10.0.1.1")), Ok(()));
        assert_eq!(l.allow(t0, a, ip("10.0.1.1")), Ok(()));
        assert_eq!(l.allow(t0, a, ip("10.0.1.1")), Err(Limited::Pair));
        assert_eq!(l.allow(t0, a, ip("10.0.1.2")), Ok(()));
        assert_eq!(l.allow(t0, a, ip("10.0.1.3")), Err(Limited::Global));
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(l.allow(t1, a, ip("10.0.1.3")), Ok(()));
        assert_eq!(l.allow(t1, a, ip("10.0.1.4")), Ok(()));
        assert_eq!(l.len(), 4);
        assert_eq!(l.allow(t1, a, ip("10.0.1.5")), Err(Limited::TableFull));
        // once pairs go idle they are evicted to make room
        let t2 = t0 + Duration::from_secs(30);
        assert_eq!(l.allow(t2, a, ip("10.0.1.5")), Ok(()));
        assert_eq!(l.len(), 1);
    }
}
