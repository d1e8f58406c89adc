//! A bounded soak: the real binary, 2-second tokens, steady consumer load and
//! a cycle of injected faults. Zero expired tokens served, zero unexplained
//! errors, flat memory.
//!
//! `KTB_SOAK_SECS` sets the length (default 8 s; CI's `.ci/run` runs 20 s).
//! A longer run: `KTB_SOAK_SECS=600 cargo test --release --test soak -- --nocapture`.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Served, now_ms, rss_kib, sim_with_key};
use kraken_token_broker::sim::FaultSpec;
use serde_json::json;

const REFRESH: &str = r#"
refresh_before_expiry = "1s"
min_served_ttl = "500ms"
jitter = "100ms"
retry_initial = "100ms"
retry_max = "500ms"
"#;
/// min_served_ttl less the time an answer takes to arrive.
const MIN_LEFT_MS: u64 = 450;
/// After a fault ends, how long a 503 is still explained by it: back-off,
/// one call, and the token the broker must mint.
const RECOVERY_GRACE_MS: u64 = 2500;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_short_tokens_steady_load_and_faults() {
    let secs: u64 = std::env::var("KTB_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let (sim, key) = sim_with_key(Duration::from_secs(2)).await;
    let mut served = Served::start(&sim, &key, REFRESH, &[]).await;
    let pid = served.child.id();

    // Consumers: four loops, as fast as the answers come, with a short pause.
    let stop = Arc::new(AtomicBool::new(false));
    let consumers: Vec<_> = (0..4)
        .map(|_| {
            let url = format!("{}/v1/token", served.api);
            let cred = served.credential.clone();
            common::fetch_until(
                served.http.clone(),
                url,
                cred,
                Arc::clone(&stop),
                Duration::from_millis(5),
            )
        })
        .collect();

    // Faults: every 3 s, one for about a second, then clear.
    let faults = [
        json!({"error": "EService:Unavailable"}),
        json!({"http_status": 502}),
        json!({"truncated": true}),
        json!({"error": "EAPI:Invalid nonce", "count": 1}),
        json!({"hang": true}),
        json!({"delay_ms": 300}),
        json!({"expires": 0}),
    ];
    let mut windows = Vec::new();
    let mut rss = Vec::new();
    let started = Instant::now();
    let mut next_fault = 0;
    while started.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        rss.push(rss_kib(pid));
        let spec: FaultSpec = serde_json::from_value(faults[next_fault % faults.len()].clone()).unwrap();
        next_fault += 1;
        let from = now_ms();
        sim.state().set_fault(spec);
        tokio::time::sleep(Duration::from_secs(1)).await;
        sim.state().clear_fault();
        windows.push((from, now_ms()));
        rss.push(rss_kib(pid));
    }
    stop.store(true, Ordering::SeqCst);
    let mut seen = Vec::new();
    for c in consumers {
        seen.extend(c.await.unwrap());
    }

    // Every token served was live by the simulator's clock.
    let issued = sim.state().tokens();
    let mut served_ok = 0;
    let mut unavailable = 0;
    for common::Fetched {
        at_ms: at,
        status,
        retry_after: has_retry_after,
        token,
    } in &seen
    {
        match status {
            200 => {
                let token = token.as_deref().unwrap();
                let t = issued
                    .iter()
                    .find(|t| t.token == token)
                    .expect("issued by the simulator");
                let left = t.expires_at_unix_ms.saturating_sub(*at);
                assert!(left >= MIN_LEFT_MS, "a token with {left} ms left was served");
                served_ok += 1;
            }
            503 => {
                assert!(has_retry_after, "503 carries Retry-After");
                let explained = windows
                    .iter()
                    .any(|(from, to)| *at >= *from && *at <= to + RECOVERY_GRACE_MS);
                assert!(explained, "a 503 at {at} outside any fault window {windows:?}");
                unavailable += 1;
            }
            other => panic!("unexplained status {other}"),
        }
    }
    // Memory: after warm-up, no growth beyond noise.
    let warm = &rss[rss.len() / 3..];
    let (first, last) = warm.split_at(warm.len() / 2);
    let (first_max, last_max) = (*first.iter().max().unwrap(), *last.iter().max().unwrap());
    println!(
        "soak {secs} s: {} fetches ({served_ok} served, {unavailable} explained 503), {} upstream calls, \
         {} faults, RSS {} -> {} KiB (samples {rss:?})",
        seen.len(),
        sim.state().token_calls().len(),
        windows.len(),
        first_max,
        last_max
    );
    assert!(served_ok > seen.len() / 2, "mostly served");
    assert!(
        last_max <= first_max + 4096,
        "RSS grew from {first_max} to {last_max} KiB"
    );

    served.signal("TERM");
    assert!(served.exit(Duration::from_secs(10)).await.success());
}
