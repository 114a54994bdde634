//! The ref side of `cohort gc`: cohort's refs of a run, deleting one by compare-and-swap,
//! and packing loose refs into `packed-refs`, all in-process with gix. The object side
//! (packing loose objects, never pruning) is `loose.rs`.

use anyhow::{Context, Result};
use gix::refs::file::transaction::PackedRefs;
use gix::refs::transaction::{Change, LogChange, PreviousValue, RefEdit, RefLog};
use gix::refs::Target;

use super::Oid;

/// Where cohort keeps its refs: task branches, and the earlier attempts it keeps reachable.
pub const TASK_REFS: &str = "refs/heads/cohort/task/";
pub const ATTEMPT_REFS: &str = "refs/cohort/attempts/";

/// Every direct ref below `prefix` (a full ref name ending in `/`), with the commit it names.
pub fn refs_under(repo: &gix::Repository, prefix: &str) -> Result<Vec<(String, Oid)>> {
    let platform = repo.references().context("cannot list refs")?;
    let mut out = Vec::new();
    for r in platform
        .prefixed(prefix)
        .with_context(|| format!("cannot list refs below {prefix}"))?
    {
        let r = r.map_err(|e| anyhow::anyhow!("cannot read a ref below {prefix}: {e}"))?;
        if let Some(id) = r.target().try_id() {
            out.push((r.name().as_bstr().to_string(), id.to_owned()));
        }
    }
    Ok(out)
}

/// A run's refs: its task branches and kept attempts.
pub fn run_refs(repo: &gix::Repository, run_id: &str) -> Result<Vec<(String, Oid)>> {
    let mut out = refs_under(repo, &format!("{TASK_REFS}{run_id}/"))?;
    out.extend(refs_under(repo, &format!("{ATTEMPT_REFS}{run_id}/"))?);
    Ok(out)
}

/// How many refs cohort holds (task branches and attempts), loose and packed.
pub fn count(repo: &gix::Repository) -> Result<usize> {
    Ok(refs_under(repo, TASK_REFS)?.len() + refs_under(repo, ATTEMPT_REFS)?.len())
}

/// Deletes `name` only if it still names `expected` (its loose file, its `packed-refs` line
/// and its reflog). `false` when it moved or went meanwhile: then nothing was deleted.
pub fn delete(repo: &gix::Repository, name: &str, expected: Oid) -> Result<bool> {
    let edit = RefEdit {
        change: Change::Delete {
            expected: PreviousValue::MustExistAndMatch(Target::Object(expected)),
            log: RefLog::AndReference,
        },
        name: name.try_into().with_context(|| format!("invalid ref name {name}"))?,
        deref: false,
    };
    match repo.edit_reference(edit) {
        Ok(_) => Ok(true),
        Err(err) => match super::refs::read(repo, name)? {
            Some(now) if now == expected => Err(anyhow::anyhow!("{err}").context(format!("cannot delete ref {name}"))),
            _ => Ok(false),
        },
    }
}

/// Deletes all of `refs` in one transaction, each only if it still names the value given:
/// `packed-refs` is rewritten once rather than once a ref (with 10,000 packed refs that is
/// what gc's time goes to). `false` when any moved or went, or the transaction failed
/// otherwise: then nothing was deleted, and [`delete`] one by one sorts them out.
pub fn delete_all(repo: &gix::Repository, refs: &[(&str, Oid)]) -> Result<bool> {
    if refs.is_empty() {
        return Ok(true);
    }
    let mut edits = Vec::with_capacity(refs.len());
    for (name, expected) in refs {
        edits.push(RefEdit {
            change: Change::Delete {
                expected: PreviousValue::MustExistAndMatch(Target::Object(*expected)),
                log: RefLog::AndReference,
            },
            name: (*name).try_into().with_context(|| format!("invalid ref name {name}"))?,
            deref: false,
        });
    }
    let wait = gix::lock::acquire::Fail::AfterDurationWithBackoff(std::time::Duration::from_secs(1));
    let done = repo
        .refs
        .transaction()
        .packed_refs(PackedRefs::DeletionsAndNonSymbolicUpdates(Box::new(
            repo.objects.clone(),
        )))
        .prepare(edits, gix::lock::acquire::Fail::Immediately, wait)
        .and_then(|t| t.commit(None));
    Ok(done.is_ok())
}

/// Moves the loose refs among `refs` into `packed-refs` and removes their files, as
/// `git pack-refs` does: one gix transaction that rewrites each ref to the value read
/// (compare-and-swap, so a ref that moved fails the whole transaction and nothing is packed)
/// with the packed-refs mode that drops the loose file. A same-value update writes no
/// reflog entry. Returns how many refs were packed.
pub fn pack(repo: &gix::Repository, refs: &[(String, Oid)]) -> Result<usize> {
    let loose: Vec<&(String, Oid)> = refs
        .iter()
        .filter(|(name, _)| repo.common_dir().join(name).is_file())
        .collect();
    if loose.is_empty() {
        return Ok(0);
    }
    let mut edits = Vec::with_capacity(loose.len());
    for (name, id) in &loose {
        edits.push(RefEdit {
            change: Change::Update {
                log: LogChange {
                    mode: RefLog::AndReference,
                    force_create_reflog: false,
                    message: "cohort: pack refs".into(),
                },
                expected: PreviousValue::MustExistAndMatch(Target::Object(*id)),
                new: Target::Object(*id),
            },
            name: name
                .as_str()
                .try_into()
                .with_context(|| format!("invalid ref name {name}"))?,
            deref: false,
        });
    }
    // git's default lock timeouts for refs (core.filesRefLockTimeout: none) and packed-refs
    // (core.packedRefsTimeout: 1 s): a run that holds packed-refs briefly is waited for.
    let wait = gix::lock::acquire::Fail::AfterDurationWithBackoff(std::time::Duration::from_secs(1));
    repo.refs
        .transaction()
        .packed_refs(PackedRefs::DeletionsAndNonSymbolicUpdatesRemoveLooseSourceReference(
            Box::new(repo.objects.clone()),
        ))
        .prepare(edits, gix::lock::acquire::Fail::Immediately, wait)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("cannot lock the refs to pack")?
        .commit(None)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("cannot write packed-refs")?;
    Ok(loose.len())
}
