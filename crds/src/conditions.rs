//! `status.conditions` helpers: condition types and reasons as constants, building a
//! [`Condition`], replacing one in a list while keeping `lastTransitionTime` when the status
//! did not change, and computing the roll-up `Ready` condition from the specific ones.
//!
//! Time is always passed in (`now`), so that callers and tests control the clock.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Condition types.
pub mod types {
    /// Roll-up: all conditions required for the kind are `True` for the current generation.
    pub const READY: &str = "Ready";
    /// The object has a tunnel address (allocated from the hub's tunnel network, or static).
    pub const ADDRESS_ASSIGNED: &str = "AddressAssigned";
    /// A certificate for the site is issued by the operator CA and not about to expire.
    pub const CERTIFICATE_READY: &str = "CertificateReady";
    /// Spoke: at least one of its agents has an NHRP registration with at least one hub.
    pub const REGISTERED: &str = "Registered";
    /// Hub: the NBMA addresses spokes use to reach the hub are known (from the spec or from
    /// the referenced Service's load-balancer status).
    pub const ENDPOINT_READY: &str = "EndpointReady";
    /// Spoke: works, but not with every hub it lists (e.g. one of two hubs is down).
    /// Not part of `Ready`.
    pub const DEGRADED: &str = "Degraded";
}

/// Condition reasons (CamelCase, as the API server requires).
pub mod reasons {
    /// `Ready` is `True`.
    pub const ALL_CONDITIONS_MET: &str = "AllConditionsMet";
    /// A required condition is missing or older than the current generation.
    pub const RECONCILING: &str = "Reconciling";
    /// The spec passed the schema but cannot be acted on (the message says why).
    pub const INVALID_SPEC: &str = "InvalidSpec";

    /// `AddressAssigned=True`: allocated from the pool.
    pub const ADDRESS_ALLOCATED: &str = "Allocated";
    /// `AddressAssigned=True`: the address requested in the spec is in use.
    pub const ADDRESS_STATIC: &str = "StaticAddress";
    /// `AddressAssigned=False`: the hub's tunnel network has no free address left.
    pub const POOL_EXHAUSTED: &str = "PoolExhausted";
    /// `AddressAssigned=False`: the requested address is held by another site.
    pub const ADDRESS_CONFLICT: &str = "AddressConflict";
    /// `AddressAssigned=False`: the spoke's primary hub does not exist.
    pub const HUB_NOT_FOUND: &str = "HubNotFound";

    /// `CertificateReady=True`.
    pub const CERTIFICATE_ISSUED: &str = "Issued";
    /// `CertificateReady=False`: the CA secret is missing or unusable.
    pub const CA_NOT_READY: &str = "CANotReady";
    /// `CertificateReady=False`: issuing failed (the message says why).
    pub const CERTIFICATE_ISSUE_FAILED: &str = "IssueFailed";
    /// `CertificateReady=False`: the certificate needs the tunnel address first.
    pub const WAITING_FOR_ADDRESS: &str = "WaitingForAddress";
    /// `CertificateReady=False`: the certificate has expired and was not renewed.
    pub const CERTIFICATE_EXPIRED: &str = "Expired";

    /// `Registered=True`.
    pub const REGISTERED: &str = "Registered";
    /// `Registered=False`: agents run but no hub accepted a registration.
    pub const NOT_REGISTERED: &str = "NotRegistered";
    /// `Registered=False`: no node matches the spoke's node selection.
    pub const NO_NODES: &str = "NoNodesSelected";
    /// `Registered=Unknown`: no agent has reported yet.
    pub const WAITING_FOR_AGENTS: &str = "WaitingForAgents";

    /// `EndpointReady=True`: addresses from `spec.endpoint.addresses`.
    pub const STATIC_ADDRESSES: &str = "StaticAddresses";
    /// `EndpointReady=True`: addresses from the Service's load-balancer status.
    pub const SERVICE_ADDRESS: &str = "ServiceAddress";
    /// `EndpointReady=False`: the referenced Service does not exist.
    pub const SERVICE_NOT_FOUND: &str = "ServiceNotFound";
    /// `EndpointReady=False`: the Service has no load-balancer address yet.
    pub const SERVICE_ADDRESS_PENDING: &str = "ServiceAddressPending";

    /// `Degraded=True`: some listed hubs are unreachable.
    pub const HUBS_UNREACHABLE: &str = "HubsUnreachable";
    /// `Degraded=False`.
    pub const ALL_HUBS_REACHABLE: &str = "AllHubsReachable";
}

