//! Committing what an agent left in its checkout onto the task branch, trusting none of it.

use anyhow::{Context, Result};

use super::pool::{Checkout, CLEAN_MARK};
use super::scan::{Finding, StreamScan};
use super::{import, is_ancestor, private, refs, snapshot, stage, status, tree_of, write_commit, Oid};
use crate::secret::Secret;

#[derive(Debug, Clone)]
pub struct TaskCommit {
    /// The task branch's tip after the commit.
    pub tip: Oid,
    /// Files that differ between the task's base and `tip`.
    pub files_changed: Vec<String>,
    /// Files left out of the commit for being over `[run] max_file_size`, with their sizes.
    /// The checkout then holds more than its tree: the caller must not reuse it.
    pub oversized: Vec<(String, u64)>,
    /// Why the agent's own commits were not kept (their content is still committed, from
    /// the checkout's files).
    pub commits_refused: Option<String>,
    /// What was removed from the checkout because git would not keep it, and why.
    pub dropped: Vec<(String, &'static str)>,
}

impl TaskCommit {
    pub fn is_empty(&self) -> bool {
        self.files_changed.is_empty()
    }
}

/// Limits on what one task may hand back.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The largest file (and git object) taken from a checkout.
    pub max_file_size: u64,
    /// The API key, looked for (with token shapes, private keys and `.env` files) in
    /// everything a task hands back.
    pub key: Option<Secret>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_file_size: 100 * 1024 * 1024,
            key: None,
        }
    }
}

