//! `cohort trust [FILE] [--list | --revoke] [--scope user|system]`: trust a settings
//! file's exact content, so its sensitive keys are honoured (as `direnv allow` and
//! `mise trust` do). See `crate::trust` for the store and `crate::config` for the keys.

use std::path::PathBuf;

use anyhow::Result;

use crate::cli::usage;
use crate::config::{sensitive_settings, SENSITIVE};
use crate::service::ServiceScope;
use crate::trust::{sha256_hex, TrustStore, Verdict};

#[derive(clap::Args, Debug)]
#[command(after_help = "\
A repository's cohort.toml comes from origin or from an agent's merged change, so cohort takes \
the settings that run programs, choose where the API key goes or widen the sandbox from it only \
once you trusted its exact content:
  [agent] kind, command, codex_path, base_url; [planner] base_url;
  [container] mounts, network, allow; [image] programs, base.
Its other settings need no trust. Trust is the file's SHA-256 under its path: any change makes it \
untrusted again, and cohort says so (exit 2) naming the keys and this command.

Where trust is kept:
  user:   $XDG_STATE_HOME/cohort/trusted.toml (~/.local/state/cohort/trusted.toml), mode 0600; your \
own runs and your user service (`cohort service install`) read it.
  system: /etc/cohort/trusted.toml, beside the system service's own settings \
(/etc/cohort/config.toml, which needs no trust); root writes it \
(`sudo cohort trust --scope system /srv/repo/cohort.toml`), the service only reads it.")]
pub struct Args {
    /// The settings file (default: cohort.toml at the repository root).
    pub file: Option<PathBuf>,
    /// List the trusted files, each as trusted, changed (since trusted) or missing.
    #[arg(long, conflicts_with_all = ["file", "revoke"])]
    pub list: bool,
    /// Take back the trust in FILE.
    #[arg(long, visible_alias = "remove")]
    pub revoke: bool,
    /// Whose trust: your own (user), or the system service's (system, needs root).
    #[arg(long, value_enum, default_value = "user")]
    pub scope: ServiceScope,
}

pub fn run(args: Args) -> Result<u8> {
    let store_path = TrustStore::default_path(args.scope)
        .ok_or_else(|| usage("no state directory for the trust store: set HOME or XDG_STATE_HOME"))?;
    if args.list {
        return list(&TrustStore::open(&store_path, args.scope)?);
    }
    if args.scope == ServiceScope::System && !nix::unistd::geteuid().is_root() {
        return Err(usage(
            "--scope system changes what the system service trusts and needs root (sudo)",
        ));
    }
    let file = match &args.file {
        Some(f) => f.clone(),
        None => crate::git::RepoPaths::discover(&std::env::current_dir()?)
            .map_err(|e| usage(format!("no FILE given and no repository here: {e:#}")))?
            .workdir
            .join("cohort.toml"),
    };
    let mut store = TrustStore::open(&store_path, args.scope)?;
    if args.revoke {
        let canonical = std::fs::canonicalize(&file).unwrap_or_else(|_| std::path::absolute(&file).unwrap_or(file));
        if store.revoke(&canonical) {
            store.save()?;
            println!("{} is no longer trusted", canonical.display());
        } else {
            println!("{} was not trusted", canonical.display());
        }
        return Ok(0);
    }
    if !file.is_file() {
        return Err(usage(format!("{} does not exist; nothing to trust", file.display())));
    }
    let canonical = std::fs::canonicalize(&file)?;
    // The bytes shown are the bytes hashed: read once.
    let (bytes, settings) = sensitive_settings(&canonical)?;
    let sha = sha256_hex(&bytes);
    if store.verdict(&canonical, &sha) == Verdict::Trusted {
        println!("{} is trusted already (sha256 {sha})", canonical.display());
        return Ok(0);
    }
    println!("trusting {} (sha256 {sha})", canonical.display());
    if settings.is_empty() {
        println!(
            "it sets none of the settings that need trust ({} in all); trusting its content anyway",
            SENSITIVE.len()
        );
    } else {
        println!("settings that run programs, choose where the key goes or widen the sandbox:");
        for line in &settings {
            println!("  {line}");
        }
    }
    store.trust(&canonical, &sha);
    store.save()?;
    println!(
        "recorded in {}; once the file changes, cohort refuses it until you trust it again",
        store.path().display()
    );
    Ok(0)
}

fn list(store: &TrustStore) -> Result<u8> {
    if store.entries().is_empty() {
        println!("no trusted files in {}", store.path().display());
        return Ok(0);
    }
    for e in store.entries() {
        let state = match std::fs::read(&e.path) {
            Ok(bytes) if sha256_hex(&bytes) == e.sha256 => "trusted",
            Ok(_) => "changed",
            Err(_) => "missing",
        };
        println!("{state:8} {}  (since {})", e.path.display(), e.trusted_at);
    }
    Ok(0)
}
