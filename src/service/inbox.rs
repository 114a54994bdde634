//! The service's inbox: request documents dropped by `cohort submit`, one file each.
//!
//! `STATE/inbox/` holds what waits; a file is *claimed* by renaming it into
//! `processing/`, and *finished* by renaming it into `done/` or `failed/` next to a
//! `NAME.json` that says what happened. Every step is a rename within one file system, so
//! a request is always in exactly one place, even across a crash. This file knows the
//! places; `requests.rs` records each move before it is made, so that a crash between two
//! steps is finished, not redone, on the next start.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Where a request can be, in the order of its life.
pub const PLACES: [&str; 4] = ["inbox", "processing", "done", "failed"];

pub struct Inbox {
    root: PathBuf,
}

/// What became of a request (`done/NAME.json` or `failed/NAME.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    pub request: String,
    pub run_id: Option<String>,
    pub exit_code: u8,
    pub error: Option<String>,
    pub finished: String,
}

impl Inbox {
    pub fn new(state_dir: &Path) -> Inbox {
        Inbox {
            root: state_dir.to_path_buf(),
        }
    }

    pub fn dir(&self, which: &str) -> PathBuf {
        self.root.join(which)
    }

    pub fn create(&self) -> Result<()> {
        for d in PLACES {
            let p = self.dir(d);
            std::fs::create_dir_all(&p).with_context(|| format!("cannot create {}", p.display()))?;
        }
        Ok(())
    }

    /// Drops a request in atomically (written aside, then renamed in): the service never
    /// sees half a file. Returns its path in the inbox.
    pub fn submit(&self, original_name: &str, body: &[u8]) -> Result<PathBuf> {
        let inbox = self.dir("inbox");
        if !inbox.is_dir() {
            anyhow::bail!(
                "{} does not exist: the service has not started yet (cohort service status)",
                inbox.display()
            );
        }
        let stamp = chrono_like_stamp();
        let slug: String = original_name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .take(60)
            .collect();
        let name = format!("{stamp}-{}-{slug}", std::process::id());
        let tmp = inbox.join(format!(".{name}.tmp"));
        let dest = inbox.join(&name);
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(body)?;
            f.sync_all()
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&tmp);
            return Err(e).with_context(|| format!("cannot write into {}", inbox.display()));
        }
        std::fs::rename(&tmp, &dest).with_context(|| format!("cannot move the request into {}", inbox.display()))?;
        Ok(dest)
    }

    /// The requests waiting in `dir`, oldest first (names start with a timestamp).
    pub fn waiting(&self, which: &str) -> Result<Vec<PathBuf>> {
        let dir = self.dir(which);
        let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .map(|e| e.path())
            .collect();
        out.sort();
        Ok(out)
    }

    /// Which of the four places holds the request `name` now, if any.
    pub fn locate(&self, name: &str) -> Option<&'static str> {
        PLACES.into_iter().find(|d| self.dir(d).join(name).is_file())
    }

    /// Writes `NAME.json` into `which` (written aside, then renamed in). Writing it again
    /// with the same outcome changes nothing: a step redone after a crash is harmless.
    pub fn write_outcome(&self, which: &str, name: &str, outcome: &Outcome) -> Result<PathBuf> {
        let json = self.dir(which).join(format!("{name}.json"));
        let tmp = self.dir(which).join(format!(".{name}.json.tmp"));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&serde_json::to_vec_pretty(outcome)?)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &json)
        };
        write().with_context(|| format!("cannot write {}", json.display()))?;
        Ok(json)
    }

    /// Renames the request `name` from one place to another.
    pub fn rename(&self, name: &str, from: &str, to: &str) -> Result<PathBuf> {
        let (src, dest) = (self.dir(from).join(name), self.dir(to).join(name));
        std::fs::rename(&src, &dest).with_context(|| format!("cannot move {} to {}", src.display(), dest.display()))?;
        Ok(dest)
    }
}

impl Outcome {
    /// Where a request with this outcome is filed.
    pub fn place(&self) -> &'static str {
        if self.exit_code == 0 && self.error.is_none() {
            "done"
        } else {
            "failed"
        }
    }
}

/// `20261125T181512.123456789`: sorts by time, safe in a file name.
fn chrono_like_stamp() -> String {
    let now = std::time::SystemTime::now();
    let secs = humantime::format_rfc3339_nanos(now).to_string();
    secs.replace(['-', ':'], "").trim_end_matches('Z').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_always_in_one_place() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = Inbox::new(dir.path());
        assert!(
            inbox.submit("x.md", b"- a\n").is_err(),
            "no inbox before the service made one"
        );
        inbox.create().unwrap();
        let a = inbox.submit("first request.md", b"- a\n").unwrap();
        let b = inbox.submit("../second.md", b"- b\n").unwrap();
        assert!(a.file_name().unwrap().to_string_lossy().ends_with("-first_request.md"));
        assert!(
            b.starts_with(inbox.dir("inbox")),
            "a name cannot climb out: {}",
            b.display()
        );
        assert_eq!(
            inbox.waiting("inbox").unwrap(),
            vec![a.clone(), b.clone()],
            "oldest first"
        );
        let name = a.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(inbox.locate(&name), Some("inbox"));
        inbox.rename(&name, "inbox", "processing").unwrap();
        assert_eq!(inbox.waiting("inbox").unwrap(), vec![b]);
        assert_eq!(inbox.locate(&name), Some("processing"));
        let outcome = Outcome {
            request: "first request.md".into(),
            run_id: Some("r1".into()),
            exit_code: 1,
            error: None,
            finished: "now".into(),
        };
        assert_eq!(outcome.place(), "failed");
        inbox.write_outcome(outcome.place(), &name, &outcome).unwrap();
        inbox.write_outcome(outcome.place(), &name, &outcome).unwrap();
        let done = inbox.rename(&name, "processing", outcome.place()).unwrap();
        assert!(done.starts_with(inbox.dir("failed")));
        assert_eq!(std::fs::read(&done).unwrap(), b"- a\n");
        assert!(
            inbox.rename(&name, "processing", "done").is_err(),
            "a request moves from where it is, or not at all"
        );
        let json = std::fs::read_to_string(inbox.dir("failed").join(format!("{name}.json"))).unwrap();
        assert!(json.contains("\"r1\""), "{json}");
        assert_eq!(files_in(&inbox.dir("failed")), [name.clone(), format!("{name}.json")]);
        assert!(inbox.waiting("processing").unwrap().is_empty());
    }

    fn files_in(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}
