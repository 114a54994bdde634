//! The sync step on the user's repository: snapshot commit of local
//! changes, pull from origin, and the service branch.
//!
//! Everything is computed first (objects may be written, which is
//! harmless, except for files the secret scan refuses: it runs before any
//! blob is written); refs and files move only once every check has passed,
//! so a refusal touches nothing.

use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result};
use gix::bstr::ByteSlice;
use gix::remote::Direction;

use super::checkout::{self, Untracked};
use super::merge::merge_trees_of;
use super::remote::{self, Access, RemoteError};
use super::{is_ancestor, refs, scan, short, snapshot, tree_of, write_commit, GitError, Oid};
use crate::secret::Secret;

pub struct SyncOptions<'a> {
    pub run_id: &'a str,
    /// The configured API key, so the scan can refuse a file that holds it.
    pub key: Option<&'a Secret>,
    pub allow_files: &'a [String],
    /// The service's credentials for origin (default: the user's git credential config).
    pub access: &'a Access,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    NoRemote,
    NoUpstream,
    UpToDate,
    FastForwarded { to: Oid },
    Merged { commit: Oid },
}

#[derive(Debug, Clone)]
pub struct SyncReport {
    pub branch: String,
    /// The snapshot commit, when there were local changes.
    pub snapshot: Option<Oid>,
    pub snapshot_files: usize,
    pub upstream: Upstream,
    /// The branch tip after the sync.
    pub head: Oid,
    /// `--allow-file` paths that matched no new or changed file.
    pub unmatched_allow: Vec<String>,
}

/// The checked-out branch: its full ref name and tip.
pub fn current_branch(repo: &gix::Repository) -> Result<(String, Oid)> {
    let head = repo.head().context("cannot read HEAD")?;
    if head.is_detached() {
        return Err(GitError::Detached.into());
    }
    let name = head.referent_name().ok_or(GitError::Detached)?.as_bstr().to_string();
    let id = head.id().ok_or(GitError::Unborn)?.detach();
    Ok((name, id))
}

/// A sync worked out in full (commits written, no ref or file moved yet),
/// so the caller can check what else must hold (the service branch merge)
/// before the user's branch and files move.
#[derive(Debug)]
pub struct PreparedSync {
    report: SyncReport,
    old_head: Oid,
    snapshot_tree: Oid,
}

impl PreparedSync {
    /// The branch tip once the sync is applied.
    pub fn head(&self) -> Oid {
        self.report.head
    }

    /// Moves the branch (compare-and-swap on its old tip) and the files.
    pub fn apply(self, repo: &gix::Repository) -> Result<SyncReport> {
        let r = self.report;
        if r.head != self.old_head {
            refs::cas(repo, &r.branch, Some(self.old_head), r.head, "cohort: sync")?;
        }
        if r.head != self.old_head || r.snapshot.is_some() {
            // The files already hold the snapshot; write what the pull brought
            // and refresh the index so `git status` is clean.
            checkout::move_to(repo, tree_of(repo, r.head)?, Untracked::Keep, Some(self.snapshot_tree))?;
        }
        Ok(r)
    }
}

