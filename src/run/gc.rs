//! `cohort gc`: what of old runs can go, and removing it.
//!
//! The rule (also in the README):
//! - A run is *kept* when it is among the newest `keep_runs` runs, or its age is under
//!   `older_than`. Its age counts from when it last finished (when it was created, if it never
//!   finished), so a `cohort retry` makes an old run young again. Both limits must let a run
//!   go before it goes: the newest N survive any age, and a young run survives any count.
//! - A run a cohort process holds (its lock is taken) is never touched, kept or not: `plan`
//!   leaves it out and `apply` takes the run's lock itself before it changes anything, so a
//!   `resume` that starts meanwhile either waits for gc's lock or finds the run gone.
//! - Of a run that is not kept, everything goes: its task branches and attempt refs (whether
//!   merged into the service branch, unmerged past the retention, or of a run that was stopped
//!   and never resumed: abandoned), its directory (prompts, logs, attempts, checkouts) and its
//!   rows in the state DB. One exception: a branch of a task the state records as merged whose
//!   commit the service branch no longer contains (someone rewrote it) is kept, and with it
//!   the run's rows and directory, so that work is not lost and `report` still explains it.
//! - The rows go with the run rather than stay: `report`, `logs` and `retry` of a run whose
//!   branches and logs are gone could only show dangling names, and the DB would grow forever.
//!   A removed run is then simply unknown (`no run X`), as if it never ran.
//! - Codex homes (`attempts/*/codex-home`, the agent's private state, often large) go for
//!   every run that is finished (no unfinished task, so no `resume` can continue a conversation
//!   in them) and not held, kept or not.
//! - Refs move only by compare-and-swap on the value read: a ref that moved since is kept.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use rusqlite::params;

use super::state::{RunRow, State, TaskStatus};
use super::RunDir;
use crate::git::{self, gc as refs_gc, Oid, RepoPaths};

#[derive(Debug, Clone, Copy)]
pub struct GcOptions {
    pub keep_runs: usize,
    pub older_than: Duration,
}

/// One thing gc removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A task branch or attempt ref, with the value it was read at and why it can go.
    Ref { name: String, id: Oid, why: String },
    /// A run's directory under `.git/cohort/runs/`.
    Dir { path: PathBuf, bytes: u64 },
    /// The run's rows in the state DB.
    Rows,
    /// One attempt's codex home.
    CodexHome { path: PathBuf, bytes: u64 },
}

/// What gc does to one run.
#[derive(Debug, Clone)]
pub struct RunPlan {
    pub run_id: String,
    /// Why the run stays (`None`: it goes).
    pub kept: Option<String>,
    /// A cohort process holds the run: nothing of it is touched.
    pub held: bool,
    pub items: Vec<Item>,
    /// Refs of a removed run that stay, and why.
    pub kept_refs: Vec<(String, String)>,
}

#[derive(Debug, Default)]
pub struct GcPlan {
    pub runs: Vec<RunPlan>,
}

impl GcPlan {
    /// Bytes the removed directories and codex homes take on disk.
    pub fn bytes(&self) -> u64 {
        self.runs
            .iter()
            .flat_map(|r| &r.items)
            .map(|i| match i {
                Item::Dir { bytes, .. } | Item::CodexHome { bytes, .. } => *bytes,
                _ => 0,
            })
            .sum()
    }
}

/// What `apply` did beyond the plan: refs that moved (kept), runs it found held.
#[derive(Debug, Default)]
pub struct GcOutcome {
    pub removed: Vec<(String, Item)>,
    pub skipped: Vec<(String, String)>,
    pub packed: usize,
    /// Why packing refs did not happen (a ref moved, a lock was held): nothing was lost.
    pub pack_error: Option<String>,
    /// The loose objects packed (there were at least `gc.auto` of them).
    pub objects: Option<git::loose::Packed>,
    /// Why packing loose objects did not happen: nothing was lost.
    pub objects_error: Option<String>,
    /// Temporary pack directories a killed gc left, removed.
    pub stale_pack_dirs: usize,
}

