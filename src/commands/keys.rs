//! `cohort keys place | list | check | remove`: API keys in systemd's encrypted credential
//! store (TPM2-bound where there is a TPM) or in the desktop keyring. See KEYS_GUIDE.md.

use std::io::{IsTerminal, Read, Write};

use anyhow::{Context, Result};
use cohort_systemd::{Credentials, CredsError, EncryptRequest, Scope, WithKey};

use crate::cli::usage;
use crate::keys::{self, store, KeyError};
use crate::secret::Secret;

pub use crate::keys::explain_key;

#[derive(clap::Args, Debug)]
#[command(
    after_help = "The secret is read from a hidden prompt, or from stdin when stdin is not a terminal; \
                        never from the command line. KEYS_GUIDE.md explains placing, rotating and removing \
                        keys, and what TPM binding protects against."
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Sub,
}

#[derive(clap::Subcommand, Debug)]
pub enum Sub {
    /// Encrypt a key into the credential store (or the desktop keyring) and prove it decrypts.
    Place(PlaceArgs),
    /// List the keys in both credential stores, with what each is sealed with.
    List(ListArgs),
    /// Check that a key can be found and decrypted here, and say where it comes from.
    Check(CheckArgs),
    /// Remove a key from a credential store (or the desktop keyring).
    Remove(RemoveArgs),
}

#[derive(clap::Args, Debug)]
pub struct PlaceArgs {
    /// The key's name, e.g. openai_api_key (`[agent] key` in cohort.toml).
    pub name: String,
    /// system: /etc/credstore.encrypted (root; for the system service). user: ~/.config/credstore.encrypted.
    /// Default: system for root, user otherwise.
    #[arg(long, value_enum)]
    pub scope: Option<ScopeArg>,
    /// auto: bind to the TPM2 when there is one; require: fail without one; off: the host key only.
    #[arg(long, value_enum, default_value = "auto")]
    pub tpm2: Tpm2Arg,
    /// Store it in the desktop keyring instead (Secret Service, or the kernel keyring).
    #[arg(long, conflicts_with_all = ["scope", "tpm2"])]
    pub keyring: bool,
}

#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// The key's name (default: `[agent] key`, or openai_api_key).
    pub name: Option<String>,
    /// Check this scope's credential file only, instead of the run-time lookup order
    /// (environment, $CREDENTIALS_DIRECTORY, credential store, keyring).
    #[arg(long, value_enum)]
    pub scope: Option<ScopeArg>,
}

