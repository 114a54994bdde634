//! collect and commit: a task's result taken from its checkout without trusting it, and
//! made the task commit on its branch (compare-and-swap), with the outcome recorded.

use std::io::Write;
use std::sync::Arc;

use anyhow::Result;

use super::record::Record;
use super::state::TaskRow;
use super::task::{Ran, Shared};
use super::{blocking, Engine};
use crate::git::commit::{self, Collected, TaskCommit};
use crate::git::pool::Lease;
use crate::git::{self, Oid};
use crate::runtime::Exit;

/// collect: takes the result from the checkout and the agent's private git dir, trusting
/// neither (see `git::commit::collect`). A checkout whose result cannot be taken is removed,
/// not reused.
pub(super) async fn collect(
    e: &Arc<Engine>,
    checkout: Lease,
    branch_ref: &str,
    base: Oid,
    log: &mut std::fs::File,
) -> Result<(Lease, Collected)> {
    let t0 = std::time::Instant::now();
    let (limits, br) = (e.opts.limits.clone(), branch_ref.to_string());
    let (checkout, collected) = blocking(move || {
        let c = commit::collect(&checkout, &br, base, &limits);
        Ok((checkout, c))
    })
    .await?;
    tracing::debug!(ms = t0.elapsed().as_millis() as u64, "collected");
    let collected = match collected {
        Ok(c) => c,
        Err(err) => {
            discard(checkout).await;
            return Err(err);
        }
    };
    for (path, why) in &collected.dropped {
        writeln!(log, "--- removed {path}: {why}")?;
    }
    if let Some(why) = &collected.commits_refused {
        writeln!(
            log,
            "--- the agent's own commits were not kept (their files were): {why}"
        )?;
    }
    Ok((checkout, collected))
}

/// Removes a checkout that must not be used again.
pub(super) async fn discard(checkout: Lease) {
    if let Err(e) = blocking(move || checkout.discard()).await {
        tracing::warn!("cannot remove a checkout: {e:#}");
    }
}

/// commit: what was collected becomes the task commit on its branch (compare-and-swap), and
/// the outcome is recorded: failed, unchanged, or committed (then the tip, and the checkout
/// holding it, to verify and merge).
#[allow(clippy::too_many_arguments)]
pub(super) async fn commit(
    e: &Arc<Engine>,
    s: &Arc<Shared>,
    row: &TaskRow,
    rec: &Record<'_>,
    ran: &Ran,
    (checkout, collected): (Lease, Collected),
    branch_ref: &str,
    log: &mut std::fs::File,
) -> Result<Option<(Oid, Lease)>> {
    if let Some(reason) = collected.secret_reason() {
        // Not committed, not merged; the checkout holds the secret, so it goes.
        discard(checkout).await;
        writeln!(log, "--- not committed: {reason}")?;
        rec.secret(&collected.tip.to_string(), ran.exit.code(), &reason)?;
        return Ok(None);
    }
    let message = commit::task_message(&s.run_id, row.index, &row.text);
    let oversized = collected.oversized.clone();
    let br = branch_ref.to_string();
    let (checkout, tc) = blocking(move || {
        let tc = commit::commit(&checkout, &br, collected, &message);
        Ok((checkout, tc))
    })
    .await?;
    let checkout = if tc.is_err() || !oversized.is_empty() {
        discard(checkout).await; // it holds files its tree does not
        None
    } else {
        Some(checkout)
    };
    let tc: TaskCommit = tc?;
    let tip = tc.tip.to_string();
    writeln!(
        log,
        "--- committed {} ({} files changed)",
        git::short(tc.tip),
        tc.files_changed.len()
    )?;
    if let Some(reason) = &ran.over_budget {
        // What it changed stays committed on its branch; it is not merged.
        let commit = (!tc.is_empty()).then_some(tip.as_str());
        rec.over_budget(&tip, commit, &tc.files_changed, ran.exit.code(), reason)?;
        return Ok(None);
    }
    let failure = if !oversized.is_empty() {
        let list: Vec<String> = oversized.iter().map(|(p, n)| format!("{p} ({n} bytes)")).collect();
        Some(format!(
            "files over [run] max_file_size ({} bytes) were not committed: {}",
            e.opts.limits.max_file_size,
            list.join(", ")
        ))
    } else {
        match ran.exit {
            Exit::Code(c) => e.agent.failure(c, &ran.events),
            Exit::Signal(sig) => Some(format!("the agent was killed by signal {sig}")),
            Exit::TimedOut(d) => Some(format!("the agent timed out after {}", humantime::format_duration(d))),
            Exit::Cancelled => Some("interrupted".into()),
        }
    };
    if let Some(reason) = failure {
        let commit = (!tc.is_empty()).then_some(tip.as_str());
        rec.failed(&tip, commit, &tc.files_changed, ran.exit.code(), &reason)?;
        return Ok(None);
    }
    if tc.is_empty() {
        rec.unchanged(&tip, ran.exit.code())?;
        return Ok(None);
    }
    rec.committed(&tip, &tc.files_changed, ran.exit.code())?;
    Ok(checkout.map(|c| (tc.tip, c)))
}
