//! Command line: `run`, `check-config`, the `show`/`clear` clients of the control socket, and
//! `cert` (the files around the shared `dmvpn-pki` issuing code).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use clap::{Args, Parser, Subcommand};
use dmvpn_pki::{CertificateAuthority, Identity, IdentityKind, PkiError};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::config::{self, DEFAULT_CONTROL_SOCKET};
use crate::control::{self, ClientError, Command};
use crate::render;
use crate::view::{CacheView, ClearView, DmvpnView, NhsListView};

/// Exit status: success.
pub const EXIT_OK: u8 = 0;
/// Exit status: an error (invalid configuration, agent error reply, run failure).
pub const EXIT_ERROR: u8 = 1;
/// Exit status: the command line is wrong (clap's own code).
pub const EXIT_USAGE: u8 = 2;
/// Exit status: the agent is not running (nothing listens on the control socket).
pub const EXIT_NOT_RUNNING: u8 = 3;

/// How long the CLI waits for the agent's reply.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Parser)]
#[command(
    name = "dmvpn-agent",
    version,
    about = "kube-dmvpn node agent: DMVPN hub (NHS) or spoke (NHC) over mGRE + NHRP",
    after_help = "Exit status: 0 ok, 1 error, 2 usage, 3 agent not running."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: TopCommand,
}

