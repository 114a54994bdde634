//! verify and merge: the verify gate on a task's commit, with the failure handed back to the
//! agent for a few rounds, and the merge train, which verifies each merge result before the
//! service branch moves. Merges go one at a time; agents keep running meanwhile.

use std::sync::Arc;

use anyhow::Result;

use super::collect::{collect, commit};
use super::record::Record;
use super::state::TaskRow;
use super::task::{agent, lease_at, thread_of, AttemptCtx, AttemptResult, Shared};
use super::verifies::VerifyKind;
use super::verify::{verify, Verdict, Which};
use super::{blocking, Engine};
use crate::git::pool::Lease;
use crate::git::{self, merge, tree_of, Oid};
use crate::runtime::Exit;

/// verify, with feedback rounds: the verify command on the task's commit `tip`; on failure
/// the agent gets it back and its new work is committed and verified again, up to
/// `[verify] retries` times. The rounds already recorded for this attempt count (a resume
/// redoes neither a passed verify nor a finished round). `Some(tip)`: what passed (or the
/// tip as it is, without a verify command); `None`: the task ended (unverified, failed, …)
/// or was interrupted, as recorded.
pub(super) async fn rounds(
    e: &Arc<Engine>,
    s: &Arc<Shared>,
    row: &TaskRow,
    rec: &Record<'_>,
    at: &mut AttemptCtx,
    checkout: Option<Lease>,
    mut tip: Oid,
) -> Result<Option<Oid>> {
    let Some(settings) = e.opts.verify.clone() else {
        return Ok(Some(tip));
    };
    // Resuming (no checkout handed over): a failure recorded before the crash counts.
    let mut resuming = checkout.is_none();
    let mut checkout = checkout;
    loop {
        let resumed = std::mem::take(&mut resuming);
        let tree = tree_at(e, tip).await?;
        let recorded: Vec<_> = e
            .state()?
            .attempt_verifies(&s.run_id, row.index, rec.attempt)?
            .into_iter()
            .filter(|v| v.kind == VerifyKind::Task)
            .collect();
        // After a crash: a failure already recorded for this very tree is not verified again.
        // (Within a run, a feedback round that changed nothing is verified again: it counts.)
        let (verdict, round) = match recorded.last() {
            Some(v) if resumed && !v.passed && v.tree.parse::<Oid>().ok() == Some(tree) => {
                let failed = Verdict {
                    passed: false,
                    failure: v.failure.clone(),
                    cancelled: false,
                };
                (failed, v.round)
            }
            _ => {
                let lease = match checkout.take() {
                    Some(l) => l,
                    None => lease_at(s, &at.branch_ref, tip).await?,
                };
                let round = recorded.len() as u32;
                let which = Which {
                    idx: row.index,
                    attempt: rec.attempt,
                    round,
                    kind: VerifyKind::Task,
                };
                rec.verifying(round);
                let v = verify(e, &s.run_id, &settings, &lease, (tip, tree), which, &mut at.log).await?;
                checkout = Some(lease);
                (v, round)
            }
        };
        if verdict.cancelled {
            return Ok(None); // still `committed`: `resume` verifies it
        }
        if verdict.passed {
            return Ok(Some(tip));
        }
        let failure = verdict.failure.unwrap_or_default();
        if round >= settings.retries {
            rec.unverified(&format!(
                "the verify command still failed after {} round(s) of feedback: {failure}",
                settings.retries
            ))?;
            return Ok(None);
        }
        // A feedback round: the agent, told what failed, in the checkout as it left it.
        let lease = match checkout.take() {
            Some(l) => l,
            None => lease_at(s, &at.branch_ref, tip).await?,
        };
        rec.feedback_round(round + 1, settings.retries);
        let feedback = at.feedback(round + 1, &failure, at.thread.clone())?;
        let ran = agent(e, s, row, rec, at, &lease, Some(feedback)).await?;
        if ran.exit == Exit::Cancelled {
            return Ok(None); // still `committed`, its failure recorded: `resume` goes on
        }
        if let Some(thread) = thread_of(&ran.events) {
            at.thread = Some(thread);
        }
        let collected = collect(e, lease, &at.branch_ref, at.base, &mut at.log).await?;
        match commit(e, s, row, rec, &ran, collected, &at.branch_ref, &mut at.log).await? {
            Some((next, lease)) => {
                tip = next;
                checkout = Some(lease);
            }
            None => return Ok(None),
        }
    }
}

