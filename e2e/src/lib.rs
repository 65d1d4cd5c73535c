//! The kube-dmvpn lab: network namespaces wired as a DMVPN (hubs, spokes, LANs behind the
//! spokes, an "internet" bridge), real `dmvpn-agent` processes, and the end-to-end checks
//! that `dmvpn-lab check` and the integration tests run.

pub mod agent;
pub mod bench;
pub mod checks;
pub mod cleanup;
pub mod lab;
pub mod netns;
