//! Reading a Server-Sent Events stream (the broker's watch stream), as the
//! agent and the tests do: one parser, bounded, strict.
//!
//! Lines end in `\n` (a trailing `\r` is dropped); `event:` names the event,
//! `data:` lines are joined with `\n`, `:` lines are comments; a blank line
//! ends a block. A block with data is an [`Item::Event`]; one without (the
//! broker's keep-alive comment) is an [`Item::KeepAlive`]. A line longer
//! than the parser's limit, an event larger than it, or data that is not
//! UTF-8 is an error, never a lossy conversion: a stream that is not the
//! broker's is dropped, not believed.

/// The longest line, and the largest event, the agent accepts (a token
/// event is about 400 bytes).
pub const MAX_EVENT_BYTES: usize = 64 * 1024;

/// The watch stream's event carrying a token (its data is the JSON body of
/// `GET /v1/token`).
pub const TOKEN_EVENT: &str = "token";
/// The watch stream's event saying no token can be served now (its data is
/// the problem body `GET /v1/token` would answer).
pub const UNAVAILABLE_EVENT: &str = "unavailable";

/// One complete block of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Event {
        name: String,
        data: String,
    },
    /// A block with no data: a comment kept the stream alive.
    KeepAlive,
}

/// Why the stream cannot be read as Server-Sent Events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("a line of the stream is longer than {MAX_EVENT_BYTES} bytes")]
    LineTooLong,
    #[error("an event of the stream is larger than {MAX_EVENT_BYTES} bytes")]
    EventTooLarge,
    #[error("the stream is not UTF-8 text")]
    NotUtf8,
}

/// The state between chunks.
#[derive(Debug)]
pub struct Parser {
    limit: usize,
    line: Vec<u8>,
    event: Option<String>,
    data: Option<String>,
}

impl Default for Parser {
    fn default() -> Self {
        Self::with_limit(MAX_EVENT_BYTES)
    }
}

impl Parser {
    /// A parser refusing lines and events over `limit` bytes.
    pub fn with_limit(limit: usize) -> Self {
        Self {
            limit,
            line: Vec::new(),
            event: None,
            data: None,
        }
    }

    /// Feeds a chunk; the blocks it completes. Each byte is looked at once.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<Item>, Error> {
        let mut items = Vec::new();
        let mut rest = chunk;
        while let Some(end) = rest.iter().position(|b| *b == b'\n') {
            self.extend_line(&rest[..end])?;
            rest = &rest[end + 1..];
            let mut line = std::mem::take(&mut self.line);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if let Some(item) = self.take_line(&line)? {
                items.push(item);
            }
        }
        self.extend_line(rest)?;
        Ok(items)
    }

    fn extend_line(&mut self, bytes: &[u8]) -> Result<(), Error> {
        if self.line.len() + bytes.len() > self.limit {
            return Err(Error::LineTooLong);
        }
        self.line.extend_from_slice(bytes);
        Ok(())
    }

    fn take_line(&mut self, line: &[u8]) -> Result<Option<Item>, Error> {
        if line.is_empty() {
            let event = self.event.take();
            return Ok(Some(match self.data.take() {
                Some(data) => Item::Event {
                    name: event.unwrap_or_else(|| "message".to_owned()),
                    data,
                },
                None => Item::KeepAlive,
            }));
        }
        if line.starts_with(b":") {
            return Ok(None);
        }
        let text = std::str::from_utf8(line).map_err(|_| Error::NotUtf8)?;
        let (field, value) = text.split_once(':').unwrap_or((text, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => self.event = Some(value.to_owned()),
            "data" => {
                let size = self.data.as_ref().map_or(0, |d| d.len() + 1) + value.len();
                if size > self.limit {
                    return Err(Error::EventTooLarge);
                }
                match &mut self.data {
                    Some(data) => {
                        data.push('\n');
                        data.push_str(value);
                    }
                    None => self.data = Some(value.to_owned()),
                }
            }
            _ => {} // id, retry and unknown fields: not used here
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(name: &str, data: &str) -> Item {
        Item::Event {
            name: name.into(),
            data: data.into(),
        }
    }

    #[test]
    fn events_are_read_across_chunks_and_keep_alives_told_apart() {
        let mut p = Parser::default();
        assert_eq!(p.push(b":\n\nevent: tok").unwrap(), vec![Item::KeepAlive]);
        let items = p
            .push(b"en\ndata: {\"token\":\"a\"}\n\n: x\n\nevent: unavailable\r\ndata: {}\r\n\r\n")
            .unwrap();
        assert_eq!(
            items,
            vec![
                event("token", "{\"token\":\"a\"}"),
                Item::KeepAlive,
                event("unavailable", "{}")
            ]
        );
        let items = p.push(b"data: a\ndata: b\n\n").unwrap();
        assert_eq!(items, vec![event("message", "a\nb")]);
    }

    #[test]
    fn endless_lines_big_events_and_bad_bytes_are_errors() {
        let mut p = Parser::with_limit(16);
        assert_eq!(p.push(&[b'a'; 10]).unwrap(), vec![]);
        assert_eq!(p.push(&[b'a'; 10]), Err(Error::LineTooLong));
        let mut p = Parser::with_limit(16);
        assert_eq!(p.push(b"data: 0123456789\n").unwrap(), vec![]);
        assert_eq!(p.push(b"data: 0123456789\n"), Err(Error::EventTooLarge));
        let mut p = Parser::default();
        assert_eq!(p.push(b"data: \xff\xfe\n\n"), Err(Error::NotUtf8));
    }

    #[test]
    fn a_large_stream_in_small_chunks_is_read_in_one_pass() {
        let mut p = Parser::default();
        let block = b"event: token\ndata: {\"token\":\"abc\"}\n\n";
        let mut seen = 0;
        for _ in 0..10_000 {
            for chunk in block.chunks(3) {
                seen += p.push(chunk).unwrap().len();
            }
        }
        assert_eq!(seen, 10_000);
    }
}
