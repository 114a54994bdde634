//! `cohort logs TASK [--run RUN]`

use anyhow::Result;

use crate::cli::usage;
use crate::run::RunDir;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The task number (as in `cohort status`).
    pub task: usize,
    /// The run (default: the newest).
    #[arg(long)]
    pub run: Option<String>,
}

pub fn run(args: Args) -> Result<u8> {
    let (paths, state) = super::open_state()?;
    let (row, tasks) = super::load_run(&state, args.run.as_deref())?;
    if !tasks.iter().any(|t| t.index == args.task) {
        return Err(usage(format!(
            "run {} has no task {}; it has 1 to {}",
            row.id,
            args.task,
            tasks.len()
        )));
    }
    let path = RunDir::new(&paths, &row.id).log(args.task);
    match std::fs::read_to_string(&path) {
        // The log holds what agents and verify commands printed: their escape sequences and
        // control characters are not for the user's terminal.
        Ok(text) => {
            for line in text.lines() {
                println!("{}", crate::run::verify::strip_ansi(line));
            }
        }
        Err(_) => eprintln!("task {:03} has no log yet (it has not started)", args.task),
    }
    Ok(0)
}