/// Works out the sync: refusals (unfinished merge, secrets, divergence)
/// come from here, before anything moved.
pub fn prepare(repo: &gix::Repository, opts: &SyncOptions<'_>) -> Result<PreparedSync> {
    refuse_unfinished(repo)?;
    let (branch, head) = current_branch(repo)?;
    let head_tree = tree_of(repo, head)?;
    let workdir = repo.workdir().ok_or(GitError::Bare)?.to_path_buf();

    // Scan before any blob is written: a refused file must not end up in the
    // object store, which every task checkout shares.
    let plan = snapshot::plan(repo, head_tree)?;
    let to_scan: Vec<String> = plan
        .paths_to_scan()
        .iter()
        .map(|p| p.to_str_lossy().into_owned())
        .collect();
    let findings = scan::scan(&workdir, to_scan.iter().map(String::as_str), opts.key, opts.allow_files);
    if !findings.found.is_empty() {
        return Err(GitError::Secrets(findings).into());
    }
    let snap = plan.write(repo)?;
    let (local, snapshot_commit) = if snap.tree != head_tree {
        let msg = format!("cohort: snapshot before run {}\n", opts.run_id);
        let c = write_commit(repo, snap.tree, &[head], &msg)?;
        (c, Some(c))
    } else {
        (head, None)
    };

    let (upstream, target) = pull_target(repo, &branch, local, opts.access)?;
    Ok(PreparedSync {
        report: SyncReport {
            branch,
            snapshot: snapshot_commit,
            snapshot_files: snap.changed.len(),
            upstream,
            head: target,
            unmatched_allow: findings.unmatched_allow,
        },
        old_head: head,
        snapshot_tree: snap.tree,
    })
}

/// Refuses a repository in the middle of a merge, rebase, cherry-pick (…),
/// or with unresolved conflicts in its index: a snapshot would commit the
/// conflict markers, and the operation is the user's to finish or abort.
fn refuse_unfinished(repo: &gix::Repository) -> Result<()> {
    use gix::state::InProgress as P;
    if let Some(state) = repo.state() {
        let (what, fix) = match state {
            P::Merge => (
                "a merge",
                "finish it (resolve, `git add`, `git commit`) or abort it (`git merge --abort`)",
            ),
            P::Rebase | P::RebaseInteractive | P::ApplyMailboxRebase => (
                "a rebase",
                "finish it (`git rebase --continue`) or abort it (`git rebase --abort`)",
            ),
            P::CherryPick | P::CherryPickSequence => (
                "a cherry-pick",
                "finish it (`git cherry-pick --continue`) or abort it (`git cherry-pick --abort`)",
            ),
            P::Revert | P::RevertSequence => (
                "a revert",
                "finish it (`git revert --continue`) or abort it (`git revert --abort`)",
            ),
            P::ApplyMailbox => (
                "`git am`",
                "finish it (`git am --continue`) or abort it (`git am --abort`)",
            ),
            P::Bisect => ("a bisect", "end it with `git bisect reset`"),
        };
        return Err(GitError::Unfinished {
            what: what.into(),
            fix: fix.into(),
        }
        .into());
    }
    // A conflicting `git stash pop` (or `checkout -m`) leaves conflicts but no operation.
    let index = repo.index_or_empty().context("cannot read the index")?;
    let mut paths: Vec<String> = index
        .entries()
        .iter()
        .filter(|e| e.stage() != gix::index::entry::Stage::Unconflicted)
        .map(|e| e.path(&index).to_str_lossy().into_owned())
        .collect();
    paths.dedup();
    if !paths.is_empty() {
        return Err(GitError::Unfinished {
            what: format!("resolving conflicts in {}", paths.join(", ")),
            fix: "resolve them (edit the files, then `git add` them)".into(),
        }
        .into());
    }
    Ok(())
}

/// Fetches the branch's upstream on `origin` and works out where the branch
/// should end up: `local`, the upstream (fast-forward), or a clean merge.
fn pull_target(repo: &gix::Repository, branch: &str, local: Oid, access: &Access) -> Result<(Upstream, Oid)> {
    let Ok(remote) = repo.find_remote("origin") else {
        return Ok((Upstream::NoRemote, local));
    };
    let full: &gix::refs::FullNameRef = branch.try_into()?;
    let short_name = full.shorten();
    let on_origin = repo
        .branch_remote_name(short_name, Direction::Fetch)
        .is_some_and(|n| n.as_bstr() == "origin");
    let tracking = match repo.branch_remote_tracking_ref_name(full, Direction::Fetch) {
        Some(Ok(name)) if on_origin => name.as_bstr().to_string(),
        _ => return Ok((Upstream::NoUpstream, local)),
    };
    fetch(&remote, access)?;
    let Some(theirs) = refs::read(repo, &tracking)? else {
        return Ok((Upstream::NoUpstream, local));
    };
    if is_ancestor(repo, theirs, local)? {
        return Ok((Upstream::UpToDate, local));
    }
    if is_ancestor(repo, local, theirs)? {
        return Ok((Upstream::FastForwarded { to: theirs }, theirs));
    }
    match merge_trees_of(repo, local, theirs)? {
        Ok(tree) => {
            let msg = format!(
                "Merge {} into {short_name}\n",
                tracking.trim_start_matches("refs/remotes/")
            );
            let commit = write_commit(repo, tree, &[local, theirs], &msg)?;
            Ok((Upstream::Merged { commit }, commit))
        }
        Err(paths) => Err(GitError::Diverged {
            branch: short_name.to_string(),
            upstream: tracking.trim_start_matches("refs/remotes/").to_string(),
            paths: paths.join(", "),
        }
        .into()),
    }
}

