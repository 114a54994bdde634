//! One file per command; each drives the library and returns an exit code.

pub mod bridge;
pub mod container;
pub mod doctor;
pub mod gc;
pub mod image;
pub mod image_push;
pub mod k8s;
pub mod keys;
pub mod logs;
pub mod plan;
pub mod report;
pub mod resume;
pub mod retry;
pub mod run;
pub mod run_remote;
pub mod run_verify;
pub mod serve;
pub mod service;
pub mod status;
pub mod submit;
pub mod trust;
pub mod worker;

use anyhow::Result;

use crate::git::RepoPaths;
use crate::run::state::{RunRow, State, TaskRow};

/// Opens the state DB of the repository around the current directory.
pub(crate) fn open_state() -> Result<(RepoPaths, State)> {
    let paths = RepoPaths::discover(&std::env::current_dir()?)?;
    let db = crate::run::state_path(&paths);
    if !db.exists() {
        return Err(crate::cli::usage(format!(
            "no cohort runs in {} yet; start one with `cohort run`",
            paths.workdir.display()
        )));
    }
    let state = State::open(&db)?;
    Ok((paths, state))
}

/// The named run, or the newest one.
/// A run's status as shown: `stopped` for one whose state says `running`
/// but that no cohort process is working on (it crashed or was killed).
pub(crate) fn shown(paths: &crate::git::RepoPaths, mut row: RunRow) -> RunRow {
    if row.status == "running" && !crate::run::is_active(paths, &row.id) {
        row.status = "stopped".into();
    }
    row
}

pub(crate) fn load_run(state: &State, run: Option<&str>) -> Result<(RunRow, Vec<TaskRow>)> {
    let row = state.run(run)?.ok_or_else(|| match run {
        Some(id) => crate::cli::usage(format!("no run {id}; `cohort status` shows the newest run")),
        None => crate::cli::usage("no cohort runs yet; start one with `cohort run`"),
    })?;
    let tasks = state.tasks(&row.id)?;
    Ok((row, tasks))
}
