//! A request's life, recorded: `STATE/serve.db` says where each request is and where it
//! is going, so that a crash (`kill -9`) at any point ends with exactly one outcome.
//!
//! Every move between the inbox's places is written down *before* the rename (`moving_to`)
//! and settled after it, and a request's outcome is recorded before its `NAME.json` is
//! written or the request is filed. On start, [`Requests::reconcile`] finishes each move a
//! crash left half done from what is recorded, so a step is completed, never redone with a
//! different result: a request whose outcome was recorded is filed with that outcome, and
//! its run is not run again.
//!
//! The database is the service's own, next to the files it describes, rather than the
//! repository's `state.db`: the inbox, its lock and these records belong to the state
//! directory (one service), while the repository's database is shared with `cohort run`
//! from the command line and by any service of either scope on that repository. The link
//! from a request to its run is the run's own record (`request` in its options, written in
//! the same transaction that creates the run), so no fact is kept in both places.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rusqlite::{params, Connection, OptionalExtension};

use super::inbox::{Inbox, Outcome};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS requests (
    name TEXT PRIMARY KEY,
    place TEXT NOT NULL,
    moving_to TEXT,
    outcome TEXT,
    updated_at TEXT NOT NULL
);
";

/// The environment variable of the crash test hook (see [`crash_point`]).
pub const CRASH_AT: &str = "COHORT_TEST_CRASH_AT";

pub struct Requests {
    pub inbox: Inbox,
    db: Connection,
}

impl Requests {
    /// Creates the inbox's places and opens (or creates) the record. The caller holds the
    /// state directory's lock: no other process writes either.
    pub fn open(state: &Path) -> Result<Requests> {
        let inbox = Inbox::new(state);
        inbox.create()?;
        let path = state.join("serve.db");
        let db = Connection::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        // A record must be on disk before the rename it announces.
        db.pragma_update(None, "synchronous", "FULL")?;
        db.busy_timeout(std::time::Duration::from_secs(10))?;
        db.execute_batch(SCHEMA)?;
        Ok(Requests { inbox, db })
    }

    /// Moves a waiting request into `processing/`; returns its path there.
    pub fn claim(&self, path: &Path) -> Result<PathBuf> {
        let name = file_name(path)?;
        self.move_request(&name, "inbox", "processing")
    }

    /// Puts a claimed request back in the inbox (it never started a run).
    pub fn requeue(&self, path: &Path) -> Result<PathBuf> {
        let name = file_name(path)?;
        self.move_request(&name, "processing", "inbox")
    }

    /// Files a claimed request under `done/` or `failed/` with its outcome. The first
    /// outcome recorded for a request is the one it keeps: were this called again for it,
    /// the request would still end with that one outcome, in one place.
    pub fn finish(&self, path: &Path, outcome: &Outcome) -> Result<PathBuf> {
        let name = file_name(path)?;
        self.db.execute(
            "INSERT INTO requests (name, place, moving_to, outcome, updated_at) VALUES (?1, 'processing', ?2, ?3, ?4) \
             ON CONFLICT(name) DO UPDATE SET moving_to = ?2, outcome = ?3, updated_at = ?4 WHERE outcome IS NULL",
            params![
                name,
                outcome.place(),
                serde_json::to_string(outcome)?,
                crate::run::state::now()
            ],
        )?;
        crash_point("outcome");
        let outcome = self.outcome(&name)?.context("the outcome just recorded is gone")?;
        self.file(&name, &outcome)
    }

    /// The outcome recorded for a request, if any.
    pub fn outcome(&self, name: &str) -> Result<Option<Outcome>> {
        let text: Option<Option<String>> = self
            .db
            .query_row("SELECT outcome FROM requests WHERE name = ?1", [name], |r| r.get(0))
            .optional()?;
        Ok(match text.flatten() {
            Some(t) => Some(serde_json::from_str(&t).with_context(|| format!("the recorded outcome of {name}"))?),
            None => None,
        })
    }

    /// Finishes what a crash interrupted: every move recorded but not settled is made (or
    /// found made), and every request with a recorded outcome is filed with it. Returns
    /// what it did, one line per request, for the log.
    pub fn reconcile(&self) -> Result<Vec<String>> {
        let rows: Vec<(String, String, Option<String>)> = self
            .db
            .prepare("SELECT name, place, moving_to FROM requests WHERE moving_to IS NOT NULL ORDER BY name")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let mut notes = Vec::new();
        for (name, place, moving_to) in rows {
            let Some(to) = moving_to else { continue };
            let here = self.inbox.locate(&name);
            match (self.outcome(&name)?, here) {
                (Some(outcome), Some("processing" | "done" | "failed")) => {
                    self.file(&name, &outcome)?;
                    notes.push(format!(
                        "{name}: filed under {} with its recorded outcome",
                        outcome.place()
                    ));
                }
                (_, Some(at)) if at == to || at == place => {
                    if at != to {
                        self.inbox.rename(&name, at, &to)?;
                    }
                    self.settle(&name, &to)?;
                    notes.push(format!("{name}: finished its move from {place} to {to}"));
                }
                (_, found) => {
                    // Moved or removed by hand: record where it is, and leave it there.
                    let at = found.unwrap_or("gone");
                    self.settle(&name, at)?;
                    notes.push(format!(
                        "{name}: expected in {place} or {to}, found in {at}; left there"
                    ));
                }
            }
        }
        Ok(notes)
    }

