//! `cohort retry [RUN] [TASK…]`

use std::path::Path;
use std::sync::Arc;

use anyhow::Result;

use super::run::{build_engine, handle_signals, print_summary, EngineFlags};
use crate::cli::usage;
use crate::config::Config;
use crate::run::{self, state::TaskStatus};

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  cohort retry              every failed, conflict, unverified or over-budget task of the newest run\n  \
                        cohort retry 3 7          tasks 3 and 7 of the newest run\n  \
                        cohort retry RUN 3        task 3 of run RUN"
)]
pub struct Args {
    /// The run (default: the newest), then the task numbers to re-run (default: every task
    /// that ended failed, conflict, unverified or over budget).
    #[arg(value_name = "[RUN] [TASK]")]
    pub what: Vec<String>,
    #[command(flatten)]
    pub engine: EngineFlags,
}

/// The statuses a task can be retried from.
const RETRYABLE: [TaskStatus; 4] = [
    TaskStatus::Failed,
    TaskStatus::Conflict,
    TaskStatus::Unverified,
    TaskStatus::OverBudget,
];

pub async fn run(args: Args, config_path: Option<&Path>) -> Result<u8> {
    let (run_arg, numbers) = split_args(&args.what)?;
    let (paths, state) = super::open_state()?;
    let (row, tasks) = super::load_run(&state, run_arg.as_deref())?;
    if run::is_active(&paths, &row.id) {
        return Err(usage(format!(
            "run {} is still being worked on by another cohort process; wait for it to end (or stop it) first",
            row.id
        )));
    }
    if tasks
        .iter()
        .any(|t| !t.status.is_done() && t.status != TaskStatus::OverBudget)
    {
        return Err(usage(format!(
            "run {} has unfinished tasks; finish it with `cohort resume {}` first",
            row.id, row.id
        )));
    }
    let chosen: Vec<usize> = if numbers.is_empty() {
        tasks
            .iter()
            .filter(|t| RETRYABLE.contains(&t.status))
            .map(|t| t.index)
            .collect()
    } else {
        for n in &numbers {
            match tasks.iter().find(|t| t.index == *n) {
                None => {
                    return Err(usage(format!(
                        "run {} has no task {n}; it has 1 to {}",
                        row.id,
                        tasks.len()
                    )))
                }
                Some(t) if !RETRYABLE.contains(&t.status) => {
                    return Err(usage(format!(
                        "task {n} is {}; only failed, conflict, unverified or over-budget tasks are retried",
                        t.status.as_str()
                    )))
                }
                Some(_) => {}
            }
        }
        numbers
    };
    if chosen.is_empty() {
        eprintln!(
            "run {}: no task ended failed, conflict, unverified or over budget; nothing to retry",
            row.id
        );
        return Ok(0);
    }
    let config = Config::load(config_path, Some(&paths.workdir))?;
    let stored: serde_json::Value = serde_json::from_str(&row.options).unwrap_or_default();
    let mut flags = args.engine;
    flags.service_branch = Some(row.service_branch.clone());
    let mut engine = build_engine(paths, &config, &flags, &stored)?;
    if engine.opts.push.is_some() {
        engine.access = super::run::git_access(false)?;
    }
    // Task 1 does not go first: this is no new fan-out.
    engine.opts.calibrate = false;
    let engine = Arc::new(engine);
    engine.agent.preflight().await?;
    {
        let st = engine.state()?;
        st.atomically(|st| {
            for idx in &chosen {
                st.mark_retry(&row.id, *idx)?;
            }
            st.reopen_run(&row.id)
        })?;
    }
    handle_signals(engine.cancel.clone());
    let list: Vec<String> = chosen.iter().map(|i| format!("{i:03}")).collect();
    crate::progress::say(&format!(
        "retrying run {}: task(s) {} from the current tip of {}",
        row.id,
        list.join(", "),
        row.service_branch
    ));
    let summary = run::execute(engine, &row.id).await?;
    print_summary(&summary);
    Ok(summary.exit_code())
}

/// `[RUN] [TASK…]`: a first word that is not a number names the run.
fn split_args(what: &[String]) -> Result<(Option<String>, Vec<usize>)> {
    let (run, rest) = match what.first() {
        Some(first) if first.parse::<usize>().is_err() => (Some(first.clone()), &what[1..]),
        _ => (None, what),
    };
    let numbers = rest
        .iter()
        .map(|w| {
            w.parse::<usize>()
                .map_err(|_| usage(format!("{w:?} is not a task number (see `cohort status`)")))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((run, numbers))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_then_numbers() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(split_args(&v(&[])).unwrap(), (None, vec![]));
        assert_eq!(split_args(&v(&["3", "7"])).unwrap(), (None, vec![3, 7]));
        assert_eq!(split_args(&v(&["r1", "2"])).unwrap(), (Some("r1".into()), vec![2]));
        assert!(split_args(&v(&["r1", "x"])).is_err());
    }
}
