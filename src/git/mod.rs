//! Everything cohort does to git, in-process with gitoxide (`gix`).
//!
//! The functions here return values and move refs only through
//! [`refs::cas`], a compare-and-swap on the ref's old value. Sequencing
//! (what happens when) is `run/`'s business.

pub mod checkout;
pub mod commit;
pub mod gc;
pub mod import;
pub mod loose;
pub mod merge;
pub mod names;
pub mod pool;
pub mod private;
pub mod publish;
pub mod push;
pub mod refs;
pub mod remote;
pub mod safefs;
pub mod scan;
pub mod seed;
pub mod snapshot;
pub mod stage;
pub mod status;
pub mod sync;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

pub use gix::ObjectId as Oid;

/// Errors the user must act on; everything else is an `anyhow` chain.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("{path} is not inside a git repository; run cohort from a repository or pass -C REPO")]
    NotARepo { path: PathBuf },
    #[error("the repository has no commits yet; make a first commit, then run cohort")]
    Unborn,
    #[error("HEAD is detached; check out a branch first (cohort commits the branch's local changes)")]
    Detached,
    #[error("the repository has no working tree (it is bare); cohort needs a checkout to run in")]
    Bare,
    #[error("ref {name} moved while cohort was updating it (expected {expected}); nothing was overwritten")]
    RefMoved { name: String, expected: String },
    #[error(
        "{branch} and {upstream} have diverged and cannot be merged cleanly (conflicts in: {paths}); \
         merge or rebase by hand, then run cohort again (nothing was changed)"
    )]
    Diverged {
        branch: String,
        upstream: String,
        paths: String,
    },
    #[error(
        "HEAD cannot be merged into {service} cleanly (conflicts in: {paths}); \
         merge it by hand or pass --service-branch with a new name (nothing was changed)"
    )]
    ServiceConflict { service: String, paths: String },
    #[error(
        "{service} is checked out here; cohort merges into it while it runs, so check out \
         your own branch first (or pass --service-branch with another name)"
    )]
    ServiceCheckedOut { service: String },
    #[error(
        "the repository is in the middle of {what}: {fix}, then run cohort again; or pass --no-sync \
         to run on the last commit without touching your branch (nothing was changed)"
    )]
    Unfinished { what: String, fix: String },
    #[error("{0}")]
    Secrets(scan::Findings),
}

/// The repository cohort works on: where its git dir, common dir and
/// working tree are.
#[derive(Debug, Clone)]
pub struct RepoPaths {
    pub workdir: PathBuf,
    /// The common git dir (shared by linked worktrees): objects and refs.
    pub common_dir: PathBuf,
}

impl RepoPaths {
    pub fn discover(start: &Path) -> Result<RepoPaths> {
        let repo = gix::discover(start).map_err(|_| GitError::NotARepo {
            path: start.to_path_buf(),
        })?;
        let workdir = repo.workdir().ok_or(GitError::Bare)?.to_path_buf();
        let common_dir = repo.common_dir().to_path_buf();
        Ok(RepoPaths {
            workdir: canonical(&workdir)?,
            common_dir: canonical(&common_dir)?,
        })
    }

    pub fn open(&self) -> Result<gix::Repository> {
        open(&self.workdir)
    }

    /// cohort's own directory inside the git dir: state DB, run files, checkouts.
    /// Inside the git dir so it is never part of the user's working tree.
    pub fn cohort_dir(&self) -> PathBuf {
        self.common_dir.join("cohort")
    }
}

fn canonical(p: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(p).with_context(|| format!("cannot resolve {}", p.display()))
}

/// Opens a repository with settings suited to many short operations.
pub fn open(path: &Path) -> Result<gix::Repository> {
    // Racy-git checks at nanosecond precision: with whole seconds, every
    // file written in the second the index was written (all of a fresh
    // checkout, say) is re-read and hashed by each status in that second.
    // Where the file system keeps no nanoseconds they are 0 on both sides
    // and the check is the whole-second one.
    let options = gix::open::Options::default().config_overrides(["gitoxide.core.useNsec=true"]);
    let repo =
        gix::open_opts(path, options).with_context(|| format!("cannot open git repository at {}", path.display()))?;
    Ok(tuned(repo))
}

/// A handle of a repository opened once (see [`open`]) for this thread, set up as [`open`]
/// sets up its own.
pub fn thread_local(repo: &gix::ThreadSafeRepository) -> gix::Repository {
    tuned(repo.to_thread_local())
}

fn tuned(mut repo: gix::Repository) -> gix::Repository {
    // Tree diffs and merges read the same objects repeatedly.
    repo.object_cache_size_if_unset(4 * 1024 * 1024);
    repo
}

/// The identity for commits cohort writes: the repository's configured user,
/// or a fixed fallback so runs work in a fresh environment.
pub fn signature(repo: &gix::Repository) -> gix::actor::Signature {
    let time = gix::date::Time::now_local_or_utc();
    let configured = repo
        .committer()
        .and_then(|s| s.ok())
        .map(|s| (s.name.to_owned(), s.email.to_owned()));
    let (name, email) = configured.unwrap_or_else(|| ("cohort".into(), "cohort@localhost".into()));
    gix::actor::Signature { name, email, time }
}

/// Writes a commit object (no ref is moved) and returns its id.
pub fn write_commit(repo: &gix::Repository, tree: Oid, parents: &[Oid], message: &str) -> Result<Oid> {
    let sig = signature(repo);
    let commit = gix::objs::Commit {
        tree,
        parents: parents.iter().copied().collect(),
        author: sig.clone(),
        committer: sig,
        encoding: None,
        message: message.into(),
        extra_headers: Vec::new(),
    };
    Ok(repo.write_object(&commit)?.detach())
}

pub fn tree_of(repo: &gix::Repository, commit: Oid) -> Result<Oid> {
    Ok(repo.find_commit(commit)?.tree_id()?.detach())
}

/// True when `ancestor` is reachable from `descendant` (or equal to it).
pub fn is_ancestor(repo: &gix::Repository, ancestor: Oid, descendant: Oid) -> Result<bool> {
    if ancestor == descendant {
        return Ok(true);
    }
    match repo.merge_base(ancestor, descendant) {
        Ok(Some(base)) => Ok(base.detach() == ancestor),
        _ => Ok(false),
    }
}

/// A repository-relative path from git's bytes (unix paths are bytes).
pub fn rela_path(p: &gix::bstr::BStr) -> &std::path::Path {
    use std::os::unix::ffi::OsStrExt;
    std::path::Path::new(std::ffi::OsStr::from_bytes(p))
}

pub fn short(id: Oid) -> String {
    id.to_hex_with_len(10).to_string()
}
