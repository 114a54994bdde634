//! Ref reads and the one way cohort moves a ref: compare-and-swap.

use anyhow::{Context, Result};
use gix::refs::transaction::{Change, LogChange, PreviousValue, RefEdit, RefLog};
use gix::refs::Target;

use super::{GitError, Oid};

/// The commit a ref points to, or `None` if it does not exist.
pub fn read(repo: &gix::Repository, name: &str) -> Result<Option<Oid>> {
    match repo
        .try_find_reference(name)
        .with_context(|| format!("cannot read ref {name}"))?
    {
        Some(mut r) => Ok(Some(r.peel_to_id()?.detach())),
        None => Ok(None),
    }
}

/// Moves `name` to `new` only if it currently points at `expected`
/// (`None`: only if it does not exist yet). A concurrent writer makes this
/// fail with [`GitError::RefMoved`] instead of being overwritten.
pub fn cas(repo: &gix::Repository, name: &str, expected: Option<Oid>, new: Oid, reason: &str) -> Result<()> {
    let previous = match expected {
        Some(old) => PreviousValue::MustExistAndMatch(Target::Object(old)),
        None => PreviousValue::MustNotExist,
    };
    let edit = RefEdit {
        change: Change::Update {
            log: LogChange {
                mode: RefLog::AndReference,
                force_create_reflog: false,
                message: reason.replace('\n', " ").into(),
            },
            expected: previous,
            new: Target::Object(new),
        },
        name: name.try_into().with_context(|| format!("invalid ref name {name}"))?,
        deref: false,
    };
    match repo.edit_reference(edit) {
        Ok(_) => Ok(()),
        Err(err) => {
            // Tell a lost race apart from other failures by looking again.
            let now = read(repo, name).ok().flatten();
            if now != expected {
                Err(GitError::RefMoved {
                    name: name.to_string(),
                    expected: expected.map(super::short).unwrap_or_else(|| "no ref".into()),
                }
                .into())
            } else {
                Err(anyhow::Error::new(err).context(format!("cannot update ref {name}")))
            }
        }
    }
}

/// Points a worktree's HEAD (in its private git dir) at a branch, unless
/// it already does (a rewrite would replace the file for nothing).
pub fn set_head_symbolic(repo: &gix::Repository, branch_ref: &str) -> Result<()> {
    if let Ok(Some(head)) = repo.try_find_reference("HEAD") {
        if let gix::refs::TargetRef::Symbolic(name) = head.target() {
            if name.as_bstr() == branch_ref {
                return Ok(());
            }
        }
    }
    let edit = RefEdit {
        change: Change::Update {
            log: LogChange {
                mode: RefLog::AndReference,
                force_create_reflog: false,
                message: "cohort: checkout".into(),
            },
            expected: PreviousValue::Any,
            new: Target::Symbolic(branch_ref.try_into()?),
        },
        name: "HEAD".try_into()?,
        deref: false,
    };
    repo.edit_reference(edit)
        .context("cannot point the checkout's HEAD at its task branch")?;
    Ok(())
}

/// Removes the lock files a killed process left under `dir` (a ref namespace only one
/// process at a time writes, such as one run's task branches: the caller holds the run's
/// lock). gix, like git, refuses to move a ref whose lock file exists, so a `kill -9` in the
/// middle of a ref update would otherwise fail that task on every resume.
pub fn clear_stale_locks(dir: &std::path::Path) -> Result<usize> {
    let mut removed = 0;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(0);
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let kind = entry.file_type()?;
        if kind.is_dir() {
            removed += clear_stale_locks(&path)?;
        } else if kind.is_file() && path.extension().is_some_and(|e| e == "lock") {
            std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
            removed += 1;
        }
    }
    Ok(removed)
}