impl GcOutcome {
    pub fn bytes(&self) -> u64 {
        self.removed
            .iter()
            .map(|(_, i)| match i {
                Item::Dir { bytes, .. } | Item::CodexHome { bytes, .. } => *bytes,
                _ => 0,
            })
            .sum()
    }
}

fn age(row: &RunRow, now: SystemTime) -> Option<Duration> {
    let stamp = row.finished_at.as_deref().unwrap_or(&row.created_at);
    let at = humantime::parse_rfc3339_weak(stamp.trim_end_matches('Z')).ok()?;
    Some(now.duration_since(at).unwrap_or_default())
}

/// Works out what gc removes, changing nothing.
pub fn plan(paths: &RepoPaths, state: &State, opts: GcOptions, now: SystemTime) -> Result<GcPlan> {
    let repo = paths.open()?;
    let mut out = GcPlan::default();
    // Whether a ref is merged is one walk of the service branch's history for all refs
    // (per tip), rather than a merge base per ref: with 10,000 refs that was most of gc's time.
    let mut cohort_ids: HashSet<Oid> = refs_gc::refs_under(&repo, refs_gc::TASK_REFS)?
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    cohort_ids.extend(
        refs_gc::refs_under(&repo, refs_gc::ATTEMPT_REFS)?
            .into_iter()
            .map(|(_, id)| id),
    );
    let mut history: std::collections::HashMap<Oid, HashSet<Oid>> = Default::default();
    for (n, row) in state.runs()?.into_iter().enumerate() {
        let tasks = state.tasks(&row.id)?;
        let dir = RunDir::new(paths, &row.id);
        if super::is_active(paths, &row.id) {
            out.runs.push(RunPlan {
                run_id: row.id,
                kept: Some("a cohort process is working on it".into()),
                held: true,
                items: Vec::new(),
                kept_refs: Vec::new(),
            });
            continue;
        }
        let finished = super::unfinished(&tasks) == 0;
        let homes = if finished { codex_homes(&dir.0)? } else { Vec::new() };
        let age = age(&row, now);
        let kept = if n < opts.keep_runs {
            Some(format!("among the newest {}", opts.keep_runs))
        } else if age.is_none_or(|a| a < opts.older_than) {
            Some(format!("younger than {}", humantime::format_duration(opts.older_than)))
        } else {
            None
        };
        if kept.is_some() {
            out.runs.push(RunPlan {
                run_id: row.id,
                kept,
                held: false,
                items: homes,
                kept_refs: Vec::new(),
            });
            continue;
        }
        let service = git::refs::read(&repo, &format!("refs/heads/{}", row.service_branch))?;
        let abandoned = !finished;
        let mut items = Vec::new();
        let mut kept_refs = Vec::new();
        for (name, id) in refs_gc::run_refs(&repo, &row.id)? {
            let merged = match service {
                Some(tip) => {
                    let found = match history.entry(tip) {
                        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                        std::collections::hash_map::Entry::Vacant(e) => {
                            e.insert(found_in_history(&repo, tip, &cohort_ids)?)
                        }
                    };
                    found.contains(&id) || git::is_ancestor(&repo, id, tip)?
                }
                None => false,
            };
            let task = tasks.iter().find(|t| format!("refs/heads/{}", t.branch) == name);
            let why = if merged {
                format!("merged into {}", row.service_branch)
            } else if task.is_some_and(|t| t.status == TaskStatus::Merged) {
                kept_refs.push((
                    name,
                    format!("its task merged, but {} no longer contains it", row.service_branch),
                ));
                continue;
            } else if abandoned {
                "its run was abandoned".into()
            } else if let Some(t) = task {
                format!("{}, past the retention", t.status.as_str())
            } else {
                "an earlier attempt, past the retention".into()
            };
            items.push(Item::Ref { name, id, why });
        }
        if kept_refs.is_empty() {
            items.push(Item::Rows);
            items.push(Item::Dir {
                bytes: disk_usage(&dir.0),
                path: dir.0,
            });
        } else {
            items.extend(homes);
        }
        out.runs.push(RunPlan {
            run_id: row.id,
            kept: None,
            held: false,
            items,
            kept_refs,
        });
    }
    Ok(out)
}

