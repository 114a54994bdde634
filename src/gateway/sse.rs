//! Token usage read from answers as their bytes pass through the gateway.
//!
//! Streamed answers are Server-Sent Events, parsed incrementally: an event
//! may be split across any number of chunks, and a chunk may hold many
//! events. Only events that mention `usage` are parsed as JSON, so the text
//! deltas that make up most of a stream cost a scan and a copy, no more.
//! Non-streamed answers are one JSON document, kept (up to a cap) and parsed
//! at the end.

use serde_json::Value;

use super::Usage;

/// An event or document larger than this is not kept for usage counting (a
/// `response.completed` repeats the whole output, which is rarely this big).
const MAX_KEPT: usize = 32 << 20;

/// The usage one answer (or one event of it) reports, in either API's shape:
/// Responses (`usage.input_tokens`, `input_tokens_details.cached_tokens`,
/// `output_tokens`, at the top or under `response`) or Chat Completions
/// (`usage.prompt_tokens`, `prompt_tokens_details.cached_tokens`,
/// `completion_tokens`).
pub fn usage_of(v: &Value) -> Option<Usage> {
    let u = match v.get("usage") {
        Some(u) if u.is_object() => u,
        _ => v.get("response")?.get("usage").filter(|u| u.is_object())?,
    };
    let n = |v: Option<&Value>| v.and_then(Value::as_u64).unwrap_or(0);
    if u.get("input_tokens").is_some() || u.get("output_tokens").is_some() {
        return Some(Usage {
            input: n(u.get("input_tokens")),
            cached_input: n(u.pointer("/input_tokens_details/cached_tokens")),
            output: n(u.get("output_tokens")),
            requests: 0,
        });
    }
    if u.get("prompt_tokens").is_some() || u.get("completion_tokens").is_some() {
        return Some(Usage {
            input: n(u.get("prompt_tokens")),
            cached_input: n(u.pointer("/prompt_tokens_details/cached_tokens")),
            output: n(u.get("completion_tokens")),
            requests: 0,
        });
    }
    None
}

/// Feeds on an answer's bytes and reports the usage it carries.
#[derive(Debug)]
pub enum UsageReader {
    Sse(SseReader),
    Json(JsonReader),
    /// Neither SSE nor JSON: nothing to count.
    Other,
}

impl UsageReader {
    /// Picks the reader for an answer's `Content-Type`.
    pub fn for_content_type(content_type: &str) -> UsageReader {
        let ct = content_type.to_ascii_lowercase();
        if ct.starts_with("text/event-stream") {
            UsageReader::Sse(SseReader::default())
        } else if ct.contains("json") {
            UsageReader::Json(JsonReader::default())
        } else {
            UsageReader::Other
        }
    }

    /// Takes the next chunk; returns the usage completed by it, if any.
    pub fn feed(&mut self, chunk: &[u8]) -> Option<Usage> {
        match self {
            UsageReader::Sse(r) => r.feed(chunk),
            UsageReader::Json(r) => {
                r.feed(chunk);
                None
            }
            UsageReader::Other => None,
        }
    }

    /// The body ended: usage found only now (a JSON document, a last SSE event without its blank line).
    pub fn finish(&mut self) -> Option<Usage> {
        match self {
            UsageReader::Sse(r) => r.finish(),
            UsageReader::Json(r) => r.finish(),
            UsageReader::Other => None,
        }
    }
}

/// A JSON answer, kept until it ends.
#[derive(Debug, Default)]
pub struct JsonReader {
    body: Vec<u8>,
    too_big: bool,
}

impl JsonReader {
    fn feed(&mut self, chunk: &[u8]) {
        if self.too_big || self.body.len() + chunk.len() > MAX_KEPT {
            self.too_big = true;
            self.body = Vec::new();
            return;
        }
        self.body.extend_from_slice(chunk);
    }

    fn finish(&mut self) -> Option<Usage> {
        let body = std::mem::take(&mut self.body);
        serde_json::from_slice::<Value>(&body).ok().as_ref().and_then(usage_of)
    }
}

/// The SSE line protocol: lines end in `\n` or `\r\n`; `data:` lines of one
/// event are joined with `\n`; a blank line ends the event.
#[derive(Debug, Default)]
pub struct SseReader {
    /// The current line so far (a line split across chunks).
    line: Vec<u8>,
    /// The current event's data so far.
    data: Vec<u8>,
    has_data: bool,
    /// The current event got too large to keep; skip it to its end.
    skipping: bool,
}

impl SseReader {
    pub fn feed(&mut self, mut chunk: &[u8]) -> Option<Usage> {
        let mut found: Option<Usage> = None;
        while let Some(at) = memchr::memchr(b'\n', chunk) {
            let (head, rest) = chunk.split_at(at);
            chunk = &rest[1..];
            let usage = if self.line.is_empty() {
                self.line_done(head)
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(head);
                let u = self.line_done(&line);
                line.clear();
                self.line = line; // keep the allocation
                u
            };
            found = add(found, usage);
        }
        if !chunk.is_empty() {
            if self.line.len() + chunk.len() > MAX_KEPT {
                self.skipping = true;
                self.line.clear();
            } else {
                self.line.extend_from_slice(chunk);
            }
        }
        found
    }

