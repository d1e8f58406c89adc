//! `kraken-token-broker agent`: the token file read 10,000 times while it is
//! rewritten (never partial, never empty), SIGTERM, a refused credential, a
//! broker restart under the agent, `--once`.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{BIN, FAST_REFRESH, Served, sim_with_key, wait_for, write};

struct Agent {
    child: Child,
    stderr: Arc<Mutex<String>>,
    /// The thread copying stderr: joined once the agent exits, so
    /// everything it wrote has been read.
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Agent {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Agent {
        let mut command = Command::new(BIN);
        command
            .arg("agent")
            .args(args)
            .env_remove("KTB_CONSUMER_CREDENTIAL")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&stderr);
        let pipe = child.stderr.take().unwrap();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Agent {
            child,
            stderr,
            reader: Some(reader),
        }
    }

    fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([format!("-{name}"), self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    async fn exit(&mut self, deadline: Duration) -> std::process::ExitStatus {
        let until = Instant::now() + deadline;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // The pipe ends with the process: read it to the end.
                if let Some(reader) = self.reader.take() {
                    tokio::task::spawn_blocking(move || reader.join())
                        .await
                        .unwrap()
                        .unwrap();
                }
                return status;
            }
            assert!(
                Instant::now() < until,
                "the agent did not exit within {deadline:?}: {}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn token_in(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["token"].as_str().map(str::to_owned)
}

async fn file_token(path: PathBuf, deadline: Duration, not: Option<String>) -> String {
    wait_for("a token in the file", deadline, || {
        let token = token_in(&path).filter(|t| Some(t) != not.as_ref());
        async move { token }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_is_never_partial_or_empty_while_tokens_rotate_and_sigterm_exits_0() {
    let (sim, key) = sim_with_key(Duration::from_secs(3)).await;
    let served = Served::start(&sim, &key, FAST_REFRESH, &[]).await;
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("token.json");
    let out_text = out.to_str().unwrap().to_owned();
    let mut agent = Agent::start(
        &["--url", &served.api, "--out", &out_text],
        &[("KTB_CONSUMER_CREDENTIAL", &served.credential)],
    );
    let first = file_token(out.clone(), Duration::from_secs(10), None).await;
    assert!(sim.state().token_is_valid(&first));
    let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // Read it as fast as possible while the broker rotates tokens.
    let reader = {
        let out = out.clone();
        tokio::task::spawn_blocking(move || {
            let (mut reads, mut tokens) = (0usize, std::collections::BTreeSet::new());
            let started = Instant::now();
            while (reads < 10_000 || tokens.len() < 3) && started.elapsed() < Duration::from_secs(30) {
                let text = std::fs::read_to_string(&out).expect("the file is always there");
                assert!(!text.is_empty(), "never empty");
                let v: serde_json::Value =
                    serde_json::from_str(&text).unwrap_or_else(|e| panic!("never partial ({e}): {text:?}"));
                tokens.insert(v["token"].as_str().expect("a token").to_owned());
                reads += 1;
            }
            (reads, tokens)
        })
    };
    let (reads, tokens) = reader.await.unwrap();
    println!("{reads} reads saw {} tokens, every read whole", tokens.len());
    assert!(
        reads >= 10_000 && tokens.len() >= 3,
        "{reads} reads, {} tokens",
        tokens.len()
    );
    let left: Vec<_> = std::fs::read_dir(out_dir.path()).unwrap().collect();
    assert_eq!(left.len(), 1, "no temporary file left behind");
    let logs = agent.stderr();
    assert!(logs.contains("token file replaced"), "{logs}");
    for t in &tokens {
        assert!(!logs.contains(t.as_str()), "the agent never logs a token");
    }
    assert!(!logs.contains(&served.credential));

    agent.signal("TERM");
    assert!(agent.exit(Duration::from_secs(5)).await.success(), "SIGTERM exits 0");
    assert!(token_in(&out).is_some(), "the file stays");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_credential_exits_non_zero_at_once() {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    let served = Served::start(&sim, &key, "", &[]).await;
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("token.json");
    const WRONG: &str = "ktb_not-the-right-credential-0123456789abcdef";
    let mut agent = Agent::start(
        &["--url", &served.api, "--out", out.to_str().unwrap()],
        &[("KTB_CONSUMER_CREDENTIAL", WRONG)],
    );
    let status = agent.exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(3), "refused: exit 3");
    let logs = agent.stderr();
    assert!(logs.contains("HTTP 401"), "{logs}");
    assert!(!logs.contains(WRONG), "the credential is not echoed");
    assert!(!out.exists(), "no file for a refused consumer");

    // No identity at all: a usage error naming the ways to give one.
    let mut agent = Agent::start(&["--url", &served.api, "--out", out.to_str().unwrap()], &[]);
    assert_eq!(
        agent.exit(Duration::from_secs(10)).await.code(),
        Some(2),
        "usage: exit 2"
    );
    assert!(agent.stderr().contains("KTB_CONSUMER_CREDENTIAL"), "{}", agent.stderr());
}

/// A config for `serve` on a fixed API port.
fn config_on(
    sim: &kraken_token_broker::sim::SimHandle,
    key: &kraken_token_broker::sim::SimKey,
    dir: &Path,
    port: u16,
) -> (PathBuf, String) {
    write(dir, "api-key", &format!("{}\n", key.api_key));
    write(dir, "api-secret", &format!("{}\n", key.api_secret));
    let (credential, hash) = kraken_token_broker::identity::credential::new_credential();
    let text = common::config_text(sim, dir, &hex::encode(hash), "", "")
        .replace("api = \"127.0.0.1:0\"", &format!("api = \"127.0.0.1:{port}\""));
    (write(dir, "broker.toml", &text), credential.expose().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_rides_out_a_broker_restart() {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let (config, credential) = config_on(&sim, &key, dir.path(), port);
    let http = reqwest::Client::new();
    let keep = tempfile::tempdir().unwrap();
    let mut first = Served::spawn(&config, keep, &credential, http.clone(), &[]).await;
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("token.json");
    let mut agent = Agent::start(
        &[
            "--url",
            &format!("http://127.0.0.1:{port}"),
            "--out",
            out.to_str().unwrap(),
        ],
        &[("KTB_CONSUMER_CREDENTIAL", &credential)],
    );
    let before = file_token(out.clone(), Duration::from_secs(10), None).await;

    first.signal("TERM");
    assert!(first.exit(Duration::from_secs(10)).await.success());
    // While the broker is down the file keeps the last token (an absence:
    // observed over a short window).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(token_in(&out).as_deref(), Some(before.as_str()));
    // A new broker process mints its own token; the agent reconnects to it.
    let _second = Served::spawn(&config, tempfile::tempdir().unwrap(), &credential, http, &[]).await;
    let after = file_token(out.clone(), Duration::from_secs(40), Some(before.clone())).await;
    assert!(sim.state().token_is_valid(&after));
    assert!(agent.stderr().contains("reconnecting"), "{}", agent.stderr());
    agent.signal("TERM");
    assert!(agent.exit(Duration::from_secs(5)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_writes_the_token_and_exits_0() {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    let served = Served::start(&sim, &key, "", &[]).await;
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("token.json");
    let once = |mode: &str| {
        let args = [
            "--url",
            &served.api,
            "--out",
            out.to_str().unwrap(),
            "--once",
            "--mode",
            mode,
        ];
        Agent::start(&args, &[("KTB_CONSUMER_CREDENTIAL", &served.credential)])
    };
    let mut agent = once("640");
    assert!(
        agent.exit(Duration::from_secs(10)).await.success(),
        "{}",
        agent.stderr()
    );
    let token = token_in(&out).expect("a token");
    assert!(sim.state().token_is_valid(&token));
    assert_eq!(std::fs::metadata(&out).unwrap().permissions().mode() & 0o777, 0o640);
    // A world-readable mode is refused before anything is written.
    let mut agent = once("644");
    assert_eq!(
        agent.exit(Duration::from_secs(10)).await.code(),
        Some(2),
        "a usage error"
    );
}

/// A stand-in for the broker that misbehaves in one way, counting the
/// agent's connections.
struct FakeBroker {
    url: String,
    connections: Arc<std::sync::atomic::AtomicUsize>,
}

#[derive(Clone, Copy)]
enum Misbehaviour {
    /// Bytes every 100 ms, but never a blank line ending an event.
    NeverAWholeEvent,
    /// One line that never ends.
    EndlessLine,
    /// A token that is not UTF-8.
    NotUtf8,
    /// 503 with a Retry-After of 2^64 - 1 seconds.
    HugeRetryAfter,
    /// 503 whose body trickles a byte a second, forever.
    TrickledRefusal,
    /// 503 whose body never ends.
    EndlessRefusal,
}

impl FakeBroker {
    async fn start(how: Misbehaviour) -> FakeBroker {
        use axum::body::Body;
        use axum::response::IntoResponse;
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = Arc::clone(&connections);
        let app = axum::Router::new().route(
            "/v1/token/watch",
            axum::routing::get(move || {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async move {
                    let sse = [("content-type", "text/event-stream")];
                    match how {
                        Misbehaviour::NeverAWholeEvent => {
                            let ticks = futures_util::stream::unfold(0u64, |n| async move {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                Some((Ok::<_, std::io::Error>(format!("data: {n}\n")), n + 1))
                            });
                            (sse, Body::from_stream(ticks)).into_response()
                        }
                        Misbehaviour::EndlessLine => {
                            let chunks =
                                futures_util::stream::repeat_with(|| Ok::<_, std::io::Error>(vec![b'a'; 16 * 1024]));
                            (sse, Body::from_stream(chunks)).into_response()
                        }
                        Misbehaviour::NotUtf8 => {
                            let mut body =
                                format!("event: {}\ndata: {{\"token\":\"", kraken_token_broker::sse::TOKEN_EVENT)
                                    .into_bytes();
                            body.extend_from_slice(&[0xff, 0xfe, b'a']);
                            body.extend_from_slice(b"\"}\n\n");
                            let stream = futures_util::stream::once(async move { Ok::<_, std::io::Error>(body) })
                                .chain(futures_util::stream::pending());
                            (sse, Body::from_stream(stream)).into_response()
                        }
                        Misbehaviour::TrickledRefusal => {
                            let ticks = futures_util::stream::unfold((), |()| async move {
                                tokio::time::sleep(Duration::from_secs(1)).await;
                                Some((Ok::<_, std::io::Error>(b"x".to_vec()), ()))
                            });
                            (
                                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                                [("retry-after", "1")],
                                Body::from_stream(ticks),
                            )
                                .into_response()
                        }
                        Misbehaviour::EndlessRefusal => {
                            let chunks =
                                futures_util::stream::repeat_with(|| Ok::<_, std::io::Error>(vec![b'a'; 64 * 1024]));
                            (
                                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                                [("retry-after", "1")],
                                Body::from_stream(chunks),
                            )
                                .into_response()
                        }
                        Misbehaviour::HugeRetryAfter => (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            [("retry-after", "18446744073709551615")],
                            "{}",
                        )
                            .into_response(),
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        FakeBroker { url, connections }
    }

    fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }
}

use futures_util::StreamExt as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_is_not_the_brokers_is_dropped_and_never_written() {
    for (how, says) in [
        (Misbehaviour::NeverAWholeEvent, "no whole event"),
        (Misbehaviour::EndlessLine, "longer than"),
        (Misbehaviour::NotUtf8, "not UTF-8"),
    ] {
        let fake = FakeBroker::start(how).await;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("token.json");
        let agent = Agent::start(
            &["--url", &fake.url, "--out", out.to_str().unwrap(), "--idle-limit", "1s"],
            &[("KTB_CONSUMER_CREDENTIAL", "ktb_any")],
        );
        wait_for(says, Duration::from_secs(20), || async {
            (fake.connections() >= 2 && agent.stderr().contains(says)).then_some(())
        })
        .await;
        assert!(!out.exists(), "{says}: nothing is written");
        let pid = agent.child.id();
        assert!(
            common::rss_kib(pid) < 64 * 1024,
            "{says}: the agent's memory stays small"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_of_584_million_years_is_capped() {
    let fake = FakeBroker::start(Misbehaviour::HugeRetryAfter).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("token.json");
    let agent = Agent::start(
        &["--url", &fake.url, "--out", out.to_str().unwrap()],
        &[("KTB_CONSUMER_CREDENTIAL", "ktb_any")],
    );
    wait_for("the retry to be scheduled", Duration::from_secs(10), || async {
        agent.stderr().contains("reconnecting").then_some(())
    })
    .await;
    let logs = agent.stderr();
    assert!(logs.contains("retry_in_ms=300000"), "at most 5 minutes: {logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_every_user_may_write_is_refused_with_the_way_out() {
    let shared = tempfile::tempdir().unwrap();
    std::fs::set_permissions(shared.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = shared.path().join("token.json");
    let mut agent = Agent::start(
        &["--url", "http://127.0.0.1:1", "--out", out.to_str().unwrap()],
        &[("KTB_CONSUMER_CREDENTIAL", "ktb_any")],
    );
    assert_eq!(agent.exit(Duration::from_secs(10)).await.code(), Some(2));
    let logs = agent.stderr();
    assert!(logs.contains("can be written by every user"), "{logs}");
    assert!(
        logs.contains(&format!("--out {}/ktb/token.json", shared.path().display())),
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_whose_body_trickles_or_never_ends_is_cut_short() {
    for (how, says) in [
        (Misbehaviour::EndlessRefusal, "larger than"),
        (Misbehaviour::TrickledRefusal, "did not arrive within"),
    ] {
        let fake = FakeBroker::start(how).await;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("token.json");
        let mut agent = Agent::start(
            &["--url", &fake.url, "--out", out.to_str().unwrap(), "--idle-limit", "2s"],
            &[("KTB_CONSUMER_CREDENTIAL", "ktb_any")],
        );
        let pid = agent.child.id();
        let mut rss_max = 0;
        wait_for("a reconnect", Duration::from_secs(30), || {
            rss_max = rss_max.max(common::rss_kib(pid));
            let done = fake.connections() >= 2;
            async move { done.then_some(()) }
        })
        .await;
        assert!(rss_max < 64 * 1024, "{says}: the agent stays small ({rss_max} KiB)");
        // And SIGTERM is obeyed mid-answer.
        agent.signal("TERM");
        assert!(
            agent.exit(Duration::from_secs(5)).await.success(),
            "{says}: exits 0 at once"
        );
        let _ = says;
    }
}

/// The lines of `path` (none while it does not exist).
fn lines_of(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .map(|t| t.lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_write_in_env_format_runs_the_command_and_signals_the_engine() {
    let (sim, key) = sim_with_key(Duration::from_secs(3)).await;
    let served = Served::start(&sim, &key, FAST_REFRESH, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ktb/token.env");
    let (exec_log, hup_log, pid_file) = (
        dir.path().join("exec.log"),
        dir.path().join("hup.log"),
        dir.path().join("engine.pid"),
    );
    // An "engine" that counts the SIGHUPs it gets.
    let mut engine = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!(
            "trap 'echo hup >> {}' HUP; echo $$ > {}; while :; do sleep 0.05; done",
            hup_log.display(),
            pid_file.display()
        ))
        .spawn()
        .unwrap();
    wait_for("the engine's PID file", Duration::from_secs(5), || {
        let ready = std::fs::read_to_string(&pid_file).is_ok_and(|t| t.ends_with('\n'));
        async move { ready.then_some(()) }
    })
    .await;
    let env_log = dir.path().join("exec.env");
    let exec = format!(
        "test -s \"$KTB_TOKEN_FILE\" && env >> {} && echo \"$KTB_TOKEN_FILE\" >> {}",
        env_log.display(),
        exec_log.display()
    );
    let agent = Agent::start(
        &[
            "--url",
            &served.api,
            "--out",
            out.to_str().unwrap(),
            "--format",
            "env",
            "--exec",
            &exec,
            "--signal",
            "hup",
            "--signal-pid-file",
            pid_file.to_str().unwrap(),
        ],
        &[("KTB_CONSUMER_CREDENTIAL", &served.credential)],
    );
    // Two writes (the first token and a refresh): each ran both hooks.
    wait_for("two writes, each with its hooks", Duration::from_secs(20), || {
        let done = lines_of(&exec_log).len() >= 2 && lines_of(&hup_log).len() >= 2;
        async move { done.then_some(()) }
    })
    .await;
    assert!(
        lines_of(&exec_log).iter().all(|l| l == out.to_str().unwrap()),
        "KTB_TOKEN_FILE names the file"
    );
    let text = std::fs::read_to_string(&out).unwrap();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}='")))
            .and_then(|v| v.strip_suffix('\''))
            .unwrap_or_else(|| panic!("{name} in the env file"))
            .to_owned()
    };
    assert!(sim.state().token_is_valid(&field("KTB_TOKEN")));
    assert!(field("KTB_EXPIRES_AT").ends_with('Z'));
    assert_eq!(field("KTB_ACCOUNT"), "main");
    let env = std::fs::read_to_string(&env_log).unwrap();
    assert!(
        !env.contains(&served.credential) && !env.contains("KTB_CONSUMER_CREDENTIAL"),
        "the command never gets the consumer's credential"
    );
    assert!(!env.contains(&field("KTB_TOKEN")), "nor the token");
    let logs = agent.stderr();
    assert!(logs.contains("signalled the engine"), "{logs}");
    assert!(!logs.contains(&field("KTB_TOKEN")), "no token in the agent's logs");
    let _ = engine.kill();
    let _ = engine.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reported_token_is_replaced_in_the_file_before_the_report_returns() {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    let served = Served::start(&sim, &key, "", &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("token.json");
    let agent = Agent::start(
        &[
            "--url",
            &served.api,
            "--out",
            out.to_str().unwrap(),
            "--report-listen",
            "127.0.0.1:0",
        ],
        &[("KTB_CONSUMER_CREDENTIAL", &served.credential)],
    );
    let first = file_token(out.clone(), Duration::from_secs(10), None).await;
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert!(json["expires_at"].is_string(), "{json}");
    assert!(
        json.get("expires_in").is_none(),
        "no countdown frozen at writing: {json}"
    );
    let addr = wait_for("the report endpoint", Duration::from_secs(10), || {
        let logs = agent.stderr();
        let addr = logs
            .lines()
            .find(|l| l.contains("report endpoint listening"))
            .and_then(|l| l.split("addr=").nth(1))
            .map(|rest| {
                rest.split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .trim_matches('"')
                    .to_owned()
            });
        async move { addr }
    })
    .await;
    let report = format!("http://{addr}/v1/report");
    let http = reqwest::Client::new();
    let calls = sim.state().token_calls().len();
    let json = ("content-type", "application/json");

    // What a page in a browser, or a DNS-rebound name, could send: refused.
    let from_a_page = http
        .post(&report)
        .header("origin", "https://evil.example")
        .header(json.0, json.1)
        .send()
        .await
        .unwrap();
    assert_eq!(from_a_page.status(), 403);
    let untyped = http.post(&report).send().await.unwrap();
    assert_eq!(untyped.status(), 415, "a form or text body needs no preflight: refused");
    let rebound = http
        .post(&report)
        .header("host", "evil.example")
        .header(json.0, json.1)
        .send()
        .await
        .unwrap();
    assert_eq!(rebound.status(), 403);
    assert_eq!(sim.state().token_calls().len(), calls, "nothing reached the broker");

    // A report of a token the file no longer holds changes nothing.
    let stale = http
        .post(&report)
        .header(json.0, json.1)
        .body(r#"{"token":"an-older-token"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(stale.status(), 200);
    assert_eq!(stale.json::<serde_json::Value>().await.unwrap()["reported"], false);
    assert_eq!(sim.state().token_calls().len(), calls, "no upstream call");

    // The report of the file's token: replaced before the answer.
    let answer = http
        .post(&report)
        .header(json.0, json.1)
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.json::<serde_json::Value>().await.unwrap()["reported"], true);
    let second = token_in(&out).expect("a token");
    assert_ne!(second, first, "the file holds the replacement when the report returns");
    assert!(sim.state().token_is_valid(&second));
    assert_eq!(sim.state().token_calls().len(), calls + 1, "one upstream call");
    // Two engines reporting the same token at once: one report.
    let both = futures_util::future::join(
        http.post(&report).header(json.0, json.1).send(),
        http.post(&report).header(json.0, json.1).send(),
    )
    .await;
    let mut reported = Vec::new();
    for answer in [both.0.unwrap(), both.1.unwrap()] {
        assert_eq!(answer.status(), 200);
        reported.push(answer.json::<serde_json::Value>().await.unwrap()["reported"] == true);
    }
    reported.sort();
    assert_eq!(reported, [false, true], "one reported, the other found the file newer");
    assert_eq!(sim.state().token_calls().len(), calls + 2, "one more upstream call");
    let third = token_in(&out).expect("a token");
    let logs = agent.stderr();
    assert!(
        !logs.contains(&first) && !logs.contains(&second) && !logs.contains(&third),
        "no token in the agent's logs"
    );

    // Anything but loopback is refused: the endpoint has no authentication.
    let mut open = Agent::start(
        &[
            "--url",
            &served.api,
            "--out",
            out.to_str().unwrap(),
            "--report-listen",
            "0.0.0.0:0",
        ],
        &[("KTB_CONSUMER_CREDENTIAL", &served.credential)],
    );
    assert_eq!(open.exit(Duration::from_secs(10)).await.code(), Some(2));
    assert!(open.stderr().contains("loopback only"), "{}", open.stderr());
}