/// Which of `wanted` the history of `tip` contains, as far as one walk finds them: newest
/// commits first, until all are found or the walk is a day older than the oldest of them (a
/// day of slack for clocks that disagree). One not found here may still be merged (a commit
/// dated far in the future of its parent): the caller checks those one by one, so the answer
/// stays exact.
fn found_in_history(repo: &gix::Repository, tip: Oid, wanted: &HashSet<Oid>) -> Result<HashSet<Oid>> {
    let mut found = HashSet::new();
    let mut oldest = i64::MAX;
    for id in wanted {
        if let Ok(c) = repo.find_commit(*id) {
            oldest = oldest.min(c.time().map(|t| t.seconds).unwrap_or(i64::MIN));
        }
    }
    if oldest == i64::MAX {
        return Ok(found);
    }
    let cutoff = oldest.saturating_sub(86_400);
    let walk = repo
        .rev_walk([tip])
        .sorting(gix::revision::walk::Sorting::ByCommitTime(Default::default()))
        .all()
        .context("cannot walk the service branch")?;
    for info in walk {
        let info = info.context("cannot walk the service branch")?;
        if wanted.contains(&info.id) {
            found.insert(info.id);
            if found.len() == wanted.len() {
                break;
            }
        }
        if info.commit_time.is_some_and(|t| t < cutoff) {
            break;
        }
    }
    Ok(found)
}

/// The codex homes of a run's attempts, with their size.
fn codex_homes(run_dir: &Path) -> Result<Vec<Item>> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(run_dir.join("attempts")) else {
        return Ok(out);
    };
    let mut attempts: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
    attempts.sort();
    for attempt in attempts {
        let home = attempt.join("codex-home");
        // An agent could have swapped it for a symlink: only a real directory is measured
        // (the symlink itself still goes, never followed).
        if std::fs::symlink_metadata(&home).is_ok() {
            out.push(Item::CodexHome {
                bytes: disk_usage(&home),
                path: home,
            });
        }
    }
    Ok(out)
}

/// Bytes `path` takes on disk (allocated blocks), never following a symlink, each inode
/// counted once.
pub fn disk_usage(path: &Path) -> u64 {
    fn walk(path: &Path, seen: &mut HashSet<(u64, u64)>) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let Ok(meta) = std::fs::symlink_metadata(path) else {
            return 0;
        };
        if !seen.insert((meta.dev(), meta.ino())) {
            return 0;
        }
        let mut total = meta.blocks() * 512;
        if meta.is_dir() {
            for e in std::fs::read_dir(path).into_iter().flatten().flatten() {
                total += walk(&e.path(), seen);
            }
        }
        total
    }
    walk(path, &mut HashSet::new())
}

