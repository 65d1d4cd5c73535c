//! The kube-dmvpn node agent: configuration, control socket, CLI rendering and the run loop.

pub mod agent;
pub mod cli;
pub mod config;
pub mod control;
pub mod ipsec;
pub mod kernel;
pub mod render;
pub mod routes;
pub mod view;
