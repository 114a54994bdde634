//! Push over git's receive-pack protocol, in-process.
//!
//! gix fetches but does not push, so this puts a push together from its
//! parts: gix-protocol's handshake (with the same credential retry on a 401
//! that fetch gets), the transport's request writer for the commands and the
//! pack, and gix-pack's pack generator.
//!
//! Every update is a compare-and-swap twice over. Here, against the value
//! the remote advertises: an update whose expectation is stale is not sent
//! at all (`git push --force-with-lease=ref:expect`). Then by receive-pack
//! itself: each command carries the advertised value as its old value, so a
//! ref that moves between the advertisement and the update is refused there.

use std::collections::{HashMap, HashSet};
use std::io::{self, BufWriter, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use gix::bstr::ByteSlice;
use gix::protocol::handshake::Ref;
use gix::protocol::transport::client::blocking_io::Transport;
use gix::protocol::transport::client::{MessageKind, TransportWithoutIO, WriteMode};
use gix::protocol::transport::packetline::{self, blocking_io::encode};
use gix::protocol::transport::{Protocol, Service};

// Everything a remote says reaches cohort's messages through `redact`.
use super::remote::{chain, untrusted_text as redact};
use super::{short, Oid};

#[path = "push_pack.rs"]
mod pack;
#[path = "push_report.rs"]
mod report;

#[cfg(test)]
use report::{parse_report, pkt_lines};
use report::{read_report, with_remote_messages};

/// One ref to move on the remote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    /// The full ref name, e.g. `refs/heads/cohort/service`.
    pub name: String,
    /// The remote's value at our last fetch; `None`: the ref must not exist there.
    pub expect: Option<Oid>,
    /// The value to set. The null id deletes the ref (if the remote allows deletions).
    pub new: Oid,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefOutcome {
    Updated,
    /// The remote already had `new`: nothing was sent for this ref.
    UpToDate,
    /// Not moved: a stale expectation (not sent), or the remote's refusal
    /// (non-fast-forward, a hook, a lost race) with its reason.
    Rejected {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    /// Every update, in the order given.
    pub refs: Vec<(String, RefOutcome)>,
    /// Objects in the pack sent (0 when no pack was sent).
    pub objects: usize,
    /// Bytes of the pack sent, header and trailing checksum included.
    pub pack_bytes: u64,
}

/// Why a push failed as a whole. Messages never hold a URL's user or password.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("cannot connect to {url} to push: {message}")]
    Connect { url: String, message: String },
    #[error("{url} refused the credentials for the push (or none were available): {message}")]
    Auth { url: String, message: String },
    #[error("{url} answered the push in a way cohort does not understand: {message}")]
    Protocol { url: String, message: String },
    #[error("cannot build the pack to push: {message}")]
    Pack { message: String },
    #[error("the connection to {url} failed during the push: {message}")]
    Transport { url: String, message: String },
    #[error("{url} could not unpack the pushed objects ({message}); no ref was updated")]
    Unpack { url: String, message: String },
    #[error("{url} aborted the push: {message}")]
    Remote { url: String, message: String },
    #[error("cannot push {name}: {reason}")]
    InvalidUpdate { name: String, reason: String },
    #[error("the push was interrupted")]
    Interrupted,
}

/// The credential callback, as gix's own fetch takes it (the git credential
/// helpers, through `config_snapshot().credential_helpers(url)`).
pub type Authenticate<'a> =
    dyn FnMut(gix::credentials::helper::Action) -> gix::Result<Option<gix::credentials::protocol::Outcome>> + 'a;

/// Pushes `updates` over `transport` (see the module doc for the
/// compare-and-swap). `authenticate` is asked for credentials when the
/// remote wants them. A refusal of single refs is an `Ok` with `Rejected`
/// outcomes; a failure of the whole push is an `Err`.
pub fn push(
    repo: &gix::Repository,
    transport: &mut dyn Transport,
    authenticate: &mut Authenticate<'_>,
    updates: &[Update],
    interrupt: &AtomicBool,
) -> Result<Pushed, PushError> {
    check_updates(updates)?;
    let url = redact(&transport.to_url().to_str_lossy());
    let interrupted = || interrupt.load(Ordering::Relaxed);
    if interrupted() {
        return Err(PushError::Interrupted);
    }

    let handshake = gix::protocol::handshake(
        &mut *transport,
        Service::ReceivePack,
        &mut *authenticate,
        Vec::new(),
        &mut gix::progress::Discard,
    )
    .map_err(|err| {
        let message = describe(&err);
        if err.is_unauthenticated() || err.is_permission_denied() {
            PushError::Auth {
                url: url.clone(),
                message,
            }
        } else {
            PushError::Connect {
                url: url.clone(),
                message,
            }
        }
    })?;
    if handshake.server_protocol_version == Protocol::V2 {
        // receive-pack has no protocol v2: it answers v0 whatever was asked.
        return Err(PushError::Protocol {
            url,
            message: "receive-pack answered in protocol v2".into(),
        });
    }
    let advertised = Advertised::from_refs(handshake.refs.as_deref().unwrap_or_default());
    let caps = &handshake.capabilities;
    let null = Oid::null(repo.object_hash());

    // What to send: stale expectations and up-to-date refs are settled here.
    let mut outcomes: Vec<Option<RefOutcome>> = vec![None; updates.len()];
    let mut commands: Vec<(usize, Oid)> = Vec::new(); // (update index, old value)
    for (i, u) in updates.iter().enumerate() {
        let theirs = advertised.values.get(&u.name).copied();
        let delete = u.new.is_null();
        outcomes[i] = if theirs == Some(u.new) || (delete && theirs.is_none()) {
            Some(RefOutcome::UpToDate)
        } else if theirs != u.expect {
            Some(RefOutcome::Rejected {
                reason: format!(
                    "stale info: the remote has {}, expected {}",
                    theirs.map(short).unwrap_or_else(|| "no such ref".into()),
                    u.expect.map(short).unwrap_or_else(|| "no such ref".into()),
                ),
            })
        } else if delete && !caps.contains("delete-refs") {
            Some(RefOutcome::Rejected {
                reason: "the remote does not accept deletions (no delete-refs)".into(),
            })
        } else {
            commands.push((i, theirs.unwrap_or(null)));
            None
        };
    }
    if interrupted() {
        return Err(PushError::Interrupted);
    }

    if commands.is_empty() {
        // Nothing to send. A receive-pack on the other end of a pipe waits
        // for its commands: an empty list (a flush) lets it exit cleanly, as
        // git does. Over http, no request was started.
        if transport.connection_persists_across_multiple_requests() {
            let flush = transport
                .request(WriteMode::Binary, MessageKind::Flush, false)
                .map_err(|err| transport_error(&url, &err))?;
            flush.into_read().map_err(|err| transport_error(&url, &err))?;
        }
        return Ok(finish(updates, outcomes, 0, 0));
    }

    // Count before the request starts: over http the request is the upload,
    // and a server should not wait on us walking history.
    let tips: Vec<(&str, Oid)> = commands
        .iter()
        .map(|&(i, _)| (updates[i].name.as_str(), updates[i].new))
        .filter(|(_, new)| !new.is_null())
        .collect();
    let counted = if tips.is_empty() {
        None // only deletions: git sends no pack then
    } else {
        Some(pack::count(
            repo,
            &tips,
            &advertised.objects,
            caps.contains("ofs-delta"),
            interrupt,
        )?)
    };
    let objects = counted.as_ref().map_or(0, |c| c.len());

    let mut lines = Vec::with_capacity(commands.len());
    for (n, &(i, old)) in commands.iter().enumerate() {
        let u = &updates[i];
        let mut line = format!("{old} {} {}", u.new, u.name);
        if n == 0 {
            line.push('\0');
            line.push_str(&requested_capabilities(caps, commands.len()));
        }
        lines.push(line);
    }
    let sideband = caps.contains("side-band-64k");

    let request = transport
        .request(WriteMode::Binary, MessageKind::Flush, false)
        .map_err(|err| transport_error(&url, &err))?;
    let (raw, mut reader) = request.into_parts();
    let mut out = Tracked::new(BufWriter::with_capacity(64 * 1024, raw));
    let sent = send(&mut out, &lines, counted, repo, interrupt);
    let flushed = sent.and_then(|bytes| match out.flush() {
        Ok(()) => Ok(bytes),
        Err(_) => Err(SendError::Io),
    });
    let io_failure = out.failure.take();
    // The request body ends here: over http this finishes the upload, and the
    // answer can only be read after it.
    drop(out);
    let pack_bytes = match flushed {
        Ok(bytes) => bytes,
        Err(SendError::Interrupted) => return Err(PushError::Interrupted),
        Err(SendError::Pack(message)) => return Err(PushError::Pack { message }),
        Err(SendError::Io) => {
            // The remote may have answered why it stopped reading (a 401 on
            // the upload, a fatal error): that says more than a broken pipe.
            if let Err(err @ (PushError::Auth { .. } | PushError::Remote { .. })) =
                read_report(&mut *reader, sideband, &url)
            {
                return Err(err);
            }
            return Err(PushError::Transport {
                url,
                message: io_failure.unwrap_or_else(|| "the request could not be written".into()),
            });
        }
    };
    // No interruption from here: the remote has the whole push and decides;
    // its answer is what tells whether refs moved.
    let report = if caps.contains("report-status") {
        Some(read_report(&mut *reader, sideband, &url)?)
    } else {
        // Without report-status the remote says nothing per ref; git takes
        // silence for success, and so do we. Drain to let it finish.
        while let Some(Ok(Ok(_))) = reader.readline() {}
        None
    };
    if let Some(report) = &report {
        if let Some(reason) = &report.unpack_error {
            return Err(PushError::Unpack {
                url,
                message: with_remote_messages(reason, &report.messages),
            });
        }
    }
    let messages = report.as_ref().map_or(&[][..], |r| r.messages.as_slice());
    for &(i, _) in &commands {
        let status = report.as_ref().map(|r| r.refs.get(&updates[i].name));
        outcomes[i] = Some(match status {
            None | Some(Some(Ok(()))) => RefOutcome::Updated,
            Some(Some(Err(reason))) => RefOutcome::Rejected {
                reason: with_remote_messages(reason, messages),
            },
            Some(None) => RefOutcome::Rejected {
                reason: "the remote reported no status for this ref".into(),
            },
        });
    }
    Ok(finish(updates, outcomes, objects, pack_bytes))
}

/// Ref names that receive-pack would refuse as a whole, and an update listed
/// twice (whose outcome would be ambiguous), fail before anything is sent.
fn check_updates(updates: &[Update]) -> Result<(), PushError> {
    let mut seen = HashSet::new();
    for u in updates {
        let invalid = |reason: &str| PushError::InvalidUpdate {
            name: u.name.clone(),
            reason: reason.into(),
        };
        if !u.name.starts_with("refs/") || gix::refs::FullName::try_from(u.name.as_str()).is_err() {
            return Err(invalid("not a valid full ref name (refs/...)"));
        }
        if !seen.insert(u.name.as_str()) {
            return Err(invalid("listed twice in one push"));
        }
    }
    Ok(())
}

fn finish(updates: &[Update], outcomes: Vec<Option<RefOutcome>>, objects: usize, pack_bytes: u64) -> Pushed {
    let refs = updates
        .iter()
        .zip(outcomes)
        .map(|(u, o)| {
            let o = o.unwrap_or(RefOutcome::Rejected {
                reason: "not sent".into(),
            });
            (u.name.clone(), o)
        })
        .collect();
    Pushed {
        refs,
        objects,
        pack_bytes,
    }
}

/// What the remote has: each advertised ref's value (a tag's own id for an
/// annotated tag), and every object id it advertised, peeled ones included.
struct Advertised {
    values: HashMap<String, Oid>,
    objects: Vec<Oid>,
}

impl Advertised {
    fn from_refs(refs: &[Ref]) -> Advertised {
        let mut values = HashMap::new();
        let mut objects = Vec::new();
        for r in refs {
            let (name, value, peeled) = r.unpack();
            if let Some(value) = value {
                values.insert(name.to_str_lossy().into_owned(), value.to_owned());
                objects.push(value.to_owned());
            }
            objects.extend(peeled.map(ToOwned::to_owned));
        }
        Advertised { values, objects }
    }
}

/// The capabilities we ask for, as git's send-pack writes them (each with a
/// leading space, after the first command's NUL).
fn requested_capabilities(caps: &gix::protocol::transport::client::Capabilities, commands: usize) -> String {
    let mut out = String::new();
    if caps.contains("report-status") {
        out.push_str(" report-status");
    }
    if caps.contains("side-band-64k") {
        out.push_str(" side-band-64k");
    }
    // No progress while the pack is read: nothing is shown, and the remote
    // then writes nothing back until it has the whole pack, so a full pipe
    // can never stall both sides.
    if caps.contains("quiet") {
        out.push_str(" quiet");
    }
    // All refs or none, where the remote can: several refs of one push are
    // usually meant together (a service branch and the task branches in it).
    if commands > 1 && caps.contains("atomic") {
        out.push_str(" atomic");
    }
    if caps.contains("agent") {
        out.push_str(concat!(" agent=cohort/", env!("CARGO_PKG_VERSION")));
    }
    out
}

enum SendError {
    Io,
    Pack(String),
    Interrupted,
}

/// Writes the commands (pkt-lines, then a flush) and the pack, if any.
/// Returns the pack's size in bytes.
fn send(
    out: &mut Tracked<impl Write>,
    lines: &[String],
    counted: Option<pack::Counted>,
    repo: &gix::Repository,
    interrupt: &AtomicBool,
) -> Result<u64, SendError> {
    for line in lines {
        encode::data_to_write(line.as_bytes(), &mut *out).map_err(|_| SendError::Io)?;
    }
    encode::flush_to_write(&mut *out).map_err(|_| SendError::Io)?;
    let Some(counted) = counted else {
        return Ok(0);
    };
    pack::write(repo, counted, out, interrupt).map_err(|err| match err {
        _ if interrupt.load(Ordering::Relaxed) => SendError::Interrupted,
        // An error while the writer failed is the connection's, not the pack's.
        _ if out.failure.is_some() => SendError::Io,
        pack::WriteError::Interrupted => SendError::Interrupted,
        pack::WriteError::Pack(message) => SendError::Pack(message),
    })
}

/// A writer that remembers its first failure, so a failed pack write can be
/// told apart from a failed connection.
struct Tracked<W: Write> {
    inner: W,
    failure: Option<String>,
}

impl<W: Write> Tracked<W> {
    fn new(inner: W) -> Self {
        Tracked { inner, failure: None }
    }

    fn note<T>(&mut self, res: io::Result<T>) -> io::Result<T> {
        if let Err(err) = &res {
            self.failure.get_or_insert_with(|| redact(&describe(err)));
        }
        res
    }
}

impl<W: Write> Write for Tracked<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let res = self.inner.write(buf);
        self.note(res)
    }

    fn flush(&mut self) -> io::Result<()> {
        let res = self.inner.flush();
        self.note(res)
    }
}

