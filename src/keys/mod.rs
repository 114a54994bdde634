//! API keys: where they are kept, and how the one an agent needs is found at run time.
//!
//! A key has a NAME (`[agent] key`, default `openai_api_key`). It can live in:
//! - the environment, as the NAME in upper case (`OPENAI_API_KEY`);
//! - `$CREDENTIALS_DIRECTORY/cohort.NAME`, where systemd puts a credential it decrypted for
//!   a service (`LoadCredentialEncrypted=`);
//! - the credential store, `cohort.NAME` encrypted by systemd (TPM2-bound where there is
//!   a TPM), decrypted in-process over Varlink;
//! - the desktop keyring (Secret Service, or the kernel keyring without a session bus).
//!
//! [`lookup`] tries them in that order. A credential that exists but cannot be
//! decrypted is an error, never a silent fall-through: a credential file copied from
//! another machine must be reported as such.

pub mod keyring;
pub mod store;

use std::path::{Path, PathBuf};

use cohort_systemd::{Credentials, CredsError, Scope};

use crate::secret::Secret;

/// The credential name used when `[agent] key` is not set.
pub const DEFAULT_KEY: &str = "openai_api_key";

/// An https token for origin's host, used as git's credential there.
pub const GIT_TOKEN: &str = "git_token";

/// An ssh deploy key for origin, handed to ssh by the service as an identity file.
pub const GIT_SSH_KEY: &str = "git_ssh_key";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{0:?} is not a valid key name: use 1-64 of a-z, 0-9, '_', '-' (e.g. openai_api_key)")]
    BadName(String),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("key {name} in {path}: {cause}")]
    Creds {
        name: String,
        path: PathBuf,
        cause: Box<CredsError>,
    },
    #[error("the desktop keyring: {0}")]
    Keyring(String),
}

/// The stolen-file case deserves its own words: it is the one TPM binding exists for.
pub fn explain_key(e: KeyError) -> String {
    match &e {
        KeyError::Creds { cause, path, name } if matches!(**cause, CredsError::NotThisMachine { .. }) => format!(
            "key {name}: {} cannot be decrypted on this machine: a stolen file on another machine, \
             or this machine's TPM was cleared. Place the key again here: cohort keys place {name} \
             (KEYS_GUIDE.md, \"After a TPM clear\")",
            path.display()
        ),
        _ => e.to_string(),
    }
}

/// Checks a key name: it becomes part of a file name, a systemd credential ID and an
/// environment variable, so keep it to a safe alphabet.
pub fn validate_name(name: &str) -> Result<(), KeyError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(KeyError::BadName(name.into()))
    }
}

/// The systemd credential ID (and file name) of a key: `cohort.NAME`. systemd seals this
/// name into the credential and refuses it under another one.
pub fn credential_id(name: &str) -> String {
    format!("cohort.{name}")
}

/// The environment variable that overrides a key: `openai_api_key` → `OPENAI_API_KEY`.
pub fn env_var(name: &str) -> String {
    name.to_ascii_uppercase().replace('-', "_")
}

/// The scope a process uses by default: root uses the system scope, anyone else their own.
pub fn default_scope() -> Scope {
    if nix::unistd::geteuid().is_root() {
        Scope::System
    } else {
        Scope::User
    }
}

pub fn scope_name(scope: Scope) -> &'static str {
    match scope {
        Scope::System => "system",
        Scope::User => "user",
    }
}

/// Where a key was found (printed, never the value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Env(String),
    CredentialsDirectory(PathBuf),
    CredStore { scope: Scope, path: PathBuf },
    Keyring(String),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Env(v) => write!(f, "environment variable {v}"),
            Source::CredentialsDirectory(p) => write!(f, "systemd credential {}", p.display()),
            Source::CredStore { scope, path } => {
                write!(f, "{} credential store ({})", scope_name(*scope), path.display())
            }
            Source::Keyring(store) => write!(f, "desktop keyring ({store})"),
        }
    }
}

/// Finds key `name` (see the module docs for the order). `Ok(None)`: it is nowhere.
pub async fn lookup(name: &str) -> Result<Option<(Secret, Source)>, KeyError> {
    validate_name(name)?;
    let var = env_var(name);
    if let Some(v) = std::env::var(&var).ok().filter(|v| !v.is_empty()) {
        return Ok(Some((Secret::new(v), Source::Env(var))));
    }
    lookup_stored(name).await
}