async fn tree_at(e: &Engine, commit: Oid) -> Result<Oid> {
    let paths = e.paths.clone();
    blocking(move || tree_of(&paths.open()?, commit)).await
}

/// merge: the task's tip into the service branch, one merge at a time. The merge commit is
/// made first; with `[verify] merged`, it is checked out and verified, and only then does the
/// service branch move to it (compare-and-swap; if another writer moved it meanwhile, the
/// merge is made and verified again on the new tip).
pub(super) async fn merge(
    e: &Arc<Engine>,
    s: &Arc<Shared>,
    row: &TaskRow,
    tip: Oid,
    rec: &Record<'_>,
) -> Result<AttemptResult> {
    let idx = row.index;
    let _merging = s.merge_lock.lock().await;
    let service_ref = format!("refs/heads/{}", e.opts.service_branch);
    let message = format!(
        "Merge task {idx:03}: {}\n\nCohort-Run: {}\nCohort-Task: {idx:03}\n",
        row.text, s.run_id
    );
    let train = e.opts.verify.clone().filter(|v| v.merged);
    for _ in 0..20 {
        let t0 = std::time::Instant::now();
        let staged = {
            let (paths, service_ref, message) = (e.paths.clone(), service_ref.clone(), message.clone());
            blocking(move || merge::stage(&paths.open()?, &service_ref, tip, &message)).await?
        };
        let (ours, commit, tree) = match staged {
            merge::Staged::AlreadyContained { merge } => {
                let merge = merge.map(|c| c.to_string());
                rec.merged(merge.as_deref(), "already in the service branch")?;
                return Ok(AttemptResult::Finished);
            }
            merge::Staged::Conflict { paths } => return Ok(AttemptResult::Conflict(paths)),
            merge::Staged::Ready { ours, commit, tree } => (ours, commit, tree),
        };
        let mut detail = format!("as {}", git::short(commit));
        if let Some(settings) = &train {
            let same = e.state()?.tree_passed(&s.run_id, &tree.to_string())?;
            if same {
                detail.push_str("; its tree already passed the verify command");
            } else {
                let lease = lease_at(s, &service_ref, commit).await?;
                let which = Which {
                    idx,
                    attempt: rec.attempt,
                    round: 0,
                    kind: VerifyKind::Merge,
                };
                rec.verifying_merge(commit);
                let mut log = std::fs::OpenOptions::new().append(true).open(s.dir.log(idx))?;
                let v = verify(e, &s.run_id, settings, &lease, (commit, tree), which, &mut log).await?;
                drop(lease);
                if v.cancelled {
                    return Ok(AttemptResult::Finished); // still `committed`: `resume` merges it
                }
                if !v.passed {
                    return Ok(AttemptResult::MergeFailed(v.failure.unwrap_or_default()));
                }
                detail.push_str("; the merge result passed the verify command");
            }
        }
        let moved = {
            let (paths, service_ref, message) = (e.paths.clone(), service_ref.clone(), message.clone());
            blocking(move || merge::advance(&paths.open()?, &service_ref, ours, commit, &message)).await?
        };
        tracing::debug!(task = idx, ms = t0.elapsed().as_millis() as u64, moved, "merge");
        if moved {
            rec.merged(Some(&commit.to_string()), &detail)?;
            return Ok(AttemptResult::Finished);
        }
    }
    anyhow::bail!("{service_ref} kept moving during 20 merge attempts; is another process writing to it?")
}
