//! `cohort resume [RUN]`

use std::path::Path;
use std::sync::Arc;

use anyhow::Result;

use super::run::{build_engine, handle_signals, print_summary, EngineFlags};
use crate::config::Config;
use crate::run;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The run to finish (default: the newest).
    pub run: Option<String>,
    #[command(flatten)]
    pub engine: EngineFlags,
}

pub async fn run(args: Args, config_path: Option<&Path>) -> Result<u8> {
    let (paths, state) = super::open_state()?;
    let (row, tasks) = super::load_run(&state, args.run.as_deref())?;
    drop(state);
    let left = run::unfinished(&tasks);
    if left == 0 {
        eprintln!("run {} has no unfinished tasks", row.id);
        let summary = run::Summary {
            run_id: row.id,
            tasks,
            interrupted: false,
            push: None,
            calibration: None,
        };
        print_summary(&summary);
        return Ok(summary.exit_code());
    }
    let config = Config::load(config_path, Some(&paths.workdir))?;
    let stored: serde_json::Value = serde_json::from_str(&row.options).unwrap_or_default();
    let mut flags = args.engine;
    // The service branch is part of the run, not a setting to change midway.
    flags.service_branch = Some(row.service_branch.clone());
    let mut engine = build_engine(paths, &config, &flags, &stored)?;
    if engine.opts.push.is_some() {
        engine.access = super::run::git_access(false)?;
    }
    let engine = Arc::new(engine);
    engine.agent.preflight().await?;
    handle_signals(engine.cancel.clone());
    crate::progress::say(&format!("resuming run {}: {left} unfinished task(s)", row.id));
    let summary = run::execute(engine, &row.id).await?;
    print_summary(&summary);
    Ok(summary.exit_code())
}
