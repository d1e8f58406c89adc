//! A Server-Sent Events reader for the watch stream's tests, on the
//! broker's own parser (the agent's).

use std::time::Duration;

use kraken_token_broker::sse::{Item, Parser};

/// One event: its name and data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: String,
    pub data: String,
}

impl SseEvent {
    /// The `token` field of a `token` event's JSON.
    pub fn token(&self) -> Option<String> {
        (self.event == kraken_token_broker::sse::TOKEN_EVENT)
            .then(|| serde_json::from_str::<serde_json::Value>(&self.data).ok())
            .flatten()
            .and_then(|v| v["token"].as_str().map(str::to_owned))
    }
}

/// An open watch stream.
pub struct SseReader {
    response: reqwest::Response,
    parser: Parser,
    ready: std::collections::VecDeque<SseEvent>,
    /// Keep-alives seen.
    pub comments: usize,
}

impl SseReader {
    /// Opens `url` with `bearer`; panics unless it answers 200 with an event stream.
    pub async fn open(http: &reqwest::Client, url: &str, bearer: &str) -> SseReader {
        let response = http
            .get(url)
            .bearer_auth(bearer)
            .send()
            .await
            .expect("the broker answers");
        assert_eq!(response.status(), 200, "the watch stream opens");
        let kind = response.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(kind.starts_with("text/event-stream"), "{kind}");
        SseReader {
            response,
            parser: Parser::default(),
            ready: std::collections::VecDeque::new(),
            comments: 0,
        }
    }

    /// The next event within `deadline`; `None` if the stream ended.
    pub async fn next(&mut self, deadline: Duration) -> Option<SseEvent> {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Some(event);
            }
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            assert!(!left.is_zero(), "no event within {deadline:?}");
            match tokio::time::timeout(left, self.response.chunk()).await {
                Ok(Ok(Some(chunk))) => {
                    for item in self.parser.push(&chunk).expect("the broker's stream is well-formed") {
                        match item {
                            Item::Event { name, data } => self.ready.push_back(SseEvent { event: name, data }),
                            Item::KeepAlive => self.comments += 1,
                        }
                    }
                }
                Ok(Ok(None)) | Ok(Err(_)) => return None,
                Err(_) => panic!("no event within {deadline:?}"),
            }
        }
    }

    /// Waits until the stream ends (within `deadline`), skipping events.
    pub async fn ended(&mut self, deadline: Duration) -> bool {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            match tokio::time::timeout(left, self.response.chunk()).await {
                Ok(Ok(Some(_))) => continue,
                Ok(Ok(None)) | Ok(Err(_)) => return true,
                Err(_) => return false,
            }
        }
    }
}
