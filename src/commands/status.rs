//! `cohort status [RUN] [--json]`

use anyhow::Result;

use crate::run::state::TaskStatus;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The run to show (default: the newest).
    pub run: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> Result<u8> {
    let (_, state) = super::open_state()?;
    let (row, tasks) = super::load_run(&state, args.run.as_deref())?;
    if args.json {
        let counts: serde_json::Map<String, serde_json::Value> = [
            TaskStatus::Pending,
            TaskStatus::Running,
            TaskStatus::Committed,
            TaskStatus::Merged,
            TaskStatus::Unchanged,
            TaskStatus::Failed,
            TaskStatus::Conflict,
        ]
        .iter()
        .map(|s| {
            (
                s.as_str().to_string(),
                tasks.iter().filter(|t| t.status == *s).count().into(),
            )
        })
        .collect();
        let out = serde_json::json!({
            "run": row,
            "counts": counts,
            "tasks": tasks.iter().map(|t| serde_json::json!({
                "index": t.index, "task": t.text, "status": t.status, "attempts": t.attempts,
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(0);
    }
    println!(
        "run {} ({}), service branch {}, started {}",
        row.id, row.status, row.service_branch, row.created_at
    );
    for t in &tasks {
        println!("  {:03}  {:<10} {}", t.index, t.status.as_str(), t.text);
    }
    Ok(0)
}
