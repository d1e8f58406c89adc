//! Bad input over real sockets: malformed and oversized requests, invalid
//! UTF-8, absurd values, thousands of idle connections, clients trickling
//! headers. Never a 5xx other than 503, never a crash, memory bounded, and
//! good consumers unaffected throughout.

mod common;

use std::time::Duration;

use common::{Broker, Served, policy, rss_kib, sim_with_key};
use kraken_token_broker::http::server::ServerLimits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends raw bytes, returns the status of the answer (None if the server
/// closed the connection without one).
async fn raw(addr: &str, request: &[u8]) -> Option<u16> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    // The server may close before reading everything; that is an answer too.
    let _ = stream.write_all(request).await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the server answers or closes within 5 s");
    let head = String::from_utf8_lossy(&buf);
    head.strip_prefix("HTTP/1.1 ")
        .or_else(|| head.strip_prefix("HTTP/1.0 "))
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
}

fn host(url: &str) -> String {
    url.trim_start_matches("http://").to_owned()
}

async fn good_consumer_is_served(broker: &Broker) {
    for _ in 0..5 {
        let (status, _, body) = broker.get_token("").await;
        assert_eq!(status, 200, "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_never_get_a_5xx_and_the_server_lives_on() {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    let broker = Broker::on(&sim)
        .key(&key)
        .policy(policy(450.0, 60.0, 30.0, (1.0, 60.0)))
        .start()
        .await;
    good_consumer_is_served(&broker).await;
    let addr = host(&broker.api);
    let auth = format!("Authorization: Bearer {}\r\n", broker.credential);
    let many_headers: String = (0..300).map(|i| format!("X-H{i}: v\r\n")).collect();
    let many_params: String = (0..5000).map(|i| format!("p{i}=1&")).collect();
    let huge = "a".repeat(100 * 1024);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("invalid UTF-8 in the query", b"GET /v1/token?account=\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        (
            "invalid UTF-8 in the credential",
            b"GET /v1/token HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\xc3\x28\r\n\r\n".to_vec(),
        ),
        ("a NUL in a header", b"GET /v1/token HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n".to_vec()),
        ("a request line that is not one", b"HELLO THERE\r\n\r\n".to_vec()),
        ("an unknown HTTP version", b"GET /v1/token HTTP/9.9\r\nHost: x\r\n\r\n".to_vec()),
        ("a bare LF", b"GET /v1/token HTTP/1.1\nHost: x\n\n".to_vec()),
        ("300 headers", format!("GET /v1/token HTTP/1.1\r\nHost: x\r\n{many_headers}\r\n").into_bytes()),
        ("a 100 KiB header", format!("GET /v1/token HTTP/1.1\r\nHost: x\r\nX-Big: {huge}\r\n\r\n").into_bytes()),
        ("5000 query parameters", format!("GET /v1/token?{many_params} HTTP/1.1\r\nHost: x\r\n{auth}\r\n").into_bytes()),
        (
            "an absurd min_ttl",
            format!("GET /v1/token?min_ttl=99999999999999999999999999999999 HTTP/1.1\r\nHost: x\r\n{auth}\r\n").into_bytes(),
        ),
        (
            "a negative min_ttl",
            format!("GET /v1/token?min_ttl=-1 HTTP/1.1\r\nHost: x\r\n{auth}\r\n").into_bytes(),
        ),
        (
            "a body larger than declared",
            format!(
                "POST /v1/token/invalidate HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: 5\r\n\r\n{{\"token\":\"xxxxxxxx\"}}"
            )
            .into_bytes(),
        ),
        (
            "a 1 MiB declared body",
            format!(
                "POST /v1/token/invalidate HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: 1048576\r\n\r\n{{"
            )
            .into_bytes(),
        ),
        (
            "a body that stalls",
            format!(
                "POST /v1/token/invalidate HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: 20\r\n\r\n{{"
            )
            .into_bytes(),
        ),
        (
            "a broken chunked body",
            format!(
                "POST /v1/token/invalidate HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\nabc\r\n0\r\n\r\n"
            )
            .into_bytes(),
        ),
        (
            "both Content-Length and chunked",
            format!(
                "POST /v1/token/invalidate HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            )
            .into_bytes(),
        ),
        ("a path with dot segments", b"GET /v1/../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("an absolute-form target", b"GET http://evil.example/v1/token HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("CONNECT", b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example\r\n\r\n".to_vec()),
    ];
    for (what, request) in cases {
        let status = raw(&addr, &request).await;
        if let Some(status) = status {
            assert!(status < 500 || status == 503, "{what}: {status}");
        }
        match what {
            "a 1 MiB declared body" => assert_eq!(status, Some(413), "refused before reading"),
            "a body that stalls" => assert_eq!(status, Some(408), "cut off after the body deadline"),
            "a 100 KiB header" | "300 headers" => assert_eq!(status, Some(431), "{what}"),
            "5000 query parameters" => assert_eq!(status, Some(431), "{what}"),
            _ => {}
        }
        good_consumer_is_served(&broker).await;
    }
    let r = broker
        .http
        .get(format!("{}/readyz", broker.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the server lives on");
    broker.stop().await.unwrap();
}

/// The file-descriptor budget for idle connections: both ends of each live in
/// this machine, so stay well under the soft limit.
fn idle_budget() -> usize {
    let limit = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).and_then(|n| n.parse::<usize>().ok()))
        })
        .unwrap_or(1024);
    (limit / 3).min(2000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_idle_connections_leave_good_consumers_and_memory_alone() {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    let refresh = "refresh_before_expiry = \"450s\"\nmin_served_ttl = \"60s\"\n";
    let mut served = Served::start(&sim, &key, refresh, &[]).await;
    let pid = served.child.id();
    let cred = served.credential.clone();
    assert_eq!(served.get("/v1/token", Some(&cred)).await.0, 200);
    let before = rss_kib(pid);
    let n = idle_budget();
    let mut idle = Vec::with_capacity(n);
    for i in 0..n {
        let mut stream = TcpStream::connect(host(&served.api)).await.unwrap();
        if i % 2 == 0 {
            // Half send a partial request head and stop.
            stream
                .write_all(b"GET /v1/token HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
        }
        idle.push(stream);
    }
    for _ in 0..20 {
        assert_eq!(
            served.get("/v1/token", Some(&cred)).await.0,
            200,
            "good consumers unaffected"
        );
    }
    let during = rss_kib(pid);
    let growth_kib = during.saturating_sub(before);
    println!("{n} idle connections: RSS {before} KiB -> {during} KiB (+{growth_kib} KiB)");
    // hyper holds a read buffer per connection; the connection cap bounds the total.
    assert!(
        growth_kib < 20 * n as u64,
        "memory bounded: +{growth_kib} KiB for {n} connections"
    );
    drop(idle);
    assert_eq!(served.get("/v1/token", Some(&cred)).await.0, 200);
    served.signal("TERM");
    assert!(served.exit(Duration::from_secs(10)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_trickling_headers_are_cut_off_and_good_consumers_are_not() {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    let limits = ServerLimits {
        header_read_timeout: Duration::from_secs(1),
        ..ServerLimits::default()
    };
    let broker = Broker::on(&sim)
        .accounts(vec![common::account("main", &key)])
        .policy(policy(450.0, 60.0, 30.0, (1.0, 60.0)))
        .limits(limits)
        .start()
        .await;
    good_consumer_is_served(&broker).await;
    let addr = host(&broker.api);
    let trickles: Vec<_> = (0..50)
        .map(|_| {
            let addr = addr.clone();
            tokio::spawn(async move {
                let mut stream = TcpStream::connect(&addr).await.unwrap();
                let started = std::time::Instant::now();
                let head =
                    b"GET /v1/token HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
                for byte in head {
                    if stream.write_all(&[*byte]).await.is_err() {
                        return started.elapsed(); // cut off
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                // The head was sent in full: the server must not have waited for it.
                let mut buf = [0u8; 64];
                let _ = stream.read(&mut buf).await;
                panic!("a head trickled over {:?} was accepted", started.elapsed());
            })
        })
        .collect();
    // Good consumers meanwhile.
    let until = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < until {
        good_consumer_is_served(&broker).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for t in trickles {
        let cut_after = t.await.unwrap();
        assert!(cut_after < Duration::from_secs(5), "cut off after {cut_after:?}");
    }
    broker.stop().await.unwrap();
}

/// Sends raw bytes and reads the whole answer (the request asks the server
/// to close); empty if it closed without one.
async fn raw_answer(addr: &str, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let _ = stream.write_all(request).await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the server answers and closes within 5 s");
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_requests_are_refused_in_problem_json_and_counted() {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    let broker = Broker::on(&sim)
        .key(&key)
        .policy(policy(450.0, 60.0, 30.0, (1.0, 60.0)))
        .start()
        .await;
    good_consumer_is_served(&broker).await;
    let addr = host(&broker.api);
    let auth = format!("Authorization: Bearer {}\r\n", broker.credential);
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "no Host on HTTP/1.1",
            format!("GET /v1/token HTTP/1.1\r\n{auth}Connection: close\r\n\r\n"),
            "Host",
        ),
        (
            "two Host headers",
            format!("GET /v1/token HTTP/1.1\r\nHost: a\r\nHost: b\r\n{auth}Connection: close\r\n\r\n"),
            "Host",
        ),
        (
            "two Authorization headers",
            format!("GET /v1/token HTTP/1.1\r\nHost: a\r\n{auth}{auth}Connection: close\r\n\r\n"),
            "Authorization",
        ),
        (
            "bad framing (hyper's own 400)",
            format!("GET /v1/token HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n{auth}\r\n"),
            "",
        ),
    ];
    for (what, request, names) in &cases {
        let answer = raw_answer(&addr, request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{what}: {answer}");
        let lower = answer.to_ascii_lowercase();
        assert!(
            lower.contains("content-type: application/problem+json"),
            "{what}: {answer}"
        );
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
        let problem: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("{what}: {answer}"));
        assert_eq!(problem["status"], 400, "{what}");
        assert!(problem["detail"].as_str().unwrap().contains(names), "{what}: {problem}");
        assert!(
            !answer.contains(&broker.credential),
            "{what}: the credential is not echoed"
        );
    }
    // None of them was served a token.
    let metrics = broker.metrics.encode();
    let served = metrics
        .lines()
        .find_map(|l| l.strip_prefix("kraken_token_broker_tokens_served_total{account=\"main\",consumer=\"engine\"} "))
        .unwrap();
    assert_eq!(served.trim(), "5", "only the good consumer's 5 fetches were served");
    // And each is counted as a 400.
    let bad: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("kraken_token_broker_http_requests_total{") && l.contains("status=\"400\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(bad, cases.len() as f64, "{metrics}");

    // HEAD answers the headers of a GET but serves no token.
    let answer = raw_answer(
        &addr,
        format!("HEAD /v1/token HTTP/1.1\r\nHost: a\r\n{auth}Connection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(!answer.contains("\"token\""), "no body on HEAD: {answer}");
    assert_eq!(
        broker.metric("tokens_served_total{account=\"main\",consumer=\"engine\"}"),
        5.0
    );
    good_consumer_is_served(&broker).await;
    broker.stop().await.unwrap();
}

/// Connects from `source` (another loopback address) to `addr`.
async fn connect_from(source: std::net::IpAddr, addr: &str) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(std::net::SocketAddr::new(source, 0))?;
    socket.connect(addr.parse().unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowd_of_unauthenticated_connections_stays_within_the_pods_memory_and_the_engine_is_served() {
    // The chart's memory limit for the broker.
    const POD_LIMIT_KIB: u64 = 128 * 1024;
    let fds = kraken_token_broker::http::server::raise_open_files_limit();
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    let refresh = "refresh_before_expiry = \"450s\"\nmin_served_ttl = \"60s\"\n";
    let mut served = Served::start(&sim, &key, refresh, &[]).await;
    let pid = served.child.id();
    let cred = served.credential.clone();
    assert_eq!(served.get("/v1/token", Some(&cred)).await.0, 200);
    let addr = host(&served.api);
    // Four times the listener's cap, from four addresses other than the
    // engine's (127.0.0.1), within this process's file budget.
    let crowd =
        (4 * kraken_token_broker::http::server::API_MAX_CONNECTIONS).min((fds as usize).saturating_sub(256) / 2);
    let mut held = Vec::with_capacity(crowd);
    let mut refused = 0usize;
    for i in 0..crowd {
        let source = std::net::IpAddr::from([127, 0, 0, 2 + (i % 4) as u8]);
        match connect_from(source, &addr).await {
            Ok(mut stream) => {
                if i % 2 == 0 {
                    let _ = stream.write_all(b"GET /v1/token HTTP/1.1\r\nHost: x\r\nX-Pad: ").await;
                }
                held.push(stream);
            }
            Err(_) => refused += 1,
        }
        if i % 512 == 511 {
            // The engine, on new connections, while the crowd grows.
            let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
            let r = http
                .get(format!("{}/v1/token", served.api))
                .bearer_auth(&cred)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "the engine is served with {i} strangers connected");
        }
    }
    for _ in 0..20 {
        assert_eq!(
            served.get("/v1/token", Some(&cred)).await.0,
            200,
            "the engine is served"
        );
    }
    let rss = rss_kib(pid);
    let metrics = served.admin_text("/metrics").await;
    let open = common::metric_value(&metrics, "connections_open{listener=\"api\"}");
    println!("{crowd} strangers ({refused} refused at connect): broker RSS {rss} KiB, {open} API connections open");
    // (A debug build: 54 MiB measured here; less in release.)
    assert!(
        rss < POD_LIMIT_KIB * 3 / 4,
        "RSS {rss} KiB, within three quarters of the pod's limit"
    );
    assert!(
        open <= kraken_token_broker::http::server::API_MAX_CONNECTIONS as f64,
        "{open} connections open"
    );
    assert!(
        metrics.contains("connections_refused_total{listener=\"api\",reason=\"evicted\"}"),
        "strangers that never sent a request were evicted:\n{metrics}"
    );
    drop(held);
    served.signal("TERM");
    assert!(served.exit(Duration::from_secs(10)).await.success());
}

/// Strangers from `source`, each holding a connection to `addr` and sending
/// `request` on it every `every` (reading what comes back), reconnecting
/// when the broker closes it: what an attacker holding slots does.
struct Crowd {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<usize>>,
}

impl Crowd {
    fn start(addr: &str, sources: &[std::net::IpAddr], each: usize, request: &'static [u8], every: Duration) -> Crowd {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tasks = Vec::new();
        for source in sources {
            for _ in 0..each {
                let (addr, source, stop) = (addr.to_owned(), *source, stop.clone());
                tasks.push(tokio::spawn(async move {
                    let mut connections = 0;
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                        let Ok(mut stream) = connect_from(source, &addr).await else {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        };
                        connections += 1;
                        let mut buf = [0u8; 4096];
                        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                            if stream.write_all(request).await.is_err() {
                                break;
                            }
                            match tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await {
                                Ok(Ok(0)) | Ok(Err(_)) => break,
                                _ => {}
                            }
                            tokio::time::sleep(every).await;
                        }
                    }
                    connections
                }));
            }
        }
        Crowd { stop, tasks }
    }

    /// Stops the crowd; how many connections it made in all.
    async fn stop(self) -> usize {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut total = 0;
        for t in self.tasks {
            total += t.await.unwrap_or(0);
        }
        total
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_addresses_holding_every_slot_with_requests_never_keep_a_consumer_out() {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    let limits = ServerLimits {
        max_connections: 128,
        max_per_address: 128,
        ..ServerLimits::default()
    };
    let broker = Broker::on(&sim)
        .accounts(vec![common::account("main", &key)])
        .policy(policy(450.0, 60.0, 30.0, (1.0, 60.0)))
        .limits(limits)
        .start()
        .await;
    good_consumer_is_served(&broker).await;
    let addr = host(&broker.api);
    // Two addresses, 128 connections each (the listener holds 128 in all),
    // an unauthenticated request on each every 2 s.
    let attackers: Vec<std::net::IpAddr> = vec![[127, 0, 0, 2].into(), [127, 0, 0, 3].into()];
    let crowd = Crowd::start(
        &addr,
        &attackers,
        128,
        b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_secs(2),
    );
    common::wait_for("the listener to fill", Duration::from_secs(20), || async {
        (broker.metric("connections_open{listener=\"api\"}") >= 128.0).then_some(())
    })
    .await;
    // The consumer, from a third address, on a new connection each time.
    let engine = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let mut served = 0;
    for _ in 0..30 {
        let r = engine
            .get(format!("{}/v1/token", broker.api))
            .bearer_auth(&broker.credential)
            .send()
            .await;
        served += usize::from(r.is_ok_and(|r| r.status() == 200));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let evicted = broker.metric("connections_refused_total{listener=\"api\",reason=\"evicted\"}");
    let full = broker.metric("connections_refused_total{listener=\"api\",reason=\"listener_full\"}");
    let connections = crowd.stop().await;
    println!(
        "consumer served {served}/30 while two addresses made {connections} connections; {evicted} evicted, {full} refused as full"
    );
    assert_eq!(served, 30, "the consumer is served every time");
    assert_eq!(full, 0.0, "no newcomer is refused while strangers hold slots");
    common::wait_for("the crowd's connections to close", Duration::from_secs(20), || async {
        (broker.metric("connections_open{listener=\"api\"}") == 0.0).then_some(())
    })
    .await;
    broker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_connections_on_the_admin_listener_never_fail_a_probe() {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    let broker = Broker::on(&sim)
        .key(&key)
        .policy(policy(450.0, 60.0, 30.0, (1.0, 60.0)))
        .start()
        .await;
    good_consumer_is_served(&broker).await;
    let admin = host(&broker.admin);
    let crowd = Crowd::start(
        &admin,
        &[[127, 0, 0, 2].into()],
        100,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_secs(2),
    );
    common::wait_for("the crowd to connect", Duration::from_secs(20), || async {
        (broker.metric("connections_refused_total{listener=\"admin\",reason=\"evicted\"}") >= 50.0).then_some(())
    })
    .await;
    // The kubelet's probes, from the node's address, each on a new connection.
    let kubelet = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let mut answered = 0;
    for _ in 0..30 {
        let r = kubelet.get(format!("{}/healthz", broker.admin)).send().await;
        answered += usize::from(r.is_ok_and(|r| r.status() == 200));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let open = broker.metric("connections_open{listener=\"admin\"}");
    let connections = crowd.stop().await;
    println!(
        "probes answered {answered}/30 while one address made {connections} admin connections ({open} open at most 16 of them)"
    );
    assert_eq!(answered, 30, "every probe is answered");
    broker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_gets_the_interim_answer_then_the_real_one() {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    let broker = Broker::on(&sim)
        .key(&key)
        .policy(policy(450.0, 60.0, 30.0, (1.0, 60.0)))
        .start()
        .await;
    let (_, _, body) = broker.get_token("").await;
    let token = body["token"].as_str().unwrap().to_owned();
    let report = format!("{{\"token\":\"{token}\"}}");
    let mut stream = TcpStream::connect(host(&broker.api)).await.unwrap();
    let head = format!(
        "POST /v1/token/invalidate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        broker.credential,
        report.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut interim = [0u8; 25];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut interim))
        .await
        .expect("an interim answer")
        .unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(report.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let fresh: serde_json::Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_ne!(fresh["token"].as_str().unwrap(), token, "the report replaced the token");
    broker.stop().await.unwrap();
}

/// The bytes the kernel holds unsent on the server side of `port`'s
/// connections (tx_queue of /proc/net/tcp), at most and in all.
fn server_send_queues(port: u16) -> (u64, u64) {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let queues: Vec<u64> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = u16::from_str_radix(fields.get(1)?.rsplit(':').next()?, 16).ok()?;
            let tx = u64::from_str_radix(fields.get(4)?.split(':').next()?, 16).ok()?;
            (local_port == port).then_some(tx)
        })
        .collect();
    (queues.iter().copied().max().unwrap_or(0), queues.iter().sum())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_never_read_park_little_and_not_for_long() {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    let limits = ServerLimits {
        write_stall: Duration::from_secs(1),
        ..ServerLimits::default()
    };
    let broker = Broker::on(&sim)
        .accounts(vec![common::account("main", &key)])
        .policy(policy(450.0, 60.0, 30.0, (1.0, 60.0)))
        .limits(limits)
        .start()
        .await;
    good_consumer_is_served(&broker).await;
    let baseline = broker.metric("connections_open{listener=\"api\"}");
    let addr = host(&broker.api);
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    let request = b"GET /v1/token HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ktb_wrong\r\n\r\n".repeat(200);
    let mut held = Vec::new();
    for _ in 0..20 {
        // A small receive buffer of its own, so the answers back up into
        // the broker's kernel rather than this one's.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut stream = socket.connect(addr.parse().unwrap()).await.unwrap();
        // Requests piled up and never an answer read.
        for _ in 0..50 {
            let write = tokio::time::timeout(Duration::from_millis(200), stream.write_all(&request)).await;
            if !matches!(write, Ok(Ok(()))) {
                break; // the broker stopped reading: its answers are not read
            }
        }
        held.push(stream);
    }
    let (most, all) = server_send_queues(port);
    println!("20 pipelining strangers: the kernel holds {most} bytes at most per connection, {all} in all");
    assert!(most <= 256 * 1024, "{most} bytes parked on one connection");
    good_consumer_is_served(&broker).await;
    // A writer stalled past the limit is closed.
    let stalled_at = std::time::Instant::now();
    common::wait_for(
        "the stalled connections to be closed",
        Duration::from_secs(30),
        || async { (broker.metric("connections_open{listener=\"api\"}") <= baseline).then_some(()) },
    )
    .await;
    let took = stalled_at.elapsed();
    println!("closed {took:?} after the last write");
    assert!(
        took < Duration::from_secs(9),
        "by the write stall (1 s here), before the idle timeout (10 s)"
    );
    drop(held);
    broker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_holding_every_slot_never_keeps_another_consumer_out() {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    let limits = ServerLimits {
        max_connections: 64,
        max_per_address: 64,
        max_proven_per_consumer: 16,
        ..ServerLimits::default()
    };
    // A neighbour whose credential is valid, held to 1 request a second.
    let (neighbour, hash) = kraken_token_broker::identity::credential::new_credential();
    let broker = Broker::on(&sim)
        .key(&key)
        .policy(policy(450.0, 60.0, 30.0, (1.0, 60.0)))
        .limits(limits)
        .consumer(kraken_token_broker::config::ConsumerConfig {
            name: "neighbour".into(),
            identity: kraken_token_broker::config::Identity::Credential { sha256: hash },
            accounts: vec!["main".into()],
            rate_limit: kraken_token_broker::config::RateLimit {
                per_second: 1.0,
                burst: 5.0,
            },
            relay: Default::default(),
            relay_only: false,
        })
        .start()
        .await;
    good_consumer_is_served(&broker).await;
    let addr = host(&broker.api);
    // Every slot, from two addresses, each connection asking again and again
    // (mostly 429s: its rate limit) so none is ever idle.
    let request: &'static [u8] = Box::leak(
        format!(
            "GET /v1/token HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
            neighbour.expose()
        )
        .into_bytes()
        .into_boxed_slice(),
    );
    let crowd = Crowd::start(
        &addr,
        &[[127, 0, 0, 2].into(), [127, 0, 0, 3].into()],
        64,
        request,
        Duration::from_millis(500),
    );
    common::wait_for(
        "the neighbour to fill the listener",
        Duration::from_secs(20),
        || async { (broker.metric("connections_open{listener=\"api\"}") >= 64.0).then_some(()) },
    )
    .await;
    let engine = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let mut served = 0;
    for _ in 0..20 {
        let r = engine
            .get(format!("{}/v1/token", broker.api))
            .bearer_auth(&broker.credential)
            .send()
            .await;
        served += usize::from(r.is_ok_and(|r| r.status() == 200));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let limited = broker.metric("rate_limited_total{consumer=\"neighbour\"}");
    let full = broker.metric("connections_refused_total{listener=\"api\",reason=\"listener_full\"}");
    crowd.stop().await;
    println!(
        "engine served {served}/20 while the neighbour held the listener ({limited} of its requests refused 429, {full} newcomers refused)"
    );
    assert_eq!(served, 20, "the engine is served every time");
    assert_eq!(full, 0.0);
    broker.stop().await.unwrap();
}