/// Removes what `plan` listed, a batch of runs at a time, each run under its own lock; then packs the
/// refs left in cohort's namespaces. A run found held, or a ref found moved, is skipped
/// (and with it the run's rows and directory) rather than forced.
pub fn apply(paths: &RepoPaths, state: &State, plan: &GcPlan) -> Result<GcOutcome> {
    let repo = paths.open()?;
    let mut out = GcOutcome::default();
    // Runs go a batch at a time: the refs of all the batch's runs in one transaction, since
    // each transaction rewrites `packed-refs` whole (with 10,000 packed refs, one a run took
    // a minute). Each run's lock is held until its batch is done.
    for batch in plan.runs.chunks(RUNS_PER_BATCH) {
        let mut locked = Vec::new();
        for run in batch {
            if run.items.is_empty() {
                continue;
            }
            let dir = RunDir::new(paths, &run.run_id);
            // The run directory (and this lock file in it) may go meanwhile, which a lock on
            // the open file survives.
            let lock = if dir.0.join("lock").exists() {
                match super::lock_run(&dir) {
                    Ok(l) => Some(l),
                    Err(_) => {
                        out.skipped
                            .push((run.run_id.clone(), "a cohort process started working on it".into()));
                        continue;
                    }
                }
            } else {
                None
            };
            locked.push((run, lock));
        }
        let batch_refs: Vec<(&str, Oid)> = locked.iter().flat_map(|(run, _)| run_refs(run)).collect();
        let batch_gone = refs_gc::delete_all(&repo, &batch_refs)?;
        for (run, _lock) in &locked {
            apply_run(paths, &repo, state, run, batch_gone, &mut out)?;
        }
    }
    // Pack what is left of cohort's refs, but not those of a run being worked on (also one
    // that started after the plan was made): its refs move often, and a moved one would fail
    // the packing transaction.
    let mut held = std::collections::HashMap::<String, bool>::new();
    let mut left = refs_gc::refs_under(&repo, refs_gc::TASK_REFS)?;
    left.extend(refs_gc::refs_under(&repo, refs_gc::ATTEMPT_REFS)?);
    left.retain(|(name, _)| {
        let run = name
            .strip_prefix(refs_gc::TASK_REFS)
            .or_else(|| name.strip_prefix(refs_gc::ATTEMPT_REFS))
            .and_then(|rest| rest.split('/').next());
        run.is_some_and(|id| {
            !*held
                .entry(id.to_string())
                .or_insert_with(|| super::is_active(paths, id))
        })
    });
    match refs_gc::pack(&repo, &left) {
        Ok(n) => out.packed = n,
        Err(e) => out.pack_error = Some(format!("{e:#}")),
    }
    // What a killed gc left of a pack it was writing goes whether or not this one packs.
    match git::loose::remove_stale_temps(&paths.common_dir.join("objects"), git::loose::STALE_AFTER) {
        Ok(n) => out.stale_pack_dirs = n,
        Err(e) => out.objects_error = Some(format!("{e:#}")),
    }
    if let Some(at_least) = git::loose::threshold(&repo) {
        match git::loose::pack_loose(&repo, at_least) {
            Ok(p) => out.objects = p,
            Err(e) => out.objects_error = Some(format!("{e:#}")),
        }
    }
    Ok(out)
}

/// Loose objects now (count, bytes) and the count from which gc packs them (`None`: off).
pub fn loose_objects(paths: &RepoPaths) -> Result<(usize, u64, Option<usize>)> {
    let repo = paths.open()?;
    let loose = git::loose::loose_objects(&paths.common_dir.join("objects"))?;
    Ok((
        loose.len(),
        loose.iter().map(|(_, _, b)| b).sum(),
        git::loose::threshold(&repo),
    ))
}

/// How many runs' refs go in one ref transaction (and how many run locks are held at once).
const RUNS_PER_BATCH: usize = 64;

fn run_refs(run: &RunPlan) -> Vec<(&str, Oid)> {
    run.items
        .iter()
        .filter_map(|i| match i {
            Item::Ref { name, id, .. } => Some((name.as_str(), *id)),
            _ => None,
        })
        .collect()
}