/// Like [`lookup`], without the environment: for keys whose variable name (`GIT_TOKEN`)
/// is too likely to be set for some other purpose or host.
pub async fn lookup_stored(name: &str) -> Result<Option<(Secret, Source)>, KeyError> {
    validate_name(name)?;
    if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
        let path = Path::new(&dir).join(credential_id(name));
        match std::fs::read(&path) {
            Ok(bytes) => {
                return Ok(Some((
                    secret_from_bytes(bytes, &path)?,
                    Source::CredentialsDirectory(path),
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(KeyError::Io {
                    what: format!("reading {}", path.display()),
                    source,
                })
            }
        }
    }
    let scope = default_scope();
    let path = store::path(scope, name)?;
    if path.exists() {
        let secret = decrypt_file(&Credentials::new(), &path, name, scope).await?;
        return Ok(Some((secret, Source::CredStore { scope, path })));
    }
    if scope == Scope::User {
        if let Some((secret, store)) = keyring::get(name).await? {
            return Ok(Some((secret, Source::Keyring(store))));
        }
    }
    Ok(None)
}

/// Reads and decrypts a credential file of the store.
pub async fn decrypt_file(creds: &Credentials, path: &Path, name: &str, scope: Scope) -> Result<Secret, KeyError> {
    let cred = store::read(path)?;
    let id = credential_id(name);
    let secret = creds
        .decrypt(&cred, Some(&id), scope)
        .await
        .map_err(|source| KeyError::Creds {
            name: name.into(),
            path: path.into(),
            cause: Box::new(source),
        })?;
    secret_from_bytes(secret.expose().to_vec(), path)
}

/// A key is text; a trailing newline (from `echo key > file`) is not part of it.
fn secret_from_bytes(mut bytes: Vec<u8>, path: &Path) -> Result<Secret, KeyError> {
    while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        bytes.pop();
    }
    let text = String::from_utf8(bytes).map_err(|_| KeyError::Io {
        what: format!("{} is not text", path.display()),
        source: std::io::ErrorKind::InvalidData.into(),
    })?;
    Ok(Secret::new(text))
}

/// Writes the deploy key where ssh can read it: `$RUNTIME_DIRECTORY/git_ssh_key`, mode
/// 0600, in the directory systemd gives the service and removes when it stops. Nowhere
/// else: without that directory (a `serve` started by hand) this is an error.
pub fn identity_file(key: &Secret) -> Result<PathBuf, KeyError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = std::env::var_os("RUNTIME_DIRECTORY")
        .filter(|d| !d.is_empty())
        .ok_or_else(|| KeyError::Io {
            what: "using the deploy key git_ssh_key: there is no $RUNTIME_DIRECTORY to keep it in (it is only \
                   used by the service, `cohort service install`)"
                .into(),
            source: std::io::ErrorKind::NotFound.into(),
        })?;
    // systemd may give several directories, separated by ':'; the first is cohort's.
    let dir = PathBuf::from(std::ffi::OsString::from(
        dir.to_string_lossy().split(':').next().unwrap_or_default(),
    ));
    let path = dir.join(GIT_SSH_KEY);
    let tmp = dir.join(format!(".{GIT_SSH_KEY}.{}", std::process::id()));
    let io = |what: &str, source| KeyError::Io {
        what: format!("{what} {}", tmp.display()),
        source,
    };
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| io("creating", e))?;
    // ssh wants the key's last line ended; the store drops trailing newlines.
    f.write_all(key.expose().as_bytes())
        .and_then(|_| f.write_all(b"\n"))
        .map_err(|e| io("writing", e))?;
    std::fs::rename(&tmp, &path).map_err(|e| io("renaming", e))?;
    Ok(path)
}

/// What to tell a user who has no key at all.
pub fn missing_help(name: &str) -> String {
    format!(
        "no API key {name}: set {}, or place it with `cohort keys place {name}` (see KEYS_GUIDE.md)",
        env_var(name)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["openai_api_key", "a", "key-2"] {
            validate_name(good).unwrap();
        }
        for bad in ["", "A", "../x", "a/b", "-x", "a.b", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
        assert_eq!(env_var("openai_api_key"), "OPENAI_API_KEY");
        assert_eq!(env_var("my-key"), "MY_KEY");
        assert_eq!(credential_id("openai_api_key"), "cohort.openai_api_key");
    }

    #[test]
    fn trailing_newline_is_not_part_of_the_key() {
        let s = secret_from_bytes(b"sk-abc\n".to_vec(), Path::new("x")).unwrap();
        assert_eq!(s.expose(), "sk-abc");
        assert!(secret_from_bytes(vec![0xff, 0xfe], Path::new("x")).is_err());
    }
}