#[derive(clap::Args, Debug)]
pub struct RemoveArgs {
    pub name: String,
    #[arg(long, value_enum)]
    pub scope: Option<ScopeArg>,
    /// Remove it from the desktop keyring instead.
    #[arg(long, conflicts_with = "scope")]
    pub keyring: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ScopeArg {
    System,
    User,
}

impl ScopeArg {
    fn scope(self) -> Scope {
        match self {
            ScopeArg::System => Scope::System,
            ScopeArg::User => Scope::User,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Tpm2Arg {
    Auto,
    Require,
    Off,
}

pub async fn run(args: Args, config: Option<&std::path::Path>) -> Result<u8> {
    match args.command {
        Sub::Place(a) => place(a).await,
        Sub::List(a) => list(a),
        Sub::Check(a) => check(a, config).await,
        Sub::Remove(a) => remove(a).await,
    }
}

fn scope_of(arg: Option<ScopeArg>) -> Scope {
    arg.map_or_else(keys::default_scope, ScopeArg::scope)
}

async fn place(a: PlaceArgs) -> Result<u8> {
    keys::validate_name(&a.name).map_err(|e| usage(e.to_string()))?;
    let secret = read_secret(&a.name)?;
    if a.keyring {
        let store = keys::keyring::set(&a.name, &secret).await?;
        let back = keys::keyring::get(&a.name).await?;
        if back.as_ref().map(|(s, _)| s) != Some(&secret) {
            anyhow::bail!("the {store} did not give the key back after storing it");
        }
        eprintln!("placed {} in the {store}; it reads back", a.name);
        return Ok(0);
    }
    let scope = scope_of(a.scope);
    if scope == Scope::System && !nix::unistd::geteuid().is_root() {
        return Err(usage(
            "--scope system writes /etc/credstore.encrypted and needs root; run it with sudo, or use --scope user",
        ));
    }
    if a.tpm2 == Tpm2Arg::Require && !std::path::Path::new("/dev/tpmrm0").exists() {
        return Err(usage(
            "--tpm2 require: this machine has no TPM2 (/dev/tpmrm0 is missing); use --tpm2 auto or off",
        ));
    }
    let path = store::path(scope, &a.name)?;
    let id = keys::credential_id(&a.name);
    let creds = Credentials::new();
    let cred = match a.tpm2 {
        // systemd 257 cannot be told to use the TPM over Varlink, so `require` lets it choose
        // and then checks the credential's header.
        Tpm2Arg::Require => {
            creds
                .encrypt_require_tpm2(Some(&id), scope, secret.expose().as_bytes())
                .await
        }
        Tpm2Arg::Auto | Tpm2Arg::Off => {
            let req = EncryptRequest {
                name: Some(&id),
                scope,
                with_key: (a.tpm2 == Tpm2Arg::Off).then_some(WithKey::Host),
                not_after_usec: None,
            };
            creds.encrypt(&req, secret.expose().as_bytes()).await
        }
    }
    .map_err(|e| explain(e, scope))?;
    let binding = cred
        .binding()
        .map_or_else(|| "an unknown key".into(), |b| b.to_string());
    let staged = store::stage(&path, &cred)?;
    // The round trip reads the bytes actually written, before they replace anything.
    let back = keys::decrypt_file(&creds, staged.tmp_path(), &a.name, scope)
        .await
        .context("the new credential does not decrypt; nothing was replaced")?;
    if back != secret {
        anyhow::bail!("the new credential decrypts to something else; nothing was replaced");
    }
    let path = staged.commit()?;
    eprintln!(
        "placed {} ({} scope, sealed with the {binding}) at {}; decrypt round trip ok",
        a.name,
        keys::scope_name(scope),
        path.display()
    );
    Ok(0)
}

fn list(a: ListArgs) -> Result<u8> {
    let mut all = Vec::new();
    for scope in [Scope::System, Scope::User] {
        match store::list(scope) {
            Ok(l) => all.extend(l),
            // The user store of a service user without a home is simply absent.
            Err(KeyError::Io { .. }) if scope == Scope::User => {}
            Err(e) => return Err(e.into()),
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(0);
    }
    if all.is_empty() {
        eprintln!("no keys in the credential stores; place one with `cohort keys place NAME`");
    }
    for k in &all {
        println!("{:<24} {:<7} {:<28} {}", k.name, k.scope, k.binding, k.path.display());
    }
    Ok(0)
}

async fn check(a: CheckArgs, config: Option<&std::path::Path>) -> Result<u8> {
    let name = match a.name {
        Some(n) => n,
        None => configured_key_name(config)?,
    };
    keys::validate_name(&name).map_err(|e| usage(e.to_string()))?;
    if let Some(scope) = a.scope.map(ScopeArg::scope) {
        let path = store::path(scope, &name)?;
        if !path.exists() {
            eprintln!(
                "{name}: no {} credential at {}",
                keys::scope_name(scope),
                path.display()
            );
            return Ok(1);
        }
        let binding = store::read(&path)?
            .binding()
            .map_or("unknown".into(), |b| b.to_string());
        keys::decrypt_file(&Credentials::new(), &path, &name, scope)
            .await
            .map_err(|e| anyhow::anyhow!(explain_key(e)))?;
        println!(
            "{name}: ok, decrypts here ({} scope, sealed with the {binding})",
            keys::scope_name(scope)
        );
        return Ok(0);
    }
    match keys::lookup(&name).await.map_err(|e| anyhow::anyhow!(explain_key(e)))? {
        Some((_, source)) => {
            println!("{name}: ok, from the {source}");
            Ok(0)
        }
        None => {
            eprintln!("{}", keys::missing_help(&name));
            Ok(1)
        }
    }
}

async fn remove(a: RemoveArgs) -> Result<u8> {
    keys::validate_name(&a.name).map_err(|e| usage(e.to_string()))?;
    let removed = if a.keyring {
        keys::keyring::remove(&a.name).await?
    } else {
        store::remove(&store::path(scope_of(a.scope), &a.name)?)?
    };
    if removed {
        eprintln!("removed {}", a.name);
        Ok(0)
    } else {
        eprintln!("{}: there was no such key", a.name);
        Ok(1)
    }
}

/// The key name the agent uses: `[agent] key`, or the default.
pub fn configured_key_name(config: Option<&std::path::Path>) -> Result<String> {
    let root = crate::git::RepoPaths::discover(&std::env::current_dir()?)
        .ok()
        .map(|p| p.workdir);
    let config = crate::config::Config::load_lenient(config, root.as_deref())?;
    Ok(config.agent.key.unwrap_or_else(|| keys::DEFAULT_KEY.into()))
}

/// Reads the secret from a hidden prompt, or all of stdin when it is not a terminal.
fn read_secret(name: &str) -> Result<Secret> {
    let stdin = std::io::stdin();
    let text = if stdin.is_terminal() {
        let mut err = std::io::stderr();
        write!(err, "{name} (input hidden): ")?;
        err.flush()?;
        let line = read_hidden_line()?;
        writeln!(err)?;
        line
    } else {
        let mut s = String::new();
        stdin
            .lock()
            .read_to_string(&mut s)
            .context("reading the key from stdin")?;
        s
    };
    let text = text.trim_end_matches(['\n', '\r']).to_string();
    if text.is_empty() {
        return Err(usage("the key is empty; nothing was placed"));
    }
    Ok(Secret::new(text))
}

/// One line from the terminal with echo off, restored even on error.
fn read_hidden_line() -> Result<String> {
    use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
    let fd = std::io::stdin();
    let old = tcgetattr(&fd).context("reading the terminal's settings")?;
    let mut quiet = old.clone();
    quiet.local_flags.remove(LocalFlags::ECHO);
    quiet.local_flags.insert(LocalFlags::ECHONL);
    tcsetattr(&fd, SetArg::TCSANOW, &quiet).context("turning off echo")?;
    let mut line = String::new();
    let r = std::io::stdin().read_line(&mut line);
    let _ = tcsetattr(&fd, SetArg::TCSANOW, &old);
    r.context("reading the key")?;
    Ok(line)
}

fn explain(e: CredsError, scope: Scope) -> anyhow::Error {
    match e {
        CredsError::PermissionDenied { .. } if scope == Scope::System => {
            usage(format!("{e}; the system scope needs root"))
        }
        CredsError::ServiceUnavailable { .. } | CredsError::Unsupported { .. } | CredsError::TpmNotUsed { .. } => {
            usage(e.to_string())
        }
        other => other.into(),
    }
}
