//! The kube-dmvpn operator: tunnel address allocation, the certificate authority, status.
//!
//! - [`pki`]: certificate issuance, the `dmvpn-pki` crate (shared with the agent's CLI);
//! - [`ipam`]: tunnel address allocation records;
//! - [`certs`]: CA and site certificate secrets;
//! - [`reconcile`]: the DmvpnHub / DmvpnSpoke reconcilers;
//! - [`run`]: wiring (leader election, controllers, HTTP endpoints, shutdown);
//! - `fakeapi` (feature `fake-api`): an in-process Kubernetes API server for tests.

pub mod certs;
pub mod clock;
pub mod context;
#[cfg(feature = "fake-api")]
pub mod fakeapi;
pub mod http;
pub mod ipam;
pub mod leader;
pub mod metrics;
pub mod reconcile;
pub mod run;
#[cfg(feature = "fake-api")]
pub mod testing;

pub use context::Settings;
/// Certificate issuance lives in `dmvpn-pki`, shared with `dmvpn-agent cert`.
pub use dmvpn_pki as pki;
pub use run::{Options, RunError, run};
