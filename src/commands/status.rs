//! `cohort status [RUN] [--json]`

use anyhow::Result;

use crate::run::state::{RunRow, TaskRow, TaskStatus};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The run to show (default: the newest).
    pub run: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> Result<u8> {
    let (paths, state) = super::open_state()?;
    let (row, tasks) = super::load_run(&state, args.run.as_deref())?;
    let row = super::shown(&paths, row);
    if args.json {
        // The newest (or named) run at the top level, and, without a RUN, every run: what
        // a service has done, newest first.
        let mut out = run_json(&row, &tasks, &state.placements(&row.id)?);
        let (bytes, refs) = crate::run::gc::footprint(&paths)?;
        let kept = kept_checkouts_bytes(&paths);
        out["disk"] = serde_json::json!({
            "cohort_dir_bytes": bytes,
            "cohort_refs": refs,
            "kept_checkouts_bytes": kept,
        });
        if args.run.is_none() {
            let mut runs = Vec::new();
            for r in state.runs()? {
                let t = state.tasks(&r.id)?;
                let placed = state.placements(&r.id)?;
                runs.push(run_json(&super::shown(&paths, r), &t, &placed));
            }
            out["runs"] = runs.into();
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(0);
    }
    println!(
        "run {} ({}), service branch {}, started {}",
        row.id, row.status, row.service_branch, row.created_at
    );
    // With remote workers, which one runs (or ran) each task.
    let placed = state.placements(&row.id)?;
    for t in &tasks {
        match placed.get(&t.index) {
            Some(w) => println!("  {:03}  {:<10} {}  [on {w}]", t.index, t.status.as_str(), t.text),
            None => println!("  {:03}  {:<10} {}", t.index, t.status.as_str(), t.text),
        }
    }
    if row.status == "stopped" {
        println!(
            "cohort stopped while working on this run; `cohort resume {}` finishes it",
            row.id
        );
    }
    // What cohort keeps in the repository, all runs together; `cohort gc` trims it.
    let (bytes, refs) = crate::run::gc::footprint(&paths)?;
    println!(
        "disk: {} in {}, {refs} cohort ref(s) (`cohort gc` removes old runs)",
        super::gc::human_bytes(bytes),
        paths.cohort_dir().display()
    );
    let kept = kept_checkouts_bytes(&paths);
    if kept > 0 {
        println!(
            "      of which {} are checkouts kept for the next run (`cohort gc --checkouts` removes them)",
            super::gc::human_bytes(kept)
        );
    }
    Ok(0)
}

/// What the pool kept between runs takes (counted in the cohort directory's total too).
fn kept_checkouts_bytes(paths: &crate::git::RepoPaths) -> u64 {
    crate::run::gc::disk_usage(&paths.cohort_dir().join(crate::git::pool::KEPT_POOL))
}

fn run_json(row: &RunRow, tasks: &[TaskRow], placed: &std::collections::BTreeMap<usize, String>) -> serde_json::Value {
    let counts: serde_json::Map<String, serde_json::Value> = TaskStatus::ALL
        .iter()
        .map(|s| {
            (
                s.as_str().to_string(),
                tasks.iter().filter(|t| t.status == *s).count().into(),
            )
        })
        .collect();
    let request = serde_json::from_str::<serde_json::Value>(&row.options)
        .ok()
        .and_then(|o| o["request"].as_str().map(String::from));
    serde_json::json!({
        "run": row,
        "request": request,
        "counts": counts,
        "tasks": tasks.iter().map(|t| serde_json::json!({
            "index": t.index, "task": t.text, "status": t.status, "attempts": t.attempts,
            "worker": placed.get(&t.index),
        })).collect::<Vec<_>>(),
    })
}
