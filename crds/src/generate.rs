//! Rendering of the CRD YAML files committed under `crds/yaml/`.

use kube::CustomResourceExt;

use crate::{DmvpnHub, DmvpnSpoke};

/// The command that regenerates the committed YAML.
pub const REGENERATE_COMMAND: &str = "cargo run -p dmvpn-crds --bin crdgen -- --write";

/// A generated file: its path relative to the `crds/` directory, and its content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GeneratedFile {
    pub path: &'static str,
    pub content: String,
}

fn render(crd: &impl serde::Serialize) -> Result<String, serde_yaml::Error> {
    Ok(format!(
        "# Generated from the Rust types in crds/src by `{REGENERATE_COMMAND}`. Do not edit.\n{}",
        serde_yaml::to_string(crd)?
    ))
}

/// The CustomResourceDefinitions, rendered as they are committed.
pub fn generated_files() -> Result<Vec<GeneratedFile>, serde_yaml::Error> {
    Ok(vec![
        GeneratedFile {
            path: "yaml/dmvpnhubs.yaml",
            content: render(&DmvpnHub::crd())?,
        },
        GeneratedFile {
            path: "yaml/dmvpnspokes.yaml",
            content: render(&DmvpnSpoke::crd())?,
        },
    ])
}
