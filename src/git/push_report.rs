//! The remote's answer to a push: report-status, over side-band when
//! offered (band 1 carries report-status's own pkt-lines, band 2 what the
//! remote prints, band 3 a fatal error).

use std::collections::HashMap;

use gix::bstr::ByteSlice;
use gix::protocol::transport::client::blocking_io::ExtendedBufRead;
use gix::protocol::transport::packetline::{self, BandRef, PacketLineRef};

use super::{describe, redact, remote_or_protocol, remote_or_transport, PushError};

/// The report-status lines we keep at most (one per ref, plus `unpack`);
/// more from a remote is a broken or hostile one.
const MAX_REPORT_BYTES: usize = 4 << 20;

/// The remote's report-status.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Report {
    /// `None` for `unpack ok`.
    pub(super) unpack_error: Option<String>,
    pub(super) refs: HashMap<String, Result<(), String>>,
    /// What the remote printed (side-band 2: hook output, `error: ...`), last lines only.
    pub(super) messages: Vec<String>,
}

/// Reads the answer to the commands up to the final flush (which, with
/// side-band, comes after the post-receive hooks: waiting for it lets the
/// remote finish before the caller drops the connection).
pub(super) fn read_report(
    reader: &mut dyn ExtendedBufRead<'_>,
    sideband: bool,
    url: &str,
) -> Result<Report, PushError> {
    let protocol = |message: String| PushError::Protocol {
        url: url.to_string(),
        message: redact(&message),
    };
    let mut data = Vec::new();
    let mut lines: Vec<String> = Vec::new();
    let mut messages = Vec::new();
    while let Some(line) = reader.readline() {
        let line = match line {
            Ok(Ok(line)) => line,
            Ok(Err(err)) => return Err(remote_or_protocol(url, &describe(&err))),
            Err(err) => return Err(remote_or_transport(url, &err)),
        };
        let PacketLineRef::Data(d) = line else { continue };
        if !sideband {
            lines.push(redact(d.to_str_lossy().trim_end_matches('\n')));
            continue;
        }
        match line.decode_band().map_err(|err| protocol(describe(&err)))? {
            BandRef::Data(d) => {
                if data.len() + d.len() > MAX_REPORT_BYTES {
                    return Err(protocol("the status report is too large".into()));
                }
                data.extend_from_slice(d);
            }
            BandRef::Progress(d) => keep_messages(&mut messages, d),
            BandRef::Error(d) => {
                return Err(PushError::Remote {
                    url: url.to_string(),
                    message: redact(d.to_str_lossy().trim()),
                })
            }
        }
    }
    if sideband {
        lines = pkt_lines(&data).map_err(protocol)?;
    }
    let mut report = parse_report(&lines).map_err(protocol)?;
    report.messages = messages;
    Ok(report)
}

/// The pkt-lines of side-band 1's payload, up to its own flush.
pub(super) fn pkt_lines(mut data: &[u8]) -> Result<Vec<String>, String> {
    let mut lines = Vec::new();
    while !data.is_empty() {
        match packetline::decode::streaming(data) {
            Ok(packetline::decode::Stream::Complete { line, bytes_consumed }) => {
                data = &data[bytes_consumed..];
                match line {
                    PacketLineRef::Data(d) => lines.push(redact(d.to_str_lossy().trim_end_matches('\n'))),
                    _ => break,
                }
            }
            Ok(packetline::decode::Stream::Incomplete { .. }) => {
                return Err("the status report ends in the middle of a line".into())
            }
            Err(err) => return Err(format!("the status report is malformed: {}", describe(&err))),
        }
    }
    Ok(lines)
}

/// `unpack ok|<error>`, then `ok <ref>` or `ng <ref> <reason>` per command.
pub(super) fn parse_report(lines: &[String]) -> Result<Report, String> {
    let mut lines = lines.iter();
    let unpack = match lines.next().and_then(|l| l.strip_prefix("unpack ")) {
        Some(status) => status,
        None => return Err("the remote sent no status report".into()),
    };
    let mut report = Report {
        unpack_error: (unpack != "ok").then(|| unpack.to_string()),
        ..Report::default()
    };
    for line in lines {
        if let Some(name) = line.strip_prefix("ok ") {
            report.refs.insert(name.to_string(), Ok(()));
        } else if let Some(rest) = line.strip_prefix("ng ") {
            let (name, reason) = rest.split_once(' ').unwrap_or((rest, "rejected"));
            report.refs.insert(name.to_string(), Err(reason.to_string()));
        }
        // Anything else (report-status-v2's `option` lines) is not ours to read.
    }
    Ok(report)
}

/// Keeps the remote's last few lines of text for the reasons of a refusal.
fn keep_messages(messages: &mut Vec<String>, text: &[u8]) {
    const KEEP: usize = 20;
    for line in text.to_str_lossy().split(['\n', '\r']) {
        let line = line.trim();
        if !line.is_empty() {
            messages.push(redact(&line.chars().take(300).collect::<String>()));
        }
    }
    if messages.len() > KEEP {
        messages.drain(..messages.len() - KEEP);
    }
}

pub(super) fn with_remote_messages(reason: &str, messages: &[String]) -> String {
    if messages.is_empty() {
        reason.to_string()
    } else {
        format!("{reason} (remote: {})", messages.join("; "))
    }
}