    /// Writes the outcome file, then moves the request next to it; both steps are
    /// idempotent, so a crash between them is finished by doing them again.
    fn file(&self, name: &str, outcome: &Outcome) -> Result<PathBuf> {
        let to = outcome.place();
        self.inbox.write_outcome(to, name, outcome)?;
        crash_point("file");
        let dest = match self.inbox.locate(name) {
            Some("processing") => self.inbox.rename(name, "processing", to)?,
            Some(at) if at == to => self.inbox.dir(to).join(name),
            found => anyhow::bail!(
                "cannot file {name} under {to}: it is in {} (moved by hand?)",
                found.unwrap_or("none of the inbox's places")
            ),
        };
        crash_point("filed");
        self.settle(name, to)?;
        Ok(dest)
    }

    fn move_request(&self, name: &str, from: &str, to: &str) -> Result<PathBuf> {
        // Taken from the inbox, a request starts a new life: an outcome recorded for an earlier
        // request of the same name (a file dropped into the inbox by hand, again) is not its.
        self.db.execute(
            "INSERT INTO requests (name, place, moving_to, updated_at) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT(name) DO UPDATE SET place = ?2, moving_to = ?3, updated_at = ?4, \
             outcome = CASE WHEN ?2 = 'inbox' THEN NULL ELSE outcome END",
            params![name, from, to, crate::run::state::now()],
        )?;
        crash_point(&format!("{to}:before"));
        let dest = self.inbox.rename(name, from, to)?;
        crash_point(&format!("{to}:after"));
        self.settle(name, to)?;
        Ok(dest)
    }

    fn settle(&self, name: &str, place: &str) -> Result<()> {
        self.db.execute(
            "UPDATE requests SET place = ?2, moving_to = NULL, updated_at = ?3 WHERE name = ?1",
            params![name, place, crate::run::state::now()],
        )?;
        Ok(())
    }
}

fn file_name(path: &Path) -> Result<String> {
    Ok(path
        .file_name()
        .context("request without a file name")?
        .to_string_lossy()
        .into_owned())
}

/// The crash test hook: with `COHORT_TEST_CRASH_AT=STEP` in `cohort serve`'s own
/// environment, the process kills itself with SIGKILL when it reaches STEP, as `kill -9`
/// would, so tests can stop it between two named steps of a request's life. Unset (always,
/// outside tests) it does nothing. It is read from the process environment only, which no
/// file of a repository can set. The steps, in order: `processing:before` (the claim
/// recorded, not made), `processing:after` (made, not settled), `ran` (the run returned,
/// its outcome not recorded), `outcome` (recorded, no file written), `file` (`NAME.json`
/// written, the request not moved), `filed` (moved, not settled); `inbox:before` and
/// `inbox:after` for a requeue.
pub fn crash_point(step: &str) {
    if std::env::var_os(CRASH_AT).is_some_and(|v| v == step) {
        tracing::warn!(step, "{CRASH_AT}: killing this process here");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(code: u8) -> Outcome {
        Outcome {
            request: "r.md".into(),
            run_id: Some("run-1".into()),
            exit_code: code,
            error: None,
            finished: "now".into(),
        }
    }

    #[test]
    fn the_first_recorded_outcome_is_the_one_kept() {
        let dir = tempfile::tempdir().unwrap();
        let r = Requests::open(dir.path()).unwrap();
        let sub = r.inbox.submit("r.md", b"- a\n").unwrap();
        let claimed = r.claim(&sub).unwrap();
        let name = file_name(&claimed).unwrap();
        let filed = r.finish(&claimed, &outcome(0)).unwrap();
        assert!(filed.starts_with(r.inbox.dir("done")));
        // A second, different outcome for the same request changes nothing.
        assert!(r
            .finish(&claimed, &outcome(1))
            .unwrap()
            .starts_with(r.inbox.dir("done")));
        assert!(!r.inbox.dir("failed").join(format!("{name}.json")).exists());
        assert_eq!(r.outcome(&name).unwrap().unwrap().exit_code, 0);
        // The same name dropped into the inbox again is a new request with its own outcome.
        std::fs::rename(&filed, r.inbox.dir("inbox").join(&name)).unwrap();
        let again = r.claim(&r.inbox.dir("inbox").join(&name)).unwrap();
        assert!(r.outcome(&name).unwrap().is_none());
        assert!(r
            .finish(&again, &outcome(1))
            .unwrap()
            .starts_with(r.inbox.dir("failed")));
    }

    #[test]
    fn reconcile_finishes_a_recorded_move_and_files_a_recorded_outcome() {
        let dir = tempfile::tempdir().unwrap();
        let r = Requests::open(dir.path()).unwrap();
        let a = file_name(&r.inbox.submit("a.md", b"- a\n").unwrap()).unwrap();
        let b = file_name(&r.inbox.submit("b.md", b"- b\n").unwrap()).unwrap();
        // a: the claim recorded, the process gone before the rename.
        r.db.execute(
            "INSERT INTO requests (name, place, moving_to, updated_at) VALUES (?1, 'inbox', 'processing', 'x')",
            [&a],
        )
        .unwrap();
        // b: claimed, its outcome recorded, gone before any file was written.
        r.claim(&r.inbox.dir("inbox").join(&b)).unwrap();
        r.db.execute(
            "UPDATE requests SET moving_to = 'failed', outcome = ?2 WHERE name = ?1",
            params![b, serde_json::to_string(&outcome(1)).unwrap()],
        )
        .unwrap();
        drop(r);
        let r = Requests::open(dir.path()).unwrap();
        let notes = r.reconcile().unwrap();
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert_eq!(r.inbox.locate(&a), Some("processing"));
        assert_eq!(r.inbox.locate(&b), Some("failed"));
        assert!(r.inbox.dir("failed").join(format!("{b}.json")).is_file());
        assert!(r.reconcile().unwrap().is_empty(), "nothing is left to do: {notes:?}");
    }
}