/// Fetches origin with its configured refspecs (remote-tracking refs move, as with `git
/// fetch`; no branch of the user's does). Errors say whether the credentials or the
/// network failed.
pub fn fetch(remote: &gix::Remote<'_>, access: &Access) -> Result<(), RemoteError> {
    let url = remote
        .url(Direction::Fetch)
        .cloned()
        .ok_or_else(|| RemoteError::Other {
            what: "fetch from",
            url: "origin".into(),
            cause: "it has no URL (`git remote set-url origin URL`)".into(),
        })?;
    let interrupt = AtomicBool::new(false);
    let conn = remote::fetch_connection(remote, &url, access)?;
    conn.prepare_fetch(gix::progress::Discard, Default::default())
        .and_then(|p| p.receive(gix::progress::Discard, &interrupt))
        .map(drop)
        .map_err(|e| remote::classify("fetch from", &url, &e))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Service {
    Created,
    UpToDate,
    FastForwarded,
    Merged,
}

/// The service branch's update, worked out (a merge commit may be written)
/// but not made: a conflict is found before the user's branch moves.
#[derive(Debug)]
pub struct ServiceUpdate {
    pub how: Service,
    name: String,
    old: Option<Oid>,
    pub tip: Oid,
}

/// Works out how the service branch comes to contain `head`: created from
/// it when missing, otherwise `head` is merged in (fast-forward if possible).
/// The name was checked up front (`names::check_service_branch`).
pub fn plan_service_branch(repo: &gix::Repository, service: &str, head: Oid) -> Result<ServiceUpdate> {
    let name = format!("refs/heads/{service}");
    let old = refs::read(repo, &name)?;
    let (how, tip) = match old {
        None => (Service::Created, head),
        Some(tip) if is_ancestor(repo, head, tip)? => (Service::UpToDate, tip),
        Some(tip) if is_ancestor(repo, tip, head)? => (Service::FastForwarded, head),
        Some(tip) => match merge_trees_of(repo, tip, head)? {
            Ok(tree) => {
                let msg = format!("cohort: merge {} into {service}\n", short(head));
                (Service::Merged, write_commit(repo, tree, &[tip, head], &msg)?)
            }
            Err(paths) => {
                return Err(GitError::ServiceConflict {
                    service: service.into(),
                    paths: paths.join(", "),
                }
                .into())
            }
        },
    };
    Ok(ServiceUpdate { how, name, old, tip })
}

impl ServiceUpdate {
    /// Moves the service branch, by compare-and-swap on the tip it was worked out from.
    pub fn apply(self, repo: &gix::Repository) -> Result<(Service, Oid)> {
        if self.old != Some(self.tip) {
            let reason = match self.how {
                Service::Created => "cohort: create service branch",
                Service::FastForwarded => "cohort: fast-forward service branch",
                _ => "cohort: merge HEAD into service branch",
            };
            refs::cas(repo, &self.name, self.old, self.tip, reason)?;
        }
        Ok((self.how, self.tip))
    }
}
