//! Workers on other hosts. One controller (the `cohort run` or `serve` that owns the
//! repository) keeps git, the state, the merges and the model gateway; workers (`cohort
//! worker`, each in a container of cohort's image on some engine) take jobs over HTTPS,
//! run them in checkouts of their own and send back what changed. There is no shared
//! filesystem. See docs/SCALE.md.
//!
//! - `protocol`: the wire types, in one place;
//! - `tls`, `token`: the controller's certificate and the worker token that pins it;
//! - `controller`, `queue`, `trees`: the controller's side; `runtime`: the `Runtime` that
//!   turns every spawn into a job;
//! - `client`, `slot`, `worker`: the worker's side; `files`: entries written and read
//!   without following symlinks, on both sides;
//! - `registry`: the run's image, served read-only to podman hosts;
//! - `hosts`: `--host` and `[run] hosts`, resolved; `fleet`: worker containers started and
//!   stopped on them.

pub mod client;
pub mod controller;
pub mod files;
pub mod fleet;
pub mod hosts;
pub mod protocol;
pub mod queue;
pub mod registry;
pub mod runtime;
pub mod slot;
pub mod tls;
pub mod token;
pub mod trees;
pub mod worker;

use std::path::{Path, PathBuf};

/// The upgrade protocol of a tunnel to the model gateway.
pub const TUNNEL: &str = "cohort-tunnel";

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Token(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("cannot listen for workers on {addr}: {source}")]
    Listen { addr: String, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot reach the controller at {controller}: {reason}")]
    Unreachable { controller: String, reason: String },
    #[error("the controller refused the worker token: {0}")]
    Refused(String),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("cannot open the repository: {0}")]
    Repository(String),
}

/// A mutex's guard, also when a thread panicked holding it (the tables it guards stay whole:
/// every change to them is one statement).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Writes `data` to `path` with mode 0600, atomically: a private temporary file in the same
/// directory (tempfile makes it 0600), synced, then renamed over it, so a reader never sees
/// half a token or a moment of wider mode.
pub(crate) fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new().prefix(".cohort-").tempfile_in(dir)?;
    tmp.write_all(data)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}