fn transport_error(url: &str, err: &(dyn std::error::Error + 'static)) -> PushError {
    if is_auth_failure(err) {
        return PushError::Auth {
            url: url.to_string(),
            message: describe(err),
        };
    }
    PushError::Transport {
        url: url.to_string(),
        message: describe(err),
    }
}

fn remote_or_transport(url: &str, err: &io::Error) -> PushError {
    // An `ERR` pkt-line arrives as an I/O error wrapping it.
    if let Some(line) = err.get_ref().and_then(|e| e.downcast_ref::<packetline::read::Error>()) {
        return PushError::Remote {
            url: url.to_string(),
            message: redact(&line.message.to_str_lossy()),
        };
    }
    transport_error(url, err)
}

fn remote_or_protocol(url: &str, message: &str) -> PushError {
    PushError::Protocol {
        url: url.to_string(),
        message: redact(message),
    }
}

/// A 401 (or an ssh permission denial) anywhere in the chain.
fn is_auth_failure(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(e) = next {
        if e.downcast_ref::<gix::protocol::transport::client::AuthenticationRequired>()
            .is_some()
        {
            return true;
        }
        if let Some(io) = e.downcast_ref::<io::Error>() {
            if io.kind() == io::ErrorKind::PermissionDenied {
                return true;
            }
        }
        next = e.source();
    }
    false
}

/// An error and its causes on one line, with any URL's credentials removed.
fn describe(err: &(dyn std::error::Error + 'static)) -> String {
    redact(&chain(err))
}

#[cfg(test)]
#[path = "push_tests.rs"]
mod tests;
