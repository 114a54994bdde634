//! `cohort submit FILE [-C REPO] [--state-dir DIR]`: hand a request document to the
//! service that serves this repository (either scope), or to the one started by hand on
//! DIR. The file lands in its inbox atomically; the path it landed at is printed.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::cli::usage;
use crate::git::RepoPaths;
use crate::service::inbox::Inbox;
use crate::service::{lock, services_for, Registration, ServiceScope};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The request document (Markdown or plain text), as for `cohort run`.
    pub file: PathBuf,
    /// Which service, when both a user and a system service serve this repository.
    #[arg(long, value_enum, conflicts_with = "state_dir")]
    pub scope: Option<ServiceScope>,
    /// The state directory of a service started by hand (`cohort serve --state-dir DIR`),
    /// in the place of the installed services'.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<u8> {
    let paths = RepoPaths::discover(&std::env::current_dir()?)?;
    // Refuse what the service would refuse (empty, binary, no tasks) now, while the user
    // is here to see it.
    let doc = crate::plan::read_document(&args.file)?;
    crate::plan::rules::plan(&doc, &args.file.display().to_string())?;
    let (what, state) = match &args.state_dir {
        Some(dir) => (format!("service on {}", dir.display()), by_hand(dir, &paths.workdir)?),
        None => {
            let mut found = services_for(&paths.workdir);
            if let Some(scope) = args.scope {
                found.retain(|(s, _)| *s == scope);
            }
            let Some((scope, state)) = found.into_iter().next() else {
                return Err(usage(format!(
                    "no cohort service serves {}; install one with `cohort service install --repo {}` \
                     (or check `cohort service status`), or name a service started by hand with \
                     --state-dir",
                    paths.workdir.display(),
                    paths.workdir.display()
                )));
            };
            (format!("{} service", scope.as_str()), state)
        }
    };
    let body = std::fs::read(&args.file).with_context(|| format!("cannot read {}", args.file.display()))?;
    let name = args.file.file_name().unwrap_or_default().to_string_lossy().into_owned();
    let dest = Inbox::new(&state).submit(&name, &body).map_err(|e| {
        if nix::unistd::geteuid().is_root() {
            e
        } else {
            e.context(format!("the {what}'s inbox is not writable by you; try sudo"))
        }
    })?;
    println!("{}", dest.display());
    let running = match lock::holder(&state) {
        Some(Some(pid)) => format!("it runs as PID {pid}"),
        Some(None) => "it is running".to_string(),
        None => "no `cohort serve` runs on it now: the request waits for the next one".to_string(),
    };
    eprintln!(
        "submitted to the {what} as {} ({running}); it is filed under {} or {} when finished; follow it with \
         `cohort status --json` or `cohort service logs`",
        dest.display(),
        state.join("done").display(),
        state.join("failed").display()
    );
    Ok(0)
}

/// The state directory named with `--state-dir`, once it is known to be a service's and,
/// if that service said which repository it serves, this one: a request is planned and run
/// in the service's repository, whatever directory `submit` was called from.
fn by_hand(dir: &Path, repo: &Path) -> Result<PathBuf> {
    if !dir.join("inbox").is_dir() {
        return Err(usage(format!(
            "{} is not a cohort service's state directory (it has no inbox/): start one with \
             `cohort serve --state-dir {}`",
            dir.display(),
            dir.display()
        )));
    }
    if let Some(reg) = Registration::read(dir) {
        let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        if canon(&reg.repo) != canon(repo) {
            return Err(usage(format!(
                "the service on {} serves {}, not {}; submit from there (-C {})",
                dir.display(),
                reg.repo.display(),
                repo.display(),
                reg.repo.display()
            )));
        }
    }
    Ok(dir.to_path_buf())
}
