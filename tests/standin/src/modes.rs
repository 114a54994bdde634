//! Scripted behaviours: which one applies to a request.
//!
//! A behaviour is chosen for the whole process (`--mode`, `STANDIN_MODE`) and can
//! be overridden per request by a marker anywhere in the request's text:
//! `STANDIN:<mode>` or `STANDIN:<mode>=<n>`. For `slow`, `n` is the delay in ms;
//! for every other mode it is a count: only the first `n` requests carrying that
//! marker (in the same message text) get the behaviour, later ones are served
//! normally. Counting per message text makes "fail once, then succeed" work for
//! clients that retry the same conversation (the planner's retry-with-error keeps
//! the document message; codex's follow-up keeps the prompt message).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// `large` without a count: 1024 deltas of 1 KiB.
const DEFAULT_DELTAS: u64 = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Normal,
    /// Responses: `response.failed`. Chat: HTTP 400.
    Fail,
    /// Delay before the answer and between SSE events.
    Slow,
    /// Responses: an SSE `data:` line that is not JSON. Chat: the message
    /// content is truncated JSON (the HTTP body itself is valid).
    Malformed,
    /// Chat/Responses: the HTTP body itself is not valid JSON.
    MalformedBody,
    /// HTTP 429 with `Retry-After`.
    RateLimit,
    /// HTTP 500.
    ServerError,
    /// Chat: a plan whose template lacks `{task}`.
    InvalidPlan,
    /// Responses: a final message streamed as many 1 KiB text deltas (`large=N`:
    /// N of them, default 1024), for throughput measurements.
    Large,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        Some(match s {
            "normal" | "edit" => Mode::Normal,
            "fail" | "failed" => Mode::Fail,
            "slow" => Mode::Slow,
            "malformed" => Mode::Malformed,
            "malformed-body" => Mode::MalformedBody,
            "429" | "rate-limit" => Mode::RateLimit,
            "500" | "server-error" => Mode::ServerError,
            "invalid-plan" => Mode::InvalidPlan,
            "large" => Mode::Large,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Normal => "normal",
            Mode::Fail => "fail",
            Mode::Slow => "slow",
            Mode::Malformed => "malformed",
            Mode::MalformedBody => "malformed-body",
            Mode::RateLimit => "429",
            Mode::ServerError => "500",
            Mode::InvalidPlan => "invalid-plan",
            Mode::Large => "large",
        }
    }
}

/// What was decided for one request.
#[derive(Clone, Copy, Debug)]
pub struct Chosen {
    pub mode: Mode,
    pub delay: Duration,
    /// For `large`: how many 1 KiB deltas.
    pub deltas: u64,
}

/// Process-wide settings plus the counters that make "first n" work.
pub struct Selector {
    pub mode: Mode,
    /// Apply the process mode to the first `times` POSTs only (None: all).
    pub times: Option<u64>,
    pub delay: Duration,
    counters: Mutex<HashMap<String, u64>>,
}

impl Selector {
    pub fn new(mode: Mode, times: Option<u64>, delay: Duration) -> Self {
        Selector {
            mode,
            times,
            delay,
            counters: Mutex::new(HashMap::new()),
        }
    }

    /// Picks the behaviour for a request whose message texts are `texts`.
    pub fn choose(&self, texts: &[String]) -> Chosen {
        for text in texts {
            if let Some((mode, arg)) = find_marker(text) {
                if mode == Mode::Slow {
                    let delay = arg.map(Duration::from_millis).unwrap_or(self.delay);
                    return Chosen { mode, delay, deltas: 0 };
                }
                if mode == Mode::Large {
                    let deltas = arg.unwrap_or(DEFAULT_DELTAS);
                    return Chosen {
                        mode,
                        delay: self.delay,
                        deltas,
                    };
                }
                let Some(n) = arg else {
                    return Chosen {
                        mode,
                        delay: self.delay,
                        deltas: 0,
                    };
                };
                // Key on the marker and the text that carries it, so distinct
                // prompts with the same marker count separately.
                let key = format!("{}={n}#{:016x}", mode.name(), fnv1a(text.as_bytes()));
                let seen = self.bump(key);
                let mode = if seen < n { mode } else { Mode::Normal };
                return Chosen {
                    mode,
                    delay: self.delay,
                    deltas: 0,
                };
            }
        }
        let seen = self.bump(String::from("\0process"));
        let mode = match self.times {
            Some(n) if seen >= n => Mode::Normal,
            _ => self.mode,
        };
        Chosen {
            mode,
            delay: self.delay,
            deltas: DEFAULT_DELTAS,
        }
    }

    /// Returns how many times `key` was seen before, and counts this one.
    fn bump(&self, key: String) -> u64 {
        let mut map = self.counters.lock().unwrap();
        let c = map.entry(key).or_insert(0);
        *c += 1;
        *c - 1
    }
}

/// Finds the first `STANDIN:<mode>[=<n>]` marker in `text`.
pub fn find_marker(text: &str) -> Option<(Mode, Option<u64>)> {
    let mut rest = text;
    while let Some(at) = rest.find("STANDIN:") {
        let after = &rest[at + "STANDIN:".len()..];
        let word: String = after
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '=')
            .collect();
        let (name, arg) = match word.split_once('=') {
            Some((n, a)) => (n, a.parse().ok()),
            None => (word.as_str(), None),
        };
        if let Some(mode) = Mode::parse(name) {
            return Some((mode, arg));
        }
        rest = after;
    }
    None
}

/// A tiny stable hash (FNV-1a, 64 bit), so names derived from text are
/// reproducible across runs and platforms.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_parse_and_count() {
        assert_eq!(find_marker("x STANDIN:fail y"), Some((Mode::Fail, None)));
        assert_eq!(find_marker("STANDIN:429=2."), Some((Mode::RateLimit, Some(2))));
        assert_eq!(find_marker("STANDIN-CMD: echo"), None);
        assert_eq!(find_marker("STANDIN:large=64"), Some((Mode::Large, Some(64))));
        let s = Selector::new(Mode::Normal, None, Duration::from_millis(5));
        let t = vec!["doc STANDIN:invalid-plan=1".to_string()];
        assert_eq!(s.choose(&t).mode, Mode::InvalidPlan);
        assert_eq!(s.choose(&t).mode, Mode::Normal);
        let other = vec!["other STANDIN:invalid-plan=1".to_string()];
        assert_eq!(s.choose(&other).mode, Mode::InvalidPlan);
    }

    #[test]
    fn process_mode_applies_first_n_times() {
        let s = Selector::new(Mode::RateLimit, Some(2), Duration::ZERO);
        let t = vec!["plain".to_string()];
        let got: Vec<Mode> = (0..3).map(|_| s.choose(&t).mode).collect();
        assert_eq!(got, vec![Mode::RateLimit, Mode::RateLimit, Mode::Normal]);
    }
}