    /// The stream ended: an event not closed by a blank line still counts.
    pub fn finish(&mut self) -> Option<Usage> {
        let line = std::mem::take(&mut self.line);
        let mut found = None;
        if !line.is_empty() {
            found = self.line_done(&line);
        }
        add(found, self.line_done(b""))
    }

    fn line_done(&mut self, line: &[u8]) -> Option<Usage> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            return self.event_done();
        }
        if self.skipping {
            return None;
        }
        let Some(value) = line.strip_prefix(b"data:") else {
            return None; // `event:`, `id:`, `retry:`, comments: usage is in the data
        };
        let value = value.strip_prefix(b" ").unwrap_or(value);
        if self.data.len() + value.len() > MAX_KEPT {
            self.skipping = true;
            self.data.clear();
            return None;
        }
        if self.has_data {
            self.data.push(b'\n');
        }
        self.data.extend_from_slice(value);
        self.has_data = true;
        None
    }

    fn event_done(&mut self) -> Option<Usage> {
        let skipped = std::mem::replace(&mut self.skipping, false);
        let has_data = std::mem::replace(&mut self.has_data, false);
        let usage = if !skipped && has_data && mentions_usage(&self.data) {
            serde_json::from_slice::<Value>(&self.data)
                .ok()
                .as_ref()
                .and_then(usage_of)
        } else {
            None
        };
        self.data.clear();
        usage
    }
}

fn mentions_usage(data: &[u8]) -> bool {
    // Built once: building a searcher costs more than searching one event.
    static USAGE: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"usage\""));
    USAGE.find(data).is_some()
}

fn add(a: Option<Usage>, b: Option<Usage>) -> Option<Usage> {
    match (a, b) {
        (Some(mut a), Some(b)) => {
            a.add(&b);
            Some(a)
        }
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RESPONSES: &str = "event: response.created\n\
        data: {\"type\":\"response.created\",\"response\":{\"id\":\"r\",\"usage\":null}}\n\n\
        event: response.output_text.delta\n\
        data: {\"type\":\"response.output_text.delta\",\"delta\":\"hi\"}\n\n\
        event: response.completed\n\
        data: {\"type\":\"response.completed\",\"response\":{\"id\":\"r\",\"usage\":{\"input_tokens\":1000,\
        \"input_tokens_details\":{\"cached_tokens\":200},\"output_tokens\":50,\"total_tokens\":1050}}}\n\n";

    fn expected() -> Usage {
        Usage {
            input: 1000,
            cached_input: 200,
            output: 50,
            requests: 0,
        }
    }

    #[test]
    fn responses_stream_in_any_split() {
        let bytes = RESPONSES.as_bytes();
        // Every split point, and byte by byte: events cut anywhere still count once.
        for cut in 0..bytes.len() {
            let mut r = SseReader::default();
            let got = add(r.feed(&bytes[..cut]), r.feed(&bytes[cut..]));
            assert_eq!(add(got, r.finish()), Some(expected()), "cut at {cut}");
        }
        let mut r = SseReader::default();
        let mut got = None;
        for b in bytes {
            got = add(got, r.feed(std::slice::from_ref(b)));
        }
        assert_eq!(got, Some(expected()));
        // With CRLF line ends.
        let crlf = RESPONSES.replace('\n', "\r\n");
        assert_eq!(SseReader::default().feed(crlf.as_bytes()), Some(expected()));
    }

    #[test]
    fn a_last_event_without_blank_line_counts_at_the_end() {
        let text = RESPONSES.trim_end();
        let mut r = SseReader::default();
        assert_eq!(r.feed(text.as_bytes()), None);
        assert_eq!(r.finish(), Some(expected()));
    }

    #[test]
    fn chat_chunks_and_json_bodies() {
        let chunks = "data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}],\"usage\":null}\n\n\
            data: {\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":3,\
            \"prompt_tokens_details\":{\"cached_tokens\":4}}}\n\ndata: [DONE]\n\n";
        let want = Usage {
            input: 12,
            cached_input: 4,
            output: 3,
            requests: 0,
        };
        let mut r = UsageReader::for_content_type("text/event-stream; charset=utf-8");
        assert_eq!(r.feed(chunks.as_bytes()), Some(want));
        assert_eq!(r.finish(), None);

        let chat = br#"{"id":"c","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":4}}}"#;
        let mut r = UsageReader::for_content_type("application/json");
        assert_eq!(r.feed(&chat[..10]), None);
        assert_eq!(r.feed(&chat[10..]), None);
        assert_eq!(r.finish(), Some(want));

        let resp = br#"{"id":"r","object":"response","usage":{"input_tokens":1000,"input_tokens_details":{"cached_tokens":200},"output_tokens":50}}"#;
        let mut r = UsageReader::for_content_type("application/json");
        r.feed(resp);
        assert_eq!(r.finish(), Some(expected()));

        let mut r = UsageReader::for_content_type("text/plain");
        r.feed(resp);
        assert_eq!(r.finish(), None);
    }

    #[test]
    fn multi_line_data_and_broken_json_are_handled() {
        let text = "data: {\"usage\":\ndata: {\"input_tokens\":5,\"output_tokens\":1}}\n\n\
                    data: {\"usage\": not json\n\n";
        let mut r = SseReader::default();
        assert_eq!(
            r.feed(text.as_bytes()),
            Some(Usage {
                input: 5,
                cached_input: 0,
                output: 1,
                requests: 0
            })
        );
    }
}
