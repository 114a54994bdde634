//! Verify runs in the state DB: one row per run of the verify command, on a task's own
//! commit (`task`) or on its merge with the service branch (`merge`). Keyed by the tree it
//! judged, so `resume` after a crash neither redoes a verify that passed (the same tree
//! passed) nor forgets a retry that already happened (the rounds are counted here).

use anyhow::Result;
use rusqlite::{params, OptionalExtension};
use serde::Serialize;

use super::state::{now, State};

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS verifies (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    round INTEGER NOT NULL,
    kind TEXT NOT NULL,
    tree TEXT NOT NULL,
    commit_id TEXT NOT NULL,
    passed INTEGER NOT NULL,
    exit_code INTEGER,
    duration_ms INTEGER NOT NULL,
    failure TEXT,
    at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS verifies_task ON verifies (run_id, idx, attempt);
";

/// What was verified: the task's own commit, or its merge with the service branch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyKind {
    Task,
    Merge,
}

impl VerifyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            VerifyKind::Task => "task",
            VerifyKind::Merge => "merge",
        }
    }
}

/// One run of the verify command, as recorded.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyRow {
    pub idx: usize,
    pub attempt: u32,
    /// 0 for the agent's first result, then one more per feedback round.
    pub round: u32,
    pub kind: VerifyKind,
    pub tree: String,
    pub commit: String,
    pub passed: bool,
    pub exit_code: Option<i32>,
    pub duration_ms: u64,
    /// The exit status and the last 16 KiB of the output, ANSI stripped (failures only).
    pub failure: Option<String>,
    pub at: String,
}

impl State {
    pub fn add_verify(&self, run_id: &str, v: &VerifyRow) -> Result<()> {
        self.conn.execute(
            "INSERT INTO verifies (run_id, idx, attempt, round, kind, tree, commit_id, passed, exit_code, \
             duration_ms, failure, at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            params![
                run_id,
                v.idx,
                v.attempt,
                v.round,
                v.kind.as_str(),
                v.tree,
                v.commit,
                v.passed,
                v.exit_code,
                v.duration_ms as i64,
                v.failure,
                now()
            ],
        )?;
        Ok(())
    }

    /// Whether the verify command passed on `tree` in this run (any task, any kind): the
    /// same tree passes again, so it is not run twice.
    pub fn tree_passed(&self, run_id: &str, tree: &str) -> Result<bool> {
        Ok(self
            .conn
            .query_row(
                "SELECT 1 FROM verifies WHERE run_id = ?1 AND tree = ?2 AND passed = 1 LIMIT 1",
                params![run_id, tree],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    /// The verify runs of a run (of one task, when `idx` is given), oldest first.
    pub fn verifies(&self, run_id: &str, idx: Option<usize>) -> Result<Vec<VerifyRow>> {
        let mut stmt = self.conn.prepare(
            "SELECT idx, attempt, round, kind, tree, commit_id, passed, exit_code, duration_ms, failure, at \
             FROM verifies WHERE run_id = ?1 AND (?2 IS NULL OR idx = ?2) ORDER BY id",
        )?;
        let rows = stmt.query_map(params![run_id, idx.map(|i| i as i64)], |r| {
            Ok(VerifyRow {
                idx: r.get::<_, i64>(0)? as usize,
                attempt: r.get(1)?,
                round: r.get(2)?,
                kind: match r.get::<_, String>(3)?.as_str() {
                    "merge" => VerifyKind::Merge,
                    _ => VerifyKind::Task,
                },
                tree: r.get(4)?,
                commit: r.get(5)?,
                passed: r.get(6)?,
                exit_code: r.get(7)?,
                duration_ms: r.get::<_, i64>(8)? as u64,
                failure: r.get(9)?,
                at: r.get(10)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The task's verify runs of one attempt, oldest first.
    pub fn attempt_verifies(&self, run_id: &str, idx: usize, attempt: u32) -> Result<Vec<VerifyRow>> {
        Ok(self
            .verifies(run_id, Some(idx))?
            .into_iter()
            .filter(|v| v.attempt == attempt)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_passed_tree_is_found_and_rounds_are_kept_per_attempt() {
        let dir = tempfile::tempdir().unwrap();
        let st = State::open(&dir.path().join("state.db")).unwrap();
        let row = |attempt, round, passed| VerifyRow {
            idx: 1,
            attempt,
            round,
            kind: VerifyKind::Task,
            tree: format!("tree{round}"),
            commit: "c".into(),
            passed,
            exit_code: Some(if passed { 0 } else { 1 }),
            duration_ms: 5,
            failure: (!passed).then(|| "exit 1".into()),
            at: String::new(),
        };
        st.add_verify("r", &row(1, 0, false)).unwrap();
        st.add_verify("r", &row(1, 1, true)).unwrap();
        st.add_verify("r", &row(2, 0, false)).unwrap();
        assert!(st.tree_passed("r", "tree1").unwrap());
        assert!(!st.tree_passed("r", "tree0").unwrap());
        assert!(!st.tree_passed("other", "tree1").unwrap());
        assert_eq!(st.attempt_verifies("r", 1, 1).unwrap().len(), 2);
        let second = st.attempt_verifies("r", 1, 2).unwrap();
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].failure.as_deref(), Some("exit 1"));
        assert_eq!(st.verifies("r", None).unwrap().len(), 3);
    }
}