/// The conditions that make up `Ready` on a `DmvpnHub`.
pub const HUB_READY_REQUIRES: &[&str] = &[
    types::ADDRESS_ASSIGNED,
    types::CERTIFICATE_READY,
    types::ENDPOINT_READY,
];

/// The conditions that make up `Ready` on a `DmvpnSpoke`.
pub const SPOKE_READY_REQUIRES: &[&str] = &[
    types::ADDRESS_ASSIGNED,
    types::CERTIFICATE_READY,
    types::REGISTERED,
];

/// Most conditions a status may hold (the CRD schema enforces the same bound).
pub const MAX_CONDITIONS: usize = 16;
/// Longest condition message the API server accepts, in bytes.
pub const MAX_MESSAGE_LEN: usize = 32768;

/// The status of a condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

impl ConditionStatus {
    /// The wire form: `"True"`, `"False"` or `"Unknown"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionStatus::True => "True",
            ConditionStatus::False => "False",
            ConditionStatus::Unknown => "Unknown",
        }
    }

    /// Parses the wire form; anything else is `Unknown`.
    pub fn parse(s: &str) -> Self {
        match s {
            "True" => ConditionStatus::True,
            "False" => ConditionStatus::False,
            _ => ConditionStatus::Unknown,
        }
    }
}

impl From<bool> for ConditionStatus {
    fn from(b: bool) -> Self {
        if b {
            ConditionStatus::True
        } else {
            ConditionStatus::False
        }
    }
}

/// The current time as a Kubernetes `Time`.
pub fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// Builds a condition. The message is cut (at a character boundary) to what the API server
/// accepts, so an unexpectedly long error text cannot make the status patch fail.
pub fn new_condition(
    type_: &str,
    status: ConditionStatus,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
    now: Time,
) -> Condition {
    let mut message = message.into();
    if message.len() > MAX_MESSAGE_LEN {
        let mut cut = MAX_MESSAGE_LEN;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
    }
    Condition {
        type_: type_.to_owned(),
        status: status.as_str().to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation,
        last_transition_time: now,
    }
}

/// The condition of type `type_`, if present.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition of type `type_` is present and `True`.
pub fn is_condition_true(conditions: &[Condition], type_: &str) -> bool {
    find_condition(conditions, type_).is_some_and(|c| c.status == "True")
}

/// Inserts `new`, or replaces the condition of the same type. If the status is unchanged the
/// old `lastTransitionTime` is kept (it records when the status last changed, not when it was
/// last written). Returns whether anything changed, so the caller can skip a no-op patch.
pub fn set_condition(conditions: &mut Vec<Condition>, mut new: Condition) -> bool {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(old) => {
            if old.status == new.status {
                new.last_transition_time = old.last_transition_time.clone();
            }
            if *old == new {
                return false;
            }
            *old = new;
            true
        }
        None => {
            conditions.push(new);
            true
        }
    }
}

/// Removes the condition of type `type_`; returns whether it was present.
pub fn remove_condition(conditions: &mut Vec<Condition>, type_: &str) -> bool {
    let before = conditions.len();
    conditions.retain(|c| c.type_ != type_);
    conditions.len() != before
}