#[derive(Debug, Subcommand)]
pub enum TopCommand {
    /// Run the agent in the foreground until SIGINT or SIGTERM.
    Run {
        /// The TOML configuration file.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: PathBuf,
    },
    /// Validate a configuration file and exit (0 if valid).
    CheckConfig {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Show state of the running agent.
    Show {
        #[command(subcommand)]
        what: ShowCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Clear state of the running agent.
    Clear {
        #[command(subcommand)]
        what: ClearCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Certificates for IKE in standalone mode: a CA, and node certificates that carry the
    /// node's tunnel address.
    Cert {
        #[command(subcommand)]
        what: CertCommand,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum CertCommand {
    /// Create an ECDSA P-256 CA: DIR/ca.pem and DIR/ca.key.
    Ca {
        /// Directory to write into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Common name of the CA.
        #[arg(long, default_value = "kube-dmvpn CA")]
        name: String,
        /// Validity in days.
        #[arg(long, default_value_t = DEFAULT_CA_DAYS, value_parser = clap::value_parser!(u32).range(1..))]
        days: u32,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue a node certificate: OUT/NAME.pem, OUT/NAME.key and OUT/ca.pem; prints the
    /// `[ipsec]` section that uses them.
    Issue {
        /// Directory of the CA (ca.pem and ca.key, from `cert ca`).
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// The node's tunnel address (its IKE identity; peers check NHRP claims against it).
        #[arg(long, value_name = "IP")]
        tunnel_address: IpAddr,
        /// Node name: certificate CN, URI `dmvpn://KIND/NAME`, DNS name `NAME.KIND.dmvpn`, file
        /// names.
        #[arg(long)]
        name: String,
        /// What the node is: `hub` or `spoke` (in the URI and DNS name).
        #[arg(long, default_value = "spoke")]
        kind: IdentityKind,
        /// Directory to write into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = DEFAULT_NODE_DAYS, value_parser = clap::value_parser!(u32).range(1..))]
        days: u32,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
}

/// Default CA validity (`cert ca --days`).
pub const DEFAULT_CA_DAYS: u32 = 3650;
/// Default node certificate validity (`cert issue --days`).
pub const DEFAULT_NODE_DAYS: u32 = 365;
/// File names inside a CA directory.
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";

/// Why a `cert` command failed. Messages name the file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
}

fn file_err(path: &Path, message: impl Into<String>) -> CertError {
    CertError::File {
        path: path.to_owned(),
        message: message.into(),
    }
}

fn days(d: u32) -> Duration {
    Duration::from_secs(u64::from(d) * 86_400)
}

fn read_file(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(|e| file_err(path, format!("cannot read: {e}")))
}

fn create_dir(dir: &Path) -> Result<(), CertError> {
    std::fs::create_dir_all(dir).map_err(|e| file_err(dir, format!("cannot create: {e}")))
}

/// Writes a file that must not exist yet (unless `force`); keys get mode 0600.
fn write_new(path: &Path, text: &str, secret: bool, force: bool) -> Result<(), CertError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).mode(if secret { 0o600 } else { 0o644 });
    if force {
        o.create(true).truncate(true);
    } else {
        o.create_new(true);
    }
    let mut f = o.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            file_err(path, "exists already; remove it or pass --force")
        } else {
            file_err(path, format!("cannot create: {e}"))
        }
    })?;
    f.write_all(text.as_bytes())
        .map_err(|e| file_err(path, format!("cannot write: {e}")))
}

/// `cert ca`: writes `ca.pem` and `ca.key` into `dir` (created if needed).
fn cert_ca(dir: &Path, name: &str, valid_days: u32, force: bool) -> Result<String, CertError> {
    create_dir(dir)?;
    let ca = CertificateAuthority::generate(name, SystemTime::now(), days(valid_days))?;
    let cert = dir.join(CA_CERT_FILE);
    let key = dir.join(CA_KEY_FILE);
    write_new(&key, ca.key_pem(), true, force)?;
    write_new(&cert, ca.cert_pem(), false, force)?;
    Ok(format!(
        "CA certificate {}\nCA key         {} (keep it secret; needed only to issue)\n",
        cert.display(),
        key.display()
    ))
}

/// `cert issue`: reads the CA from `ca_dir`, writes `<name>.pem`, `<name>.key` and a copy of
/// `ca.pem` into `out`; returns the `[ipsec]` section that uses them.
fn cert_issue(
    ca_dir: &Path,
    id: &Identity,
    out: &Path,
    valid_days: u32,
    force: bool,
) -> Result<String, CertError> {
    let ca_cert = ca_dir.join(CA_CERT_FILE);
    let ca_key = ca_dir.join(CA_KEY_FILE);
    let ca = CertificateAuthority::from_pem(&read_file(&ca_cert)?, &read_file(&ca_key)?).map_err(
        |e| {
            file_err(
                ca_dir,
                format!(
                    "not a CA made by `dmvpn-agent cert ca` ({CA_CERT_FILE}, {CA_KEY_FILE}): {e}"
                ),
            )
        },
    )?;
    // Issued (and the name checked) before anything is written.
    let node = ca.issue(id, SystemTime::now(), days(valid_days))?;
    create_dir(out)?;
    let cert = out.join(format!("{}.pem", id.name));
    let key = out.join(format!("{}.key", id.name));
    let ca_copy = out.join(CA_CERT_FILE);
    write_new(&key, &node.key_pem, true, force)?;
    write_new(&cert, &node.cert_pem, false, force)?;
    if ca_copy != ca_cert {
        write_new(&ca_copy, ca.cert_pem(), false, true)?;
    }
    Ok(format!(
        "[ipsec]\nauth = \"certificate\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        ca_copy.display(),
        cert.display(),
        key.display()
    ))
}

/// Runs a `cert` command; returns the text to print.
pub fn cert(cmd: &CertCommand) -> Result<String, CertError> {
    match cmd {
        CertCommand::Ca {
            out,
            name,
            days,
            force,
        } => cert_ca(out, name, *days, *force),
        CertCommand::Issue {
            ca,
            tunnel_address,
            name,
            kind,
            out,
            days,
            force,
        } => {
            let id = Identity {
                kind: *kind,
                namespace: None,
                name: name.clone(),
                tunnel_address: *tunnel_address,
            };
            cert_issue(ca, &id, out, *days, *force)
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Print the agent's JSON reply instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// The agent's control socket.
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        env = "DMVPN_SOCKET",
        default_value = DEFAULT_CONTROL_SOCKET
    )]
    pub socket: PathBuf,
}

#[derive(Debug, Clone, Copy, Subcommand)]
pub enum ShowCommand {
    /// Tunnel peers: NBMA and tunnel address, state, up/down time, attributes.
    Dmvpn,
    /// NHRP state.
    Nhrp {
        #[command(subcommand)]
        what: ShowNhrp,
    },
    /// NHRP and data plane counters.
    Counters,
}

#[derive(Debug, Clone, Copy, Subcommand)]
pub enum ShowNhrp {
    /// The NHRP cache (registrations, shortcuts, pending and negative entries).
    Cache,
    /// The next hop servers and our registration with each.
    Nhs,
}

#[derive(Debug, Clone, Copy, Subcommand)]
pub enum ClearCommand {
    /// NHRP state.
    Nhrp {
        #[command(subcommand)]
        what: ClearNhrp,
    },
}

#[derive(Debug, Clone, Copy, Subcommand)]
pub enum ClearNhrp {
    /// Shortcuts, pending and negative resolutions (registrations are kept).
    Cache,
}

impl ShowCommand {
    pub fn command(self) -> Command {
        match self {
            ShowCommand::Dmvpn => Command::ShowDmvpn,
            ShowCommand::Nhrp {
                what: ShowNhrp::Cache,
            } => Command::ShowNhrpCache,
            ShowCommand::Nhrp {
                what: ShowNhrp::Nhs,
            } => Command::ShowNhrpNhs,
            ShowCommand::Counters => Command::ShowCounters,
        }
    }
}

impl ClearCommand {
    pub fn command(self) -> Command {
        match self {
            ClearCommand::Nhrp {
                what: ClearNhrp::Cache,
            } => Command::ClearNhrpCache,
        }
    }
}

fn typed<T: DeserializeOwned>(socket: &Path, v: Value) -> Result<T, ClientError> {
    serde_json::from_value(v).map_err(|e| ClientError::Protocol {
        path: socket.to_owned(),
        why: format!("unexpected reply shape: {e}"),
    })
}

/// Renders a command's result: pretty JSON with `json`, else the table.
pub fn render_result(
    command: Command,
    result: Value,
    json: bool,
    socket: &Path,
) -> Result<String, ClientError> {
    if json {
        let mut s = serde_json::to_string_pretty(&result).map_err(|e| ClientError::Protocol {
            path: socket.to_owned(),
            why: e.to_string(),
        })?;
        s.push('\n');
        return Ok(s);
    }
    Ok(match command {
        Command::ShowDmvpn => render::dmvpn(&typed::<DmvpnView>(socket, result)?),
        Command::ShowNhrpCache => render::cache(&typed::<CacheView>(socket, result)?),
        Command::ShowNhrpNhs => render::nhs(&typed::<NhsListView>(socket, result)?),
        Command::ClearNhrpCache => render::clear(&typed::<ClearView>(socket, result)?),
        Command::ShowCounters => render::counters(&result),
    })
}

/// Runs a `show`/`clear` command against the agent and returns the text to print.
pub fn client(command: Command, args: &ClientArgs) -> Result<String, ClientError> {
    let result = control::request(&args.socket, command, CLIENT_TIMEOUT)?;
    render_result(command, result, args.json, &args.socket)
}

/// Exit status for a client error.
pub fn client_exit_code(e: &ClientError) -> u8 {
    match e {
        ClientError::NotRunning { .. } => EXIT_NOT_RUNNING,
        _ => EXIT_ERROR,
    }
}

/// `check-config`: a one-line summary of a valid file, or the error.
pub fn check_config(file: &Path) -> Result<String, config::ConfigError> {
    let c = config::load(file)?;
    let nbma = match &c.nbma {
        config::NbmaSource::Address(a) => a.to_string(),
        config::NbmaSource::Interface(i) => format!("interface {i}"),
    };
    Ok(format!(
        "{}: OK: {} {} on {} (NBMA {nbma}), phase {}, {} NHS, {} local prefixes, control socket {}\n",
        file.display(),
        c.role,
        c.tunnel_address,
        c.tun_name,
        c.phase.get(),
        c.nhs.len(),
        c.local_prefixes.len(),
        c.control_socket.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(args).unwrap()
    }

    #[test]
    fn show_commands_parse() {
        let c = parse(&[
            "dmvpn-agent",
            "show",
            "dmvpn",
            "--json",
            "--socket",
            "/tmp/x.sock",
        ]);
        let TopCommand::Show { what, client } = c.command else {
            panic!("not show")
        };
        assert_eq!(what.command(), Command::ShowDmvpn);
        assert!(client.json);
        assert_eq!(client.socket, PathBuf::from("/tmp/x.sock"));

        let c = parse(&["dmvpn-agent", "show", "--json", "nhrp", "nhs"]);
        let TopCommand::Show { what, client } = c.command else {
            panic!("not show")
        };
        assert_eq!(what.command(), Command::ShowNhrpNhs);
        assert!(client.json);

        let c = parse(&["dmvpn-agent", "show", "nhrp", "cache"]);
        let TopCommand::Show { what, client } = c.command else {
            panic!("not show")
        };
        assert_eq!(what.command(), Command::ShowNhrpCache);
        assert!(!client.json);

        let c = parse(&["dmvpn-agent", "clear", "nhrp", "cache", "--json"]);
        let TopCommand::Clear { what, client } = c.command else {
            panic!("not clear")
        };
        assert_eq!(what.command(), Command::ClearNhrpCache);
        assert!(client.json);

        let c = parse(&["dmvpn-agent", "show", "counters"]);
        let TopCommand::Show { what, .. } = c.command else {
            panic!("not show")
        };
        assert_eq!(what.command(), Command::ShowCounters);
    }

    #[test]
    fn run_and_check_config_parse() {
        let c = parse(&["dmvpn-agent", "run", "--config", "/etc/dmvpn.toml"]);
        assert!(
            matches!(c.command, TopCommand::Run { config } if config == Path::new("/etc/dmvpn.toml"))
        );
        let c = parse(&["dmvpn-agent", "check-config", "a.toml"]);
        assert!(
            matches!(c.command, TopCommand::CheckConfig { file } if file == Path::new("a.toml"))
        );
        assert!(Cli::try_parse_from(["dmvpn-agent", "show", "bogus"]).is_err());
        assert!(Cli::try_parse_from(["dmvpn-agent", "run"]).is_err());
    }

    #[test]
    fn render_json_is_the_result_verbatim() {
        let v = serde_json::json!({"cleared": 3});
        let s = render_result(Command::ClearNhrpCache, v.clone(), true, Path::new("/s")).unwrap();
        assert_eq!(serde_json::from_str::<Value>(&s).unwrap(), v);
        let s = render_result(Command::ClearNhrpCache, v, false, Path::new("/s")).unwrap();
        assert_eq!(s, "Cleared 3 NHRP cache entries.\n");
    }

    #[test]
    fn render_rejects_wrong_shape() {
        let e = render_result(
            Command::ShowDmvpn,
            serde_json::json!({"x": 1}),
            false,
            Path::new("/s"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("unexpected reply shape"), "{e}");
    }

    #[test]
    fn not_running_names_socket() {
        let args = ClientArgs {
            json: false,
            socket: PathBuf::from("/nonexistent/dmvpn-test.sock"),
        };
        let e = client(Command::ShowDmvpn, &args).unwrap_err();
        assert_eq!(client_exit_code(&e), EXIT_NOT_RUNNING);
        let msg = e.to_string();
        assert!(
            msg.contains("agent not running") && msg.contains("/nonexistent/dmvpn-test.sock"),
            "{msg}"
        );
        assert!(!msg.contains('\n'));
    }

    fn run_cert(args: &[&str]) -> Result<String, CertError> {
        let TopCommand::Cert { what } = parse(args).command else {
            panic!("not cert")
        };
        cert(&what)
    }

    #[test]
    fn cert_files_modes_names_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        run_cert(&["dmvpn-agent", "cert", "ca", "--out", d]).unwrap();
        let e = run_cert(&["dmvpn-agent", "cert", "ca", "--out", d]).unwrap_err();
        assert!(e.to_string().contains("--force"), "{e}");
        run_cert(&["dmvpn-agent", "cert", "ca", "--out", d, "--force"]).unwrap();
        let out = dir.path().join("out");
        let o = out.to_str().unwrap();
        let issue = |name: &str, extra: &[&str]| {
            let mut a = vec![
                "dmvpn-agent",
                "cert",
                "issue",
                "--ca",
                d,
                "--tunnel-address",
                "10.42.0.1",
                "--name",
                name,
                "--out",
                o,
            ];
            a.extend_from_slice(extra);
            run_cert(&a)
        };
        let snippet = issue("hub1", &["--kind", "hub"]).unwrap();
        assert!(snippet.contains("auth = \"certificate\""), "{snippet}");
        assert!(
            snippet.contains(&format!("cert = \"{o}/hub1.pem\"")),
            "{snippet}"
        );
        let info = dmvpn_pki::verify(
            &std::fs::read_to_string(out.join("hub1.pem")).unwrap(),
            &std::fs::read_to_string(out.join(CA_CERT_FILE)).unwrap(),
            SystemTime::now(),
        )
        .unwrap();
        assert_eq!(
            info.ip_addresses,
            vec!["10.42.0.1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(info.uris, vec!["dmvpn://hub/hub1".to_owned()]);
        assert_eq!(info.dns_names, vec!["hub1.hub.dmvpn".to_owned()]);
        let key_mode = std::fs::metadata(out.join("hub1.key"))
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
            .unwrap();
        assert_eq!(key_mode, 0o600);
        // The default kind is spoke.
        issue("spoke1", &[]).unwrap();
        let info =
            dmvpn_pki::inspect(&std::fs::read_to_string(out.join("spoke1.pem")).unwrap()).unwrap();
        assert_eq!(info.dns_names, vec!["spoke1.spoke.dmvpn".to_owned()]);
        // A name that is no DNS label is refused before any file is written.
        let e = issue("../x", &[]).unwrap_err();
        assert!(e.to_string().contains("DNS labels"), "{e}");
        assert!(!dir.path().join("x.key").exists());
        // A directory without a CA names the file.
        let e = run_cert(&[
            "dmvpn-agent",
            "cert",
            "issue",
            "--ca",
            o,
            "--tunnel-address",
            "10.42.0.1",
            "--name",
            "n",
            "--out",
            o,
        ])
        .unwrap_err();
        assert!(
            e.to_string().contains("ca.key") && e.to_string().contains("cannot read"),
            "{e}"
        );
        assert!(
            Cli::try_parse_from(["dmvpn-agent", "cert", "ca", "--out", d, "--days", "0"]).is_err()
        );
        assert!(
            Cli::try_parse_from([
                "dmvpn-agent",
                "cert",
                "issue",
                "--ca",
                d,
                "--tunnel-address",
                "10.42.0.1",
                "--name",
                "n",
                "--out",
                o,
                "--kind",
                "router",
            ])
            .is_err()
        );
    }
}
