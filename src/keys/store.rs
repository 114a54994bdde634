//! The credential store: one file per key, `cohort.NAME`, holding what systemd's
//! `Encrypt` returned (the same text `systemd-creds encrypt` writes), mode 0600.
//! - system: `/etc/credstore.encrypted/` (where `LoadCredentialEncrypted=` looks);
//! - user: `$XDG_CONFIG_HOME/credstore.encrypted/` (default `~/.config/...`).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use cohort_systemd::{EncryptedCredential, KeyBinding, Scope};

use super::{credential_id, validate_name, KeyError};

pub const SYSTEM_DIR: &str = "/etc/credstore.encrypted";

/// The store directory of a scope.
pub fn dir(scope: Scope) -> Result<PathBuf, KeyError> {
    match scope {
        Scope::System => Ok(PathBuf::from(SYSTEM_DIR)),
        Scope::User => {
            let config = std::env::var_os("XDG_CONFIG_HOME")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".config")))
                .ok_or_else(|| KeyError::Io {
                    what: "finding the user credential store: neither XDG_CONFIG_HOME nor HOME is set".into(),
                    source: std::io::ErrorKind::NotFound.into(),
                })?;
            Ok(config.join("credstore.encrypted"))
        }
    }
}

/// The file of key `name` in a scope's store.
pub fn path(scope: Scope, name: &str) -> Result<PathBuf, KeyError> {
    validate_name(name)?;
    Ok(dir(scope)?.join(credential_id(name)))
}

pub fn read(path: &Path) -> Result<EncryptedCredential, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
        what: format!("reading {}", path.display()),
        source,
    })?;
    EncryptedCredential::from_base64(text.trim()).map_err(|source| KeyError::Creds {
        name: path.file_name().unwrap_or_default().to_string_lossy().into(),
        path: path.into(),
        cause: Box::new(source),
    })
}

/// A file in the store, named and staged but not yet in place: `commit` renames it over
/// the final name, dropping it removes it. Lets a caller prove the written bytes decrypt
/// before they replace a working key.
pub struct Staged {
    tmp: Option<PathBuf>,
    path: PathBuf,
}

impl Staged {
    pub fn tmp_path(&self) -> &Path {
        self.tmp.as_deref().expect("staged file already committed")
    }

    pub fn commit(mut self) -> Result<PathBuf, KeyError> {
        let tmp = self.tmp.take().expect("staged file already committed");
        std::fs::rename(&tmp, &self.path).map_err(|source| KeyError::Io {
            what: format!("renaming {} to {}", tmp.display(), self.path.display()),
            source,
        })?;
        if let Some(parent) = self.path.parent() {
            if let Ok(d) = std::fs::File::open(parent) {
                let _ = d.sync_all();
            }
        }
        Ok(self.path.clone())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some(tmp) = &self.tmp {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// Writes a credential next to its final name, 0600 from the start, fsynced.
pub fn stage(path: &Path, cred: &EncryptedCredential) -> Result<Staged, KeyError> {
    let dir = path.parent().expect("store paths have a parent");
    let io = |what: String| move |source| KeyError::Io { what, source };
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    // The store holds only ciphertext, but there is no reason for others to list it.
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let staged = Staged {
        tmp: Some(tmp.clone()),
        path: path.to_path_buf(),
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(format!("creating {}", tmp.display())))?;
    f.write_all(cred.as_base64().as_bytes())
        .and_then(|_| f.write_all(b"\n"))
        .and_then(|_| f.sync_all())
        .map_err(io(format!("writing {}", tmp.display())))?;
    Ok(staged)
}

/// One entry of `cohort keys list`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Listed {
    pub name: String,
    pub scope: &'static str,
    pub path: PathBuf,
    /// What the header says it is sealed with, e.g. `host+tpm2`; `unreadable` if the file
    /// is not a credential.
    pub binding: String,
    pub tpm2: bool,
}

/// The keys in a scope's store (a missing store is empty).
pub fn list(scope: Scope) -> Result<Vec<Listed>, KeyError> {
    let dir = dir(scope)?;
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound) => return Ok(Vec::new()),
        Err(source) => {
            return Err(KeyError::Io {
                what: format!("listing {}", dir.display()),
                source,
            })
        }
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let Some(name) = file.strip_prefix("cohort.") else {
            continue;
        };
        if validate_name(name).is_err() {
            continue;
        }
        let path = entry.path();
        let binding: Option<KeyBinding> = read(&path).ok().and_then(|c| c.binding());
        out.push(Listed {
            name: name.into(),
            scope: super::scope_name(scope),
            binding: binding.map_or_else(|| "unreadable".into(), |b| b.to_string()),
            tpm2: binding.is_some_and(KeyBinding::uses_tpm2),
            path,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Removes a key's file; `Ok(false)` when there was none.
pub fn remove(path: &Path) -> Result<bool, KeyError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(KeyError::Io {
            what: format!("removing {}", path.display()),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    // A real credential's shape: the 16-byte host-key id, then opaque bytes.
    fn fake_blob() -> EncryptedCredential {
        use base64::Engine as _;
        let mut raw = vec![
            0x5a, 0x1c, 0x6a, 0x86, 0xdf, 0x9d, 0x40, 0x96, 0xb1, 0xd5, 0xa6, 0x5e, 0x08, 0x62, 0xf1, 0x9a,
        ];
        raw.extend([7u8; 64]);
        EncryptedCredential::from_base64(&base64::engine::general_purpose::STANDARD.encode(raw)).unwrap()
    }

    #[test]
    fn staged_files_are_private_and_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store/cohort.k");
        {
            let staged = stage(&path, &fake_blob()).unwrap();
            assert_eq!(std::fs::metadata(staged.tmp_path()).unwrap().mode() & 0o777, 0o600);
            assert!(!path.exists(), "nothing at the final name before commit");
        }
        // Dropped without commit: no trace left.
        assert_eq!(std::fs::read_dir(dir.path().join("store")).unwrap().count(), 0);
        stage(&path, &fake_blob()).unwrap().commit().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(read(&path).unwrap().binding(), Some(KeyBinding::Host));
        assert!(remove(&path).unwrap());
        assert!(!remove(&path).unwrap());
    }
}