/// Computes the roll-up `Ready` condition for an object at `generation` from the `required`
/// condition types (see [`HUB_READY_REQUIRES`] and [`SPOKE_READY_REQUIRES`]):
/// - the first required condition that is `False` makes `Ready=False` with that condition's
///   reason, and a message naming the condition;
/// - otherwise, a required condition that is missing, `Unknown`, or was written for an older
///   generation makes `Ready=Unknown` (reason `Reconciling`, or the condition's own reason);
/// - otherwise `Ready=True` with reason `AllConditionsMet`.
pub fn ready_condition(
    conditions: &[Condition],
    required: &[&str],
    generation: Option<i64>,
    now: Time,
) -> Condition {
    let mk = |status, reason: &str, message: String| {
        new_condition(
            types::READY,
            status,
            reason,
            message,
            generation,
            now.clone(),
        )
    };
    let mut pending: Option<Condition> = None;
    for &t in required {
        let Some(c) = find_condition(conditions, t) else {
            pending.get_or_insert_with(|| {
                mk(
                    ConditionStatus::Unknown,
                    reasons::RECONCILING,
                    format!("{t}: not reported yet"),
                )
            });
            continue;
        };
        let stale = match (c.observed_generation, generation) {
            (Some(seen), Some(current)) => seen < current,
            _ => false,
        };
        match ConditionStatus::parse(&c.status) {
            ConditionStatus::False if !stale => {
                return mk(
                    ConditionStatus::False,
                    &c.reason,
                    format!("{t}: {}", c.message),
                );
            }
            ConditionStatus::True if !stale => {}
            _ => {
                pending.get_or_insert_with(|| {
                    if stale {
                        mk(
                            ConditionStatus::Unknown,
                            reasons::RECONCILING,
                            format!("{t}: not yet evaluated for the current generation"),
                        )
                    } else {
                        mk(
                            ConditionStatus::Unknown,
                            &c.reason,
                            format!("{t}: {}", c.message),
                        )
                    }
                });
            }
        }
    }
    pending.unwrap_or_else(|| {
        mk(
            ConditionStatus::True,
            reasons::ALL_CONDITIONS_MET,
            format!("{} are True", required.join(", ")),
        )
    })
}

