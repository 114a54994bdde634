//! An agent's output, as bytes, cut into lines for the log and the event parser.
//!
//! The agent is untrusted and its output is whatever it prints: invalid UTF-8 is replaced
//! (U+FFFD), a line longer than [`MAX_LINE`] is cut there and marked, and the rest of it is
//! dropped up to its newline. Memory stays bounded whatever arrives, and the reader never
//! stops early: an agent whose pipe is no longer read dies of SIGPIPE.

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc::UnboundedSender;

use super::Output;

/// The longest line kept whole.
pub const MAX_LINE: usize = 1024 * 1024;

/// What ends a line that was cut at [`MAX_LINE`].
pub const CUT_MARK: &str = " [cohort: line cut at 1 MiB]";

/// Collects bytes into lines; one per output stream.
#[derive(Debug, Default)]
pub struct LineSplitter {
    buf: Vec<u8>,
    /// The current line was cut: drop bytes until its newline.
    skipping: bool,
}

impl LineSplitter {
    /// Feeds a chunk; calls `emit` for every line it completes (without its `\n` or `\r\n`).
    pub fn push(&mut self, mut data: &[u8], mut emit: impl FnMut(String)) {
        while !data.is_empty() {
            let newline = data.iter().position(|b| *b == b'\n');
            if self.skipping {
                match newline {
                    Some(i) => {
                        self.skipping = false;
                        data = &data[i + 1..];
                    }
                    None => return,
                }
                continue;
            }
            let take = newline.map_or(data.len(), |i| i);
            let room = MAX_LINE - self.buf.len();
            if take > room {
                self.buf.extend_from_slice(&data[..room]);
                emit(cut(&self.buf));
                self.buf.clear();
                self.skipping = true;
                data = &data[room..];
                continue;
            }
            self.buf.extend_from_slice(&data[..take]);
            match newline {
                Some(i) => {
                    emit(whole(&self.buf));
                    self.buf.clear();
                    data = &data[i + 1..];
                }
                None => return,
            }
        }
    }

    /// The last line when the output ended without a newline.
    pub fn finish(&mut self, mut emit: impl FnMut(String)) {
        if !self.buf.is_empty() {
            emit(whole(&self.buf));
            self.buf.clear();
        }
        self.skipping = false;
    }
}

fn whole(line: &[u8]) -> String {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    String::from_utf8_lossy(line).into_owned()
}

fn cut(line: &[u8]) -> String {
    // The cut may fall inside a multi-byte character; lossy decoding marks it.
    let mut s = String::from_utf8_lossy(line).into_owned();
    s.push_str(CUT_MARK);
    s
}

/// Reads `reader` to its end, sending its lines as `wrap(line)`. A read error ends it like
/// the end of the stream (the process is gone or its pipe broke).
pub async fn forward<R: AsyncRead + Unpin>(mut reader: R, tx: UnboundedSender<Output>, wrap: fn(String) -> Output) {
    let mut lines = LineSplitter::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => lines.push(&buf[..n], |l| {
                let _ = tx.send(wrap(l));
            }),
        }
    }
    lines.finish(|l| {
        let _ = tx.send(wrap(l));
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]]) -> Vec<String> {
        let mut out = Vec::new();
        let mut s = LineSplitter::default();
        for c in chunks {
            s.push(c, |l| out.push(l));
        }
        s.finish(|l| out.push(l));
        out
    }

    #[test]
    fn lines_across_chunks_and_crlf() {
        assert_eq!(split(&[b"ab", b"c\nde\r\n", b"f"]), ["abc", "de", "f"]);
        assert_eq!(split(&[b"\n\n"]), ["", ""]);
    }

    #[test]
    fn invalid_utf8_is_replaced() {
        assert_eq!(split(&[b"x\xff\n", b"ok\n"]), ["x\u{fffd}", "ok"]);
    }

    #[test]
    fn long_lines_are_cut_and_the_rest_dropped() {
        let long = vec![b'a'; MAX_LINE + 10];
        let mut chunks: Vec<&[u8]> = long.chunks(4096).collect();
        chunks.push(b"tail\nnext\n");
        let out = split(&chunks);
        assert_eq!(out.len(), 2, "the cut line, then the next one");
        assert!(out[0].ends_with(CUT_MARK));
        assert_eq!(out[0].len(), MAX_LINE + CUT_MARK.len());
        assert_eq!(out[1], "next");
        // Exactly MAX_LINE bytes is still whole.
        let exact = [vec![b'b'; MAX_LINE], b"\n".to_vec()].concat();
        let out = split(&[&exact]);
        assert_eq!(out[0].len(), MAX_LINE);
        assert!(!out[0].ends_with(CUT_MARK));
    }

    #[test]
    fn endless_line_keeps_memory_bounded() {
        let mut s = LineSplitter::default();
        let chunk = vec![b'z'; 1 << 20];
        let mut lines = 0;
        for _ in 0..50 {
            s.push(&chunk, |_| lines += 1);
            assert!(s.buf.len() <= MAX_LINE);
        }
        assert_eq!(lines, 1, "one cut line for 50 MiB without a newline");
    }
}
