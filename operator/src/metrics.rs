//! Prometheus metrics of the operator (`dmvpn_operator_*`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The kind of object a metric is about.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

/// Per-hub series (hubs are few, so the label stays bounded).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HubLabel {
    pub hub: String,
}

/// Reconcile errors by kind and a bounded error class.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: &'static str,
    pub error: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub reconciliations: Family<KindLabel, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
    pub spokes_ready: Gauge,
    pub spokes_total: Gauge,
    pub addresses_allocated: Family<HubLabel, Gauge>,
    pub certificates_issued: Family<KindLabel, Counter>,
    pub certificate_rotations: Family<KindLabel, Counter>,
    pub allocation_conflicts: Counter,
    pub leader: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("dmvpn_operator");
        let m = Self {
            registry: Registry::default(),
            reconciliations: Family::default(),
            errors: Family::default(),
            spokes_ready: Gauge::default(),
            spokes_total: Gauge::default(),
            addresses_allocated: Family::default(),
            certificates_issued: Family::default(),
            certificate_rotations: Family::default(),
            allocation_conflicts: Counter::default(),
            leader: Gauge::default(),
        };
        registry.register(
            "reconciliations",
            "Reconciliations run, by kind",
            m.reconciliations.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconciliations that failed, by kind and error class",
            m.errors.clone(),
        );
        registry.register(
            "spokes_ready",
            "DmvpnSpokes whose Ready condition is True",
            m.spokes_ready.clone(),
        );
        registry.register("spokes", "DmvpnSpokes known", m.spokes_total.clone());
        registry.register(
            "addresses_allocated",
            "Tunnel addresses allocated, by hub",
            m.addresses_allocated.clone(),
        );
        registry.register(
            "certificates_issued",
            "Certificates issued (first issue and renewals), by kind",
            m.certificates_issued.clone(),
        );
        registry.register(
            "certificate_rotations",
            "Certificates renewed because 2/3 of their lifetime had passed, by kind",
            m.certificate_rotations.clone(),
        );
        registry.register(
            "allocation_conflicts",
            "Address allocation writes retried after a resourceVersion conflict",
            m.allocation_conflicts.clone(),
        );
        registry.register(
            "leader",
            "1 while this instance holds the leader lease",
            m.leader.clone(),
        );
        Self { registry, ..m }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_prefixed() {
        let m = Metrics::new();
        m.reconciliations
            .get_or_create(&KindLabel { kind: "spoke" })
            .inc();
        m.spokes_ready.set(3);
        let text = m.encode();
        assert!(
            text.contains("dmvpn_operator_reconciliations_total{kind=\"spoke\"} 1"),
            "{text}"
        );
        assert!(text.contains("dmvpn_operator_spokes_ready 3"), "{text}");
        assert!(text.contains("# EOF"));
    }
}
