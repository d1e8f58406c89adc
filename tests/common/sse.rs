//! A minimal Server-Sent Events reader for the watch stream's tests.

use std::time::Duration;

/// One event: its name and data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: String,
    pub data: String,
}

impl SseEvent {
    /// The `token` field of a `token` event's JSON.
    pub fn token(&self) -> Option<String> {
        (self.event == "token")
            .then(|| serde_json::from_str::<serde_json::Value>(&self.data).ok())
            .flatten()
            .and_then(|v| v["token"].as_str().map(str::to_owned))
    }
}

/// An open watch stream.
pub struct SseReader {
    response: reqwest::Response,
    buffer: String,
    /// Comment lines seen (keep-alives).
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
            buffer: String::new(),
            comments: 0,
        }
    }

    /// The next event within `deadline`; `None` if the stream ended.
    pub async fn next(&mut self, deadline: Duration) -> Option<SseEvent> {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (mut event, mut data) = (String::from("message"), Vec::new());
                for line in block.lines() {
                    if line.starts_with(':') {
                        self.comments += 1;
                    } else if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim_start().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push(v.strip_prefix(' ').unwrap_or(v).to_owned());
                    }
                }
                if !data.is_empty() {
                    return Some(SseEvent {
                        event,
                        data: data.join("\n"),
                    });
                }
            }
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            assert!(!left.is_zero(), "no event within {deadline:?}");
            match tokio::time::timeout(left, self.response.chunk()).await {
                Ok(Ok(Some(chunk))) => self.buffer.push_str(&String::from_utf8_lossy(&chunk)),
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
