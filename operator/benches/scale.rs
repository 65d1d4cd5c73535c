//! Scale benchmark: one hub and N spokes (default 1000) against the in-process fake API server,
//! with the real Controller. Reports the time from the first create until every spoke is Ready,
//! and the peak resident memory of the process (operator + fake API server + agent stand-ins).
//!
//! `cargo bench -p dmvpn-operator --bench scale -- [N]`

use std::time::{Duration, Instant};

use dmvpn_operator::fakeapi::FakeApiConfig;
use dmvpn_operator::testing::{Lab, is_ready, test_settings};
use futures::StreamExt;
use kube::api::ListParams;

fn status_kib(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let lab = Lab::start_with(FakeApiConfig {
            history: 5_000,
            bookmark_interval: Duration::from_secs(5),
        })
        .await;
        let op = lab.start_operator(test_settings());
        let agents = lab.start_agents();
        lab.create_hub("hub-a", "10.40.0.0/20").await;
        let base_rss = status_kib("VmRSS:").unwrap_or(0);

        let start = Instant::now();
        futures::stream::iter(0..n)
            .map(|i| {
                let lab = &lab;
                async move {
                    lab.create_spoke(
                        &format!("spoke-{i:04}"),
                        "hub-a",
                        &format!("10.{}.{}.0/24", 100 + i / 256, i % 256),
                    )
                    .await
                }
            })
            .buffer_unordered(32)
            .for_each(|_| async {})
            .await;
        let created = start.elapsed();
        let deadline = Instant::now() + Duration::from_secs(1800);
        loop {
            if usize::try_from(op.metrics.spokes_ready.get()).unwrap_or(0) >= n {
                break;
            }
            assert!(Instant::now() < deadline, "not all spokes became Ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let ready = start.elapsed();

        // Confirm from the API: all Ready, unique addresses.
        let list = lab
            .spokes
            .list(&ListParams::default())
            .await
            .expect("list")
            .items;
        let mut addrs: Vec<String> = list
            .iter()
            .filter_map(|s| s.status.as_ref()?.tunnel_address.clone())
            .collect();
        addrs.sort();
        addrs.dedup();
        assert_eq!(list.len(), n);
        assert!(list.iter().all(is_ready));
        assert_eq!(addrs.len(), n, "unique addresses");

        let hwm = status_kib("VmHWM:").unwrap_or(0);
        let requests: u64 = lab.server.requests().values().sum();
        println!("spokes: {n}");
        println!("created all in: {:.2} s", created.as_secs_f64());
        println!(
            "all Ready after: {:.2} s ({:.1} spokes/s)",
            ready.as_secs_f64(),
            n as f64 / ready.as_secs_f64()
        );
        println!("API requests (all clients): {requests}");
        println!("RSS before spokes: {:.1} MiB", base_rss as f64 / 1024.0);
        println!(
            "peak RSS (VmHWM, whole process): {:.1} MiB",
            hwm as f64 / 1024.0
        );
        for line in op.metrics.encode().lines() {
            if line.starts_with("dmvpn_operator_reconcil")
                || line.starts_with("dmvpn_operator_allocation_conflicts")
            {
                println!("{line}");
            }
        }
        agents.cancel();
        op.shutdown().await.expect("clean shutdown");
    });
}
