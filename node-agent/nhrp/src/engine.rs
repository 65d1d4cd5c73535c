//! NHRP engine (being built).
