//! `cohort report [RUN] [--json]`

use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The run to report on (default: the newest).
    pub run: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

fn duration(start: Option<&str>, end: Option<&str>) -> Option<f64> {
    let s = humantime::parse_rfc3339_weak(start?.trim_end_matches('Z')).ok()?;
    let e = humantime::parse_rfc3339_weak(end?.trim_end_matches('Z')).ok()?;
    Some(e.duration_since(s).ok()?.as_secs_f64())
}

pub fn run(args: Args) -> Result<u8> {
    let (_, state) = super::open_state()?;
    let (row, tasks) = super::load_run(&state, args.run.as_deref())?;
    let code = crate::run::Summary {
        run_id: row.id.clone(),
        tasks: tasks.clone(),
        interrupted: false,
    }
    .exit_code();
    if args.json {
        let out = serde_json::json!({
            "run": row,
            "tasks": tasks.iter().map(|t| {
                let mut v = serde_json::to_value(t).unwrap_or_default();
                v["duration_secs"] = duration(t.started_at.as_deref(), t.ended_at.as_deref()).into();
                v
            }).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(code);
    }
    println!(
        "run {} ({}), service branch {}",
        row.id, row.status, row.service_branch
    );
    for t in &tasks {
        let secs = duration(t.started_at.as_deref(), t.ended_at.as_deref())
            .map(|d| format!("{d:.1}s"))
            .unwrap_or_else(|| "-".into());
        let merge = t
            .merge_commit
            .as_deref()
            .map(|c| &c[..10.min(c.len())])
            .unwrap_or("-");
        let exit = t
            .exit_code
            .map(|c| c.to_string())
            .unwrap_or_else(|| "-".into());
        println!("{:03} {:<9} {}", t.index, t.status.as_str(), t.text);
        println!(
            "    branch {}  merge {merge}  files {}  time {secs}  exit {exit}  attempts {}",
            t.branch,
            t.files_changed.len(),
            t.attempts
        );
        if let Some(r) = &t.reason {
            println!("    reason: {r}");
        }
    }
    Ok(code)
}
