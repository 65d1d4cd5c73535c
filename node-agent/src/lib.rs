//! The kube-dmvpn node agent: configuration, control socket, CLI rendering and the run loop.

pub mod config;
