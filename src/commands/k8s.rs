//! `cohort k8s manifests --run RUN --parallelism N --image REF [--controller URL] [-o FILE]`:
//! the Secret, Job and NetworkPolicy that run a run's workers on a Kubernetes cluster
//! (`kubectl apply -f FILE`). The image is the one `cohort image push REF` put in a registry
//! the cluster pulls from; the controller URL and worker token are the run's own.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::cli::usage;
use crate::config::Config;
use crate::git::RepoPaths;
use crate::run::RunDir;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub command: K8sCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum K8sCommand {
    /// Print (or write with -o) the YAML for a run's workers: a Secret with the worker token,
    /// a Job of N workers (work queue: no completions) and a NetworkPolicy letting them reach
    /// only the controller.
    Manifests(ManifestsArgs),
}

#[derive(clap::Args, Debug)]
pub struct ManifestsArgs {
    /// The run whose controller the workers serve (it must have been started with workers).
    #[arg(long, value_name = "RUN")]
    pub run: String,
    /// How many worker pods at once (each runs one task at a time).
    #[arg(long, value_name = "N")]
    pub parallelism: i32,
    /// The image the pods run: the REF given to `cohort image push` (a digest reference,
    /// HOST/NAME@sha256:…, pins it).
    #[arg(long, value_name = "REF")]
    pub image: Option<String>,
    /// The controller's address as the pods reach it (default: the run's own), https://IP:PORT.
    #[arg(long, value_name = "URL")]
    pub controller: Option<String>,
    /// CPUs per worker, as a Kubernetes quantity (`2`, `500m`): its request and limit.
    #[arg(long, value_name = "CPUS")]
    pub cpus: Option<String>,
    /// Write to FILE (mode 0600: it holds the token) instead of standard output.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: Option<PathBuf>,
}

pub fn run(args: Args, config_path: Option<&Path>) -> Result<u8> {
    match args.command {
        K8sCommand::Manifests(a) => manifests(a, config_path),
    }
}

fn manifests(args: ManifestsArgs, config_path: Option<&Path>) -> Result<u8> {
    if args.parallelism < 1 {
        return Err(usage("--parallelism must be at least 1"));
    }
    let Some(image) = args.image.clone() else {
        return Err(usage(
            "name the image the pods run with --image REF: push it to a registry the cluster \
             pulls from with `cohort image push REF` first",
        ));
    };
    if let Some(c) = &args.cpus {
        let ok = c.strip_suffix('m').unwrap_or(c).parse::<f64>().is_ok_and(|v| v > 0.0);
        if !ok {
            return Err(usage(format!(
                "--cpus {c:?} is not a CPU quantity; write e.g. 2 or 500m"
            )));
        }
    }
    let paths = RepoPaths::discover(&std::env::current_dir()?)?;
    let config = Config::load(config_path, Some(&paths.workdir))?;
    let dir = RunDir::new(&paths, &args.run);
    if args.run.contains('/') || args.run.starts_with('.') || !dir.0.is_dir() {
        return Err(usage(format!(
            "no run {} in {}; `cohort status` shows the newest run",
            args.run,
            paths.workdir.display()
        )));
    }
    let workers = crate::k8s::read_run_workers(&dir.0, &args.run)?;
    let spec = crate::k8s::WorkerJob {
        run: args.run.clone(),
        parallelism: args.parallelism,
        image,
        controller_url: args.controller.clone().unwrap_or(workers.controller.url.clone()),
        token: workers.token,
        memory_bytes: config.container.memory_bytes()?,
        cpus: args.cpus.clone(),
    };
    let yaml = crate::k8s::to_yaml(&crate::k8s::build(&spec)?, &args.run)?;
    match &args.output {
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(yaml.as_bytes())
                .context("cannot write to standard output")?;
        }
        Some(file) => {
            write_private(file, yaml.as_bytes())?;
            eprintln!(
                "cohort: wrote {} (it holds the run's worker token); apply it with `kubectl apply -f {}`",
                file.display(),
                file.display()
            );
        }
    }
    Ok(0)
}

/// The manifests hold the token: mode 0600, written atomically.
fn write_private(file: &Path, data: &[u8]) -> Result<()> {
    crate::remote::write_private(file, data).with_context(|| format!("cannot write {}", file.display()))
}
