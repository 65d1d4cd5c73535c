//! Counters: messages received and sent per type, drops per reason, protocol outcomes.

use std::collections::BTreeMap;

use crate::wire::Op;

/// Why a received packet (or a would-be Traffic Indication) was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// ar$chksum does not match.
    BadChecksum,
    /// Authentication extension missing or password mismatch.
    BadAuth,
    /// Not a valid NHRP packet (other than the checksum).
    DecodeError,
    /// Our own address is in the transit records: the packet went round in a loop.
    Loop,
    /// Hop count exhausted.
    HopCount,
    /// Valid but not expected here (wrong role or phase, unknown request id, foreign family,
    /// Error Indication from ourselves, after shutdown).
    Unexpected,
    /// Traffic Indication suppressed by the redirect rate limit.
    RateLimited,
}

impl DropReason {
    pub const ALL: [DropReason; 7] = [
        DropReason::BadChecksum,
        DropReason::BadAuth,
        DropReason::DecodeError,
        DropReason::Loop,
        DropReason::HopCount,
        DropReason::Unexpected,
        DropReason::RateLimited,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::BadChecksum => "bad checksum",
            DropReason::BadAuth => "authentication failure (nhrp_auth mismatch or missing)",
            DropReason::DecodeError => "malformed NHRP packet",
            DropReason::Loop => "loop detected",
            DropReason::HopCount => "hop count exceeded",
            DropReason::Unexpected => "unexpected packet",
            DropReason::RateLimited => "traffic indication rate-limited",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

pub(crate) const OPS: [Op; 8] = [
    Op::ResolutionRequest,
    Op::ResolutionReply,
    Op::RegistrationRequest,
    Op::RegistrationReply,
    Op::PurgeRequest,
    Op::PurgeReply,
    Op::ErrorIndication,
    Op::TrafficIndication,
];

fn op_name(op: Op) -> &'static str {
    match op {
        Op::ResolutionRequest => "resolution_request",
        Op::ResolutionReply => "resolution_reply",
        Op::RegistrationRequest => "registration_request",
        Op::RegistrationReply => "registration_reply",
        Op::PurgeRequest => "purge_request",
        Op::PurgeReply => "purge_reply",
        Op::ErrorIndication => "error_indication",
        Op::TrafficIndication => "traffic_indication",
    }
}

/// Received and sent count of one message type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RxTx {
    pub rx: u64,
    pub tx: u64,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Stats {
    msgs: [RxTx; 8],
    drops: [u64; 7],
    pub(crate) registrations_rejected: u64,
    pub(crate) errors_sent: u64,
    pub(crate) encode_failures: u64,
    pub(crate) shortcuts_installed: u64,
    pub(crate) resolutions_failed: u64,
}

impl Stats {
    fn slot(op: Op) -> usize {
        (op as usize).saturating_sub(1).min(7)
    }
    pub(crate) fn rx(&mut self, op: Op) {
        if let Some(c) = self.msgs.get_mut(Self::slot(op)) {
            c.rx += 1;
        }
    }
    pub(crate) fn tx(&mut self, op: Op) {
        if let Some(c) = self.msgs.get_mut(Self::slot(op)) {
            c.tx += 1;
        }
    }
    pub(crate) fn drop(&mut self, r: DropReason) {
        if let Some(c) = self.drops.get_mut(r.index()) {
            *c += 1;
        }
    }
    pub(crate) fn drops(&self, r: DropReason) -> u64 {
        self.drops.get(r.index()).copied().unwrap_or(0)
    }

    pub(crate) fn snapshot(&self) -> Counters {
        Counters {
            messages: OPS
                .iter()
                .map(|&op| {
                    let c = self.msgs.get(Self::slot(op)).copied().unwrap_or_default();
                    (op_name(op), c)
                })
                .collect(),
            drops: DropReason::ALL
                .iter()
                .map(|&r| (r, self.drops(r)))
                .collect(),
            registrations_rejected: self.registrations_rejected,
            errors_sent: self.errors_sent,
            encode_failures: self.encode_failures,
            shortcuts_installed: self.shortcuts_installed,
            resolutions_failed: self.resolutions_failed,
        }
    }
}

/// Counters as shown by `show` commands.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    /// Per message type (snake_case name): received and sent.
    pub messages: BTreeMap<&'static str, RxTx>,
    /// Received packets dropped, per reason.
    pub drops: BTreeMap<DropReason, u64>,
    /// Registration Reply CIEs with a non-zero code (e.g. 14) received.
    pub registrations_rejected: u64,
    /// Error Indications sent.
    pub errors_sent: u64,
    /// Packets the engine built but could not encode (a bug if non-zero).
    pub encode_failures: u64,
    pub shortcuts_installed: u64,
    /// Resolutions that ended without a shortcut (negative reply, error or timeout).
    pub resolutions_failed: u64,
}

impl Counters {
    /// Received count of one message type.
    pub fn rx(&self, op: Op) -> u64 {
        self.messages.get(op_name(op)).map_or(0, |c| c.rx)
    }
    /// Sent count of one message type.
    pub fn tx(&self, op: Op) -> u64 {
        self.messages.get(op_name(op)).map_or(0, |c| c.tx)
    }
    pub fn dropped(&self, r: DropReason) -> u64 {
        self.drops.get(&r).copied().unwrap_or(0)
    }
}
