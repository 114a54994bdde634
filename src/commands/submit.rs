//! `cohort submit FILE [-C REPO]`: hand a request document to the running service that
//! serves this repository (either scope). The file lands in its inbox atomically.

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::cli::usage;
use crate::git::RepoPaths;
use crate::service::inbox::Inbox;
use crate::service::{services_for, ServiceScope};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The request document (Markdown or plain text), as for `cohort run`.
    pub file: PathBuf,
    /// Which service, when both a user and a system service serve this repository.
    #[arg(long, value_enum)]
    pub scope: Option<ServiceScope>,
}

pub fn run(args: Args) -> Result<u8> {
    let paths = RepoPaths::discover(&std::env::current_dir()?)?;
    // Refuse what the service would refuse (empty, binary, no tasks) now, while the user
    // is here to see it.
    let doc = crate::plan::read_document(&args.file)?;
    crate::plan::rules::plan(&doc, &args.file.display().to_string())?;
    let mut found = services_for(&paths.workdir);
    if let Some(scope) = args.scope {
        found.retain(|(s, _)| *s == scope);
    }
    let Some((scope, state)) = found.into_iter().next() else {
        return Err(usage(format!(
            "no cohort service serves {}; install one with `cohort service install --repo {}` \
             (or check `cohort service status`)",
            paths.workdir.display(),
            paths.workdir.display()
        )));
    };
    let body = std::fs::read(&args.file).with_context(|| format!("cannot read {}", args.file.display()))?;
    let name = args.file.file_name().unwrap_or_default().to_string_lossy().into_owned();
    let dest = Inbox::new(&state).submit(&name, &body).map_err(|e| {
        if nix::unistd::geteuid().is_root() {
            e
        } else {
            e.context(format!(
                "the {} service's inbox is not writable by you; try sudo",
                scope.as_str()
            ))
        }
    })?;
    println!("{}", dest.display());
    eprintln!(
        "submitted to the {} service; follow it with `cohort status --json` or `cohort service logs`",
        scope.as_str()
    );
    Ok(0)
}