/// One run of a batch, its lock held: its refs (gone with the batch's transaction, else in
/// one of the run's own, else one by one), codex homes, and then, if every ref went, its rows
/// and directory.
fn apply_run(
    paths: &RepoPaths,
    repo: &gix::Repository,
    state: &State,
    run: &RunPlan,
    batch_gone: bool,
    out: &mut GcOutcome,
) -> Result<()> {
    let all_gone = batch_gone || refs_gc::delete_all(repo, &run_refs(run))?;
    let mut moved = false;
    for item in &run.items {
        match item {
            Item::Ref { .. } if all_gone => out.removed.push((run.run_id.clone(), item.clone())),
            Item::Ref { name, id, .. } => {
                if refs_gc::delete(repo, name, *id)? {
                    out.removed.push((run.run_id.clone(), item.clone()));
                } else {
                    moved = true;
                    out.skipped
                        .push((run.run_id.clone(), format!("{name} moved since it was read; kept")));
                }
            }
            // Rows and the directory go last, and only if every ref went: a run with a
            // ref left keeps what explains it.
            Item::Rows | Item::Dir { .. } => {}
            Item::CodexHome { path, .. } => {
                git::safefs::remove_path(path).with_context(|| format!("cannot remove {}", path.display()))?;
                out.removed.push((run.run_id.clone(), item.clone()));
            }
        }
    }
    if moved {
        return Ok(());
    }
    if run.items.contains(&Item::Rows) {
        state.delete_run(&run.run_id)?;
        out.removed.push((run.run_id.clone(), Item::Rows));
    }
    for item in &run.items {
        if let Item::Dir { path, .. } = item {
            remove_run_dir(paths, &run.run_id, path)?;
            out.removed.push((run.run_id.clone(), item.clone()));
        }
    }
    Ok(())
}

/// A run's directory: first its checkouts and their admin dirs (a killed run leaves them, and
/// may have registered them under the git dir's `worktrees/`), then the rest, never following
/// a symlink an agent left.
fn remove_run_dir(paths: &RepoPaths, run_id: &str, dir: &Path) -> Result<()> {
    git::pool::Pool::new(&paths.common_dir, run_id, dir.to_path_buf()).remove_all()?;
    git::safefs::remove_path(dir).with_context(|| format!("cannot remove {}", dir.display()))
}

impl State {
    /// Removes every row of a run, in one transaction.
    pub fn delete_run(&self, run_id: &str) -> Result<()> {
        self.atomically(|st| {
            for table in ["events", "verifies", "attempts", "tasks", "runs"] {
                let key = if table == "runs" { "id" } else { "run_id" };
                st.conn
                    .execute(&format!("DELETE FROM {table} WHERE {key} = ?1"), params![run_id])?;
            }
            Ok(())
        })
    }
}

/// cohort's footprint in the repository, for `cohort status`.
pub fn footprint(paths: &RepoPaths) -> Result<(u64, usize)> {
    let repo = paths.open()?;
    Ok((disk_usage(&paths.cohort_dir()), refs_gc::count(&repo)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delete_run_leaves_other_runs() {
        let dir = tempfile::tempdir().unwrap();
        let st = State::open(&dir.path().join("state.db")).unwrap();
        for id in ["a", "b"] {
            st.create_run(
                id,
                "cohort/service",
                "{task}",
                "{}",
                &[("t".into(), format!("br-{id}"))],
            )
            .unwrap();
            st.start_attempt(id, 1, 1, "base").unwrap();
            st.event(id, 1, 1, "agent", "{}").unwrap();
        }
        st.delete_run("a").unwrap();
        assert!(st.run(Some("a")).unwrap().is_none());
        assert!(st.tasks("a").unwrap().is_empty());
        assert_eq!(st.tasks("b").unwrap().len(), 1);
        assert_eq!(st.events_of("b", "agent").unwrap().len(), 1);
        assert!(st.events_of("a", "agent").unwrap().is_empty());
    }

    #[test]
    fn age_counts_from_the_last_finish() {
        let now = humantime::parse_rfc3339("2026-03-01T00:00:00Z").unwrap();
        let mut row = RunRow {
            id: "r".into(),
            created_at: "2026-01-01T00:00:00.000Z".into(),
            finished_at: None,
            status: "done".into(),
            service_branch: "cohort/service".into(),
            base_commit: None,
            template: String::new(),
            options: String::new(),
        };
        assert_eq!(age(&row, now).unwrap().as_secs() / 86400, 59);
        row.finished_at = Some("2026-02-28T00:00:00.000Z".into());
        assert_eq!(age(&row, now).unwrap().as_secs() / 86400, 1);
    }
}