/// What a checkout held after its agent, taken without trusting it.
#[derive(Debug, Clone)]
pub struct Collected {
    /// The task branch's tip, the agent's own commits included.
    pub tip: Oid,
    /// The checkout's files as a tree (blobs written).
    pub tree: Oid,
    pub base: Oid,
    /// See [`TaskCommit::oversized`].
    pub oversized: Vec<(String, u64)>,
    pub commits_refused: Option<String>,
    pub dropped: Vec<(String, &'static str)>,
    /// Secrets in what the agent hands back: then nothing of the checkout was written (its
    /// blobs are in no object of the repository) and `tree` is the branch's.
    pub secrets: Vec<Finding>,
}

impl Collected {
    /// The task's reason when it holds secrets: the files and what was found.
    pub fn secret_reason(&self) -> Option<String> {
        (!self.secrets.is_empty()).then(|| {
            let list: Vec<String> = self
                .secrets
                .iter()
                .map(|f| format!("{} ({})", f.path, f.what))
                .collect();
            format!(
                "the task's change holds secrets, so it was not committed: {}",
                list.join(", ")
            )
        })
    }
}

/// Takes what the agent left: its own commits, when they build on the task branch (their
/// objects imported one by one, checked, from its private git dir; the branch then moves to
/// its head by compare-and-swap), and every change in the checkout (tracked, deleted and
/// untracked files, honouring .gitignore) as a tree.
pub fn collect(checkout: &Checkout, branch_ref: &str, base: Oid, limits: &Limits) -> Result<Collected> {
    checkout.clear_leftovers()?;
    let root = checkout.root()?;
    let repo = checkout.open()?;
    let mut tip = refs::read(&repo, branch_ref)?.with_context(|| format!("task branch {branch_ref} is missing"))?;
    let mut scan = StreamScan::new(limits.key.as_ref());
    let mut commits_refused = None;
    if let Some(head) = private::read_head(&checkout.git_dir)? {
        if head != tip {
            match take_commits(&repo, checkout, head, limits, &mut scan) {
                Ok(()) => {
                    if is_ancestor(&repo, tip, head).unwrap_or(false) {
                        refs::cas(&repo, branch_ref, Some(tip), head, "cohort: take the agent's commits")?;
                        tip = head;
                    }
                }
                Err(e) => commits_refused = Some(format!("{e:#}")),
            }
        }
    }
    let show = |p: &gix::bstr::BString| super::rela_path(p.as_ref()).display().to_string();
    let base_tree = tree_of(&repo, base)?;
    let compared = {
        let mut observe = |path: &gix::bstr::BStr, chunk: &[u8]| scan.chunk(path, chunk);
        let mut settings = compare_settings(&repo, checkout, limits, Some(&mut observe))?;
        stage::compare(&repo, &checkout.admin, &root, base_tree, &mut settings)?
    };
    for u in &compared.changes.upserts {
        scan.name(&show(&u.path));
    }
    // Nothing of a change that holds a secret is written.
    let tree = if scan.found.is_empty() {
        stage::write(&repo, &checkout.admin, &root, base_tree, &compared)?
    } else {
        tree_of(&repo, tip)?
    };
    let changes = &compared.changes;
    Ok(Collected {
        tip,
        tree,
        base,
        oversized: changes.oversized.iter().map(|(p, n)| (show(p), *n)).collect(),
        commits_refused,
        dropped: changes.dropped.iter().map(|(p, why)| (show(p), *why)).collect(),
        secrets: scan.found,
    })
}

/// Commits what was collected on top of the task branch (compare-and-swap) and marks the
/// checkout clean when it holds exactly that tree.
pub fn commit(checkout: &Checkout, branch_ref: &str, c: Collected, message: &str) -> Result<TaskCommit> {
    let repo = checkout.open()?;
    let tip = if c.tree != tree_of(&repo, c.tip)? {
        let commit = write_commit(&repo, c.tree, &[c.tip], message)?;
        refs::cas(&repo, branch_ref, Some(c.tip), commit, "cohort: commit task")?;
        commit
    } else {
        c.tip
    };
    if c.oversized.is_empty() && c.secrets.is_empty() {
        // Mark it clean, so the next task moves it by a tree diff.
        std::fs::write(checkout.admin.join(CLEAN_MARK), c.tree.to_string())?;
    }
    let files_changed = snapshot::diff_paths(&repo, tree_of(&repo, c.base)?, tree_of(&repo, tip)?)?
        .into_iter()
        .map(|d| super::rela_path(d.path.as_ref()).display().to_string())
        .collect();
    Ok(TaskCommit {
        tip,
        files_changed,
        oversized: c.oversized,
        commits_refused: c.commits_refused,
        dropped: c.dropped,
    })
}

/// After a program cohort does not trust ran in a checkout that held `tree` (the verify
/// command, which runs the agent's code): compares the checkout with that tree as `collect`
/// does, without trusting it, and marks it clean again when no tracked file changed. What
/// git would not keep (a build's ignored output) is removed by the compare, and stat data
/// that changed with the content unchanged is refreshed in cohort's index. Returns whether
/// the checkout is clean: if not, the next task writes it anew.
pub fn reclean(checkout: &Checkout, tree: Oid, limits: &Limits) -> Result<bool> {
    let root = checkout.root()?;
    let repo = checkout.open()?;
    let compared = {
        let mut settings = compare_settings(&repo, checkout, limits, None)?;
        stage::compare(&repo, &checkout.admin, &root, tree, &mut settings)?
    };
    if !compared.changes.is_empty() || !compared.changes.oversized.is_empty() {
        return Ok(false);
    }
    // Nothing new to write: this only refreshes the index's stat data.
    let written = stage::write(&repo, &checkout.admin, &root, tree, &compared)?;
    anyhow::ensure!(written == tree, "the checkout's tree changed while it was compared");
    checkout.mark_clean(tree)?;
    Ok(true)
}

/// [`collect`] then [`commit`].
pub fn commit_all(
    checkout: &Checkout,
    branch_ref: &str,
    base: Oid,
    message: &str,
    limits: Limits,
) -> Result<TaskCommit> {
    let c = collect(checkout, branch_ref, base, &limits)?;
    commit(checkout, branch_ref, c, message)
}

/// Imports the objects of the agent's commits up to `head`, each scanned for secrets before
/// it is written.
fn take_commits(
    repo: &gix::Repository,
    checkout: &Checkout,
    head: Oid,
    limits: &Limits,
    scan: &mut StreamScan,
) -> Result<()> {
    let max_total = limits.max_file_size.saturating_mul(16);
    let (objects, size) = private::sanitize_objects(&checkout.git_dir)?;
    anyhow::ensure!(
        size <= max_total,
        "the agent's git objects take {size} bytes, over {max_total}"
    );
    let limits = import::Limits {
        max_object: limits.max_file_size,
        max_total,
    };
    let done = import::import(repo, &objects, head, limits, scan)?;
    tracing::debug!(
        objects = done.objects,
        bytes = done.bytes,
        "imported the agent's commits"
    );
    Ok(())
}

/// How a checkout is compared with cohort's index of it: the repository's (the user's)
/// settings, never the agent's, and the task's size limit.
fn compare_settings<'a>(
    repo: &gix::Repository,
    checkout: &Checkout,
    limits: &Limits,
    observe: Option<&'a mut status::Observer<'a>>,
) -> Result<status::Settings<'a>> {
    Ok(status::Settings {
        hash: repo.object_hash(),
        stat: repo.stat_options()?,
        file_mode: repo.config_snapshot().boolean("core.fileMode").unwrap_or(true),
        excludes: excludes(repo, &checkout.common_dir)?,
        max_file_size: limits.max_file_size,
        observe,
    })
}

/// The user's ignore patterns: the repository's `info/exclude` and `core.excludesFile`
/// (default `$XDG_CONFIG_HOME/git/ignore`), as git reads them.
fn excludes(repo: &gix::Repository, common_dir: &std::path::Path) -> Result<gix::ignore::Search> {
    let configured = repo.config_snapshot().trusted_path("core.excludesFile").ok().flatten();
    let file = configured.or_else(|| {
        let base = std::env::var_os("XDG_CONFIG_HOME")
            .map(std::path::PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".config")))?;
        Some(base.join("git").join("ignore"))
    });
    let mut buf = Vec::new();
    gix::ignore::Search::from_git_dir(common_dir, file, &mut buf, Default::default())
        .context("cannot read the repository's ignore patterns")
}

/// The commit message for a task: subject plus trailers that tie the commit
/// to its run and task.
pub fn task_message(run_id: &str, index: usize, task: &str) -> String {
    format!("task {index:03}: {task}\n\nCohort-Run: {run_id}\nCohort-Task: {index:03}\n")
}
