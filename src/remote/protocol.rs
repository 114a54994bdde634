//! The controller–worker wire protocol, typed in one place: JSON over HTTPS.
//!
//! ```text
//! worker                                   controller
//!   POST /v1/lease      {worker, slot}  →   a job (200), nothing yet (204), run over (410)
//!   POST /v1/leases/L/output {lines}    →   ok (200); 409 when L is no longer this worker's
//!   POST /v1/leases/L/heartbeat         →   ok (200); 409 likewise
//!   POST /v1/leases/L/result {…}        →   ok (200); 409 likewise
//!   POST /v1/tunnel (Upgrade)           →   101, then bytes to the model gateway
//!   GET  /v2/…                          →   the run's image, read-only (podman hosts pull it)
//! ```
//!
//! Every `/v1` request carries the worker token's secret as a bearer token. What a worker
//! sends back is untrusted: paths are checked here, contents are re-hashed by the controller's
//! normal collect phase before anything reaches a ref.

use std::path::{Component, Path};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// Sent by a worker asking for work: who it is and what its checkout holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseRequest {
    /// A name for messages and `cohort status` (e.g. `host1/2`); not an identity.
    pub worker: String,
    pub slot: SlotState,
    /// Where the worker keeps its checkout and the job's scratch directory: the job's
    /// command line names these paths.
    pub checkout_path: String,
    pub scratch_path: String,
}

/// What a worker's checkout holds: exactly `tree`, except for `dirty` paths (changed, added
/// or removed since), which the next job's changes rewrite. No tree: an empty checkout.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SlotState {
    pub tree: Option<String>,
    pub dirty: Vec<String>,
}

/// One job for a worker: run this command in a checkout of `tree`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub lease: String,
    /// The run and task, for messages and labels.
    pub run_id: String,
    pub task: usize,
    /// `agent` or `verify`. A verify's files are not sent back.
    pub role: String,
    pub tree: String,
    /// Empty the checkout before `changes` (the worker's checkout holds a tree the
    /// controller does not know).
    pub reset: bool,
    /// What turns the worker's checkout into `tree`.
    pub changes: Vec<Entry>,
    /// The scratch directory's files (prompt, agent config, a conversation to continue),
    /// written into an emptied scratch directory.
    pub scratch: Vec<Entry>,
    pub program: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Values the command gets in its environment that must not be logged (a task token).
    pub secret_env: Vec<(String, String)>,
    pub stdin: Option<String>,
    pub timeout_secs: Option<u64>,
    /// Persistent cache directories, relative to the checkout or the home directory.
    pub caches: Vec<CacheSpec>,
    /// The address the command line names for the model gateway, which the worker replaces
    /// with its own tunnel's.
    pub gateway: Option<String>,
    /// How often the worker must say it is alive, in seconds.
    pub heartbeat_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CacheSpec {
    pub name: String,
    /// `workdir` or `home`.
    pub base: String,
    pub path: String,
}

/// A file, a symlink or a removal at a path relative to the checkout (or scratch directory).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub path: String,
    pub kind: EntryKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// Contents in base64; `executable` for mode 0755.
    File {
        data: String,
        executable: bool,
    },
    Symlink {
        target: String,
    },
    Removed,
}

impl Entry {
    pub fn file(path: impl Into<String>, data: &[u8], executable: bool) -> Entry {
        Entry {
            path: path.into(),
            kind: EntryKind::File {
                data: base64::engine::general_purpose::STANDARD.encode(data),
                executable,
            },
        }
    }

    /// The file's contents, decoded; None for other kinds.
    pub fn data(&self) -> Result<Option<Vec<u8>>, String> {
        match &self.kind {
            EntryKind::File { data, .. } => base64::engine::general_purpose::STANDARD
                .decode(data)
                .map(Some)
                .map_err(|e| format!("{}: the contents are not base64: {e}", self.path)),
            _ => Ok(None),
        }
    }

    /// The payload size this entry carries (for limits and the bytes-per-task figure).
    pub fn payload_len(&self) -> usize {
        match &self.kind {
            EntryKind::File { data, .. } => data.len() / 4 * 3,
            EntryKind::Symlink { target } => target.len(),
            EntryKind::Removed => 0,
        }
    }
}

/// A batch of the command's output lines; also a heartbeat.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OutputBatch {
    pub lines: Vec<Line>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Line {
    pub err: bool,
    pub text: String,
}

/// How the job ended and, for an agent, what it changed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobResult {
    pub exit: WireExit,
    /// Changed, added and removed paths of the checkout, against the job's tree.
    pub changes: Vec<Entry>,
    /// What the command changed in the scratch directory (its conversation, last message):
    /// files written and removals, against what the job sent.
    pub scratch: Vec<Entry>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireExit {
    Code(i32),
    Signal(i32),
    TimedOut(u64),
    Cancelled,
}

impl From<crate::runtime::Exit> for WireExit {
    fn from(e: crate::runtime::Exit) -> Self {
        use crate::runtime::Exit;
        match e {
            Exit::Code(c) => WireExit::Code(c),
            Exit::Signal(s) => WireExit::Signal(s),
            Exit::TimedOut(d) => WireExit::TimedOut(d.as_secs()),
            Exit::Cancelled => WireExit::Cancelled,
        }
    }
}

impl From<WireExit> for crate::runtime::Exit {
    fn from(e: WireExit) -> Self {
        use crate::runtime::Exit;
        match e {
            WireExit::Code(c) => Exit::Code(c),
            WireExit::Signal(s) => Exit::Signal(s),
            WireExit::TimedOut(s) => Exit::TimedOut(std::time::Duration::from_secs(s)),
            WireExit::Cancelled => Exit::Cancelled,
        }
    }
}

/// A path a worker may name: relative, plain components only, nothing in a `.git`. Checked on
/// both sides: the worker does not write outside its checkout for a bad controller either.
pub fn check_path(path: &str) -> Result<&Path, String> {
    let p = Path::new(path);
    let plain = !path.is_empty()
        && !path.contains('\0')
        && p.components().all(|c| matches!(c, Component::Normal(n) if n != ".git"));
    if plain {
        Ok(p)
    } else {
        Err(format!("{path:?} is not a plain relative path outside .git"))
    }
}

/// Limits on what one result may carry, so a hostile worker cannot fill the controller.
pub const MAX_RESULT_ENTRIES: usize = 100_000;
pub const MAX_BODY_BYTES: usize = 1 << 30;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_outside_the_checkout_or_in_git_are_refused() {
        for ok in ["a", "a/b.txt", "dir/.gitignore", "x/.github/y"] {
            assert!(check_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            ".git/config",
            "a/.git/hooks/x",
            "./a",
            "a\0b",
        ] {
            assert!(check_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn entries_round_trip() {
        let e = Entry::file("a.txt", b"hello\n", true);
        let json = serde_json::to_string(&e).unwrap();
        let back: Entry = serde_json::from_str(&json).unwrap();
        assert_eq!(back.data().unwrap().unwrap(), b"hello\n");
        assert_eq!(back, e);
        let exit: crate::runtime::Exit = WireExit::from(crate::runtime::Exit::Code(3)).into();
        assert_eq!(exit, crate::runtime::Exit::Code(3));
    }
}
