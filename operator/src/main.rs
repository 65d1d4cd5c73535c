//! `dmvpn-operator`: reconciles DmvpnHub and DmvpnSpoke objects.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use dmvpn_operator::leader::LeaseConfig;
use dmvpn_operator::{Options, Settings};
use tokio_util::sync::CancellationToken;

/// Parses `90d`, `12h`, `30m`, `45s` or a plain number of seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'd')) => (&s[..i], 86400),
        Some((i, 'h')) => (&s[..i], 3600),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 's')) => (&s[..i], 1),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration; use e.g. 90d, 12h, 30m or 45s"))?;
    n.checked_mul(mult)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{s:?} is too long"))
}

#[derive(Parser, Debug)]
#[command(
    name = "dmvpn-operator",
    version,
    about = "The kube-dmvpn operator: tunnel addresses, certificates, status of DmvpnHub and DmvpnSpoke"
)]
struct Args {
    /// Namespace for the CA, certificate secrets, address records and the leader lease.
    #[arg(long, env = "DMVPN_NAMESPACE", default_value = dmvpn_crds::OPERATOR_NAMESPACE)]
    namespace: String,
    /// Identity of this instance (defaults to $POD_NAME, else host name and PID).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Lifetime of hub and spoke certificates; they are renewed at 2/3 of it.
    #[arg(long, default_value = "90d", value_parser = parse_duration)]
    cert_lifetime: Duration,
    /// Lifetime of the CA; renewed at 2/3, the previous CA stays trusted until it expires.
    #[arg(long, default_value = "3650d", value_parser = parse_duration)]
    ca_lifetime: Duration,
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    http_addr: SocketAddr,
    /// Run without leader election (only with a single replica).
    #[arg(long)]
    no_leader_election: bool,
    /// How long the leader lease is valid without renewal.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    lease_duration: Duration,
    /// Periodic re-check of every object.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    resync: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();
    let args = Args::parse();
    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "dmvpn-operator".to_owned());
        format!("{host}-{}", std::process::id())
    });
    let client = kube::Client::try_default()
        .await
        .context("cannot build a Kubernetes client (in-cluster config or KUBECONFIG)")?;
    let mut settings = Settings::new(&args.namespace, &identity);
    settings.cert_lifetime = args.cert_lifetime;
    settings.ca_lifetime = args.ca_lifetime;
    settings.resync = args.resync;
    let mut opts = Options::new(settings);
    if !args.no_leader_election {
        let mut lease = LeaseConfig::new(&args.namespace, dmvpn_crds::LEADER_LEASE_NAME, &identity);
        lease.lease_duration = args.lease_duration;
        lease.renew_deadline = args.lease_duration * 2 / 3;
        lease.retry_period = (args.lease_duration / 5).max(Duration::from_secs(1));
        opts.leader = Some(lease);
    }
    opts.http = Some(
        tokio::net::TcpListener::bind(args.http_addr)
            .await
            .with_context(|| format!("cannot listen on --http-addr {}", args.http_addr))?,
    );
    let stop = CancellationToken::new();
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot install the SIGTERM handler");
                        return;
                    }
                };
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
            }
            stop.cancel();
        });
    }
    tracing::info!(%identity, namespace = %args.namespace, "starting");
    dmvpn_operator::run(client, opts, stop).await?;
    tracing::info!("stopped");
    Ok(())
}