/// Recomputes `Ready` with [`ready_condition`] and stores it with [`set_condition`].
/// Returns whether anything changed.
pub fn set_ready(
    conditions: &mut Vec<Condition>,
    required: &[&str],
    generation: Option<i64>,
    now: Time,
) -> bool {
    let ready = ready_condition(conditions, required, generation, now);
    set_condition(conditions, ready)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn t(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    fn cond(type_: &str, status: ConditionStatus, reason: &str, gen_: i64, at: i64) -> Condition {
        new_condition(type_, status, reason, "msg", Some(gen_), t(at))
    }

    #[test]
    fn set_condition_keeps_transition_time_when_status_unchanged() {
        let mut cs = Vec::new();
        assert!(set_condition(
            &mut cs,
            cond(types::REGISTERED, ConditionStatus::False, "A", 1, 100)
        ));
        // same status, new reason: updated but the transition time stays
        assert!(set_condition(
            &mut cs,
            cond(types::REGISTERED, ConditionStatus::False, "B", 2, 200)
        ));
        assert_eq!(cs.len(), 1);
        assert_eq!(cs[0].reason, "B");
        assert_eq!(cs[0].observed_generation, Some(2));
        assert_eq!(cs[0].last_transition_time, t(100));
        // identical content written later: no change reported
        assert!(!set_condition(
            &mut cs,
            cond(types::REGISTERED, ConditionStatus::False, "B", 2, 300)
        ));
        assert_eq!(cs[0].last_transition_time, t(100));
        // status flips: the transition time moves
        assert!(set_condition(
            &mut cs,
            cond(types::REGISTERED, ConditionStatus::True, "C", 2, 400)
        ));
        assert_eq!(cs[0].last_transition_time, t(400));
        assert_eq!(cs[0].status, "True");
    }

    #[test]
    fn set_condition_appends_other_types() {
        let mut cs = vec![cond(types::READY, ConditionStatus::True, "X", 1, 1)];
        assert!(set_condition(
            &mut cs,
            cond(types::DEGRADED, ConditionStatus::False, "Y", 1, 2)
        ));
        assert_eq!(cs.len(), 2);
        assert!(remove_condition(&mut cs, types::DEGRADED));
        assert!(!remove_condition(&mut cs, types::DEGRADED));
        assert_eq!(cs.len(), 1);
    }

    #[test]
    fn ready_rolls_up() {
        let req = SPOKE_READY_REQUIRES;
        let mut cs = vec![
            cond(
                types::ADDRESS_ASSIGNED,
                ConditionStatus::True,
                "Allocated",
                3,
                1,
            ),
            cond(
                types::CERTIFICATE_READY,
                ConditionStatus::True,
                "Issued",
                3,
                1,
            ),
        ];
        // Registered missing: Unknown / Reconciling
        let r = ready_condition(&cs, req, Some(3), t(10));
        assert_eq!(r.status, "Unknown");
        assert_eq!(r.reason, reasons::RECONCILING);
        assert_eq!(r.observed_generation, Some(3));
        assert!(r.message.contains("Registered"), "{}", r.message);

        cs.push(cond(
            types::REGISTERED,
            ConditionStatus::True,
            "Registered",
            3,
            1,
        ));
        let r = ready_condition(&cs, req, Some(3), t(10));
        assert_eq!(r.status, "True");
        assert_eq!(r.reason, reasons::ALL_CONDITIONS_MET);

        // a False condition wins over a stale one and carries its reason
        set_condition(
            &mut cs,
            cond(
                types::CERTIFICATE_READY,
                ConditionStatus::False,
                "CANotReady",
                3,
                2,
            ),
        );
        let r = ready_condition(&cs, req, Some(4), t(10));
        assert_eq!(r.status, "Unknown", "all were written for generation 3");
        let r = ready_condition(&cs, req, Some(3), t(10));
        assert_eq!(r.status, "False");
        assert_eq!(r.reason, "CANotReady");
        assert!(r.message.starts_with("CertificateReady: "), "{}", r.message);
    }

    #[test]
    fn set_ready_keeps_time_across_reconciles() {
        let mut cs = vec![
            cond(types::ADDRESS_ASSIGNED, ConditionStatus::True, "A", 1, 1),
            cond(types::CERTIFICATE_READY, ConditionStatus::True, "B", 1, 1),
            cond(types::ENDPOINT_READY, ConditionStatus::True, "C", 1, 1),
        ];
        assert!(set_ready(&mut cs, HUB_READY_REQUIRES, Some(1), t(50)));
        assert!(!set_ready(&mut cs, HUB_READY_REQUIRES, Some(1), t(60)));
        let ready = find_condition(&cs, types::READY).unwrap();
        assert_eq!(ready.last_transition_time, t(50));
        assert!(is_condition_true(&cs, types::READY));
    }

    #[test]
    fn long_messages_are_cut_at_a_char_boundary() {
        let msg = "é".repeat(MAX_MESSAGE_LEN); // 2 bytes each
        let c = new_condition(types::READY, ConditionStatus::False, "X", msg, None, t(0));
        assert!(c.message.len() <= MAX_MESSAGE_LEN);
        assert!(c.message.len() >= MAX_MESSAGE_LEN - 1);
        assert!(c.message.chars().all(|ch| ch == 'é'));
    }

    /// What the API server's metav1.Condition validation accepts for `type` and `reason`.
    fn is_camel_identifier(s: &str) -> bool {
        let b = s.as_bytes();
        !b.is_empty()
            && s.len() <= 316
            && b[0].is_ascii_alphabetic()
            && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
    }

    #[test]
    fn types_and_reasons_are_valid_identifiers() {
        let all = [
            types::READY,
            types::ADDRESS_ASSIGNED,
            types::CERTIFICATE_READY,
            types::REGISTERED,
            types::ENDPOINT_READY,
            types::DEGRADED,
            reasons::ALL_CONDITIONS_MET,
            reasons::RECONCILING,
            reasons::INVALID_SPEC,
            reasons::ADDRESS_ALLOCATED,
            reasons::ADDRESS_STATIC,
            reasons::POOL_EXHAUSTED,
            reasons::ADDRESS_CONFLICT,
            reasons::HUB_NOT_FOUND,
            reasons::CERTIFICATE_ISSUED,
            reasons::CA_NOT_READY,
            reasons::CERTIFICATE_ISSUE_FAILED,
            reasons::WAITING_FOR_ADDRESS,
            reasons::CERTIFICATE_EXPIRED,
            reasons::REGISTERED,
            reasons::NOT_REGISTERED,
            reasons::NO_NODES,
            reasons::WAITING_FOR_AGENTS,
            reasons::STATIC_ADDRESSES,
            reasons::SERVICE_ADDRESS,
            reasons::SERVICE_NOT_FOUND,
            reasons::SERVICE_ADDRESS_PENDING,
            reasons::HUBS_UNREACHABLE,
            reasons::ALL_HUBS_REACHABLE,
        ];
        for s in all {
            assert!(is_camel_identifier(s), "{s:?}");
        }
        assert!(!is_camel_identifier("Not Ready"));
        assert!(!is_camel_identifier("9Lives"));
    }

    #[test]
    fn status_parse_roundtrip() {
        for s in [
            ConditionStatus::True,
            ConditionStatus::False,
            ConditionStatus::Unknown,
        ] {
            assert_eq!(ConditionStatus::parse(s.as_str()), s);
        }
        assert_eq!(ConditionStatus::parse("yes"), ConditionStatus::Unknown);
        assert_eq!(ConditionStatus::from(true), ConditionStatus::True);
    }
}
