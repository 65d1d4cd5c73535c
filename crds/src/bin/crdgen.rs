//! Writes (or checks, or prints) the CRD YAML generated from the Rust types.
//!
//! ```text
//! cargo run -p dmvpn-crds --bin crdgen             # print all CRDs to stdout
//! cargo run -p dmvpn-crds --bin crdgen -- --write  # rewrite crds/yaml/*.yaml
//! cargo run -p dmvpn-crds --bin crdgen -- --check  # exit 1 if the committed files are stale
//! ```

use std::path::Path;
use std::process::ExitCode;

use dmvpn_crds::generate::{REGENERATE_COMMAND, generated_files};

fn main() -> ExitCode {
    let mode = std::env::args().nth(1);
    let files = match generated_files() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("crdgen: cannot render the CRDs: {e}");
            return ExitCode::FAILURE;
        }
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    match mode.as_deref() {
        None => {
            for (i, f) in files.iter().enumerate() {
                if i > 0 {
                    println!("---");
                }
                print!("{}", f.content);
            }
            ExitCode::SUCCESS
        }
        Some("--write") => {
            for f in &files {
                let path = root.join(f.path);
                if let Some(dir) = path.parent()
                    && let Err(e) = std::fs::create_dir_all(dir)
                {
                    eprintln!("crdgen: cannot create {}: {e}", dir.display());
                    return ExitCode::FAILURE;
                }
                if let Err(e) = std::fs::write(&path, &f.content) {
                    eprintln!("crdgen: cannot write {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
                println!("wrote {}", path.display());
            }
            ExitCode::SUCCESS
        }
        Some("--check") => {
            let mut stale = false;
            for f in &files {
                let path = root.join(f.path);
                if std::fs::read_to_string(&path).ok().as_deref() != Some(f.content.as_str()) {
                    eprintln!("crdgen: {} is stale or missing", path.display());
                    stale = true;
                }
            }
            if stale {
                eprintln!("crdgen: regenerate with `{REGENERATE_COMMAND}`");
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Some(other) => {
            eprintln!("crdgen: unknown argument {other:?}; use no argument, --write or --check");
            ExitCode::FAILURE
        }
    }
}
