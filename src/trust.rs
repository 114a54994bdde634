//! Which settings files the user trusted, as `direnv allow` and `mise trust` do: the
//! SHA-256 of a file's exact bytes under its canonical path. A file whose bytes changed
//! is untrusted again, whoever changed it (a pull from origin, an agent's merged task).
//!
//! The store is a small TOML file written whole, through a temporary file and a rename:
//! - user scope: `$XDG_STATE_HOME/cohort/trusted.toml` (or `~/.local/state/cohort/…`),
//!   mode 0600; the user's own runs and the user service read it;
//! - system scope: `/etc/cohort/trusted.toml`, beside the system service's own settings,
//!   written by root only (`sudo cohort trust --scope system FILE`), mode 0644 so the
//!   service's user can read it but not add to it. A system store that is not root's, or
//!   that others can write, is refused rather than believed.
//!
//! Why not the system service's state directory (/var/lib/cohort): systemd makes it only at
//! the service's first start, and with `DynamicUser=` it hands a directory it adopts, content
//! and all, to the service's user (the repository's owner). A trust store there would be
//! missing before the install, or writable by the very user whose repository it judges.
//! /etc/cohort exists whenever root makes it, and `ProtectSystem=strict` keeps it read-only
//! to the service.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::service::ServiceScope;

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("cannot read the trust store {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the trust store {path} is damaged ({message}); remove it and trust your files again")]
    Parse { path: PathBuf, message: String },
    #[error("cannot write the trust store {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error(
        "the system trust store {path} must belong to root and be writable by root only; \
         fix it with `sudo chown root:root {path} && sudo chmod 644 {path}`"
    )]
    Unsafe { path: PathBuf },
}

/// One trusted file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Canonical (absolute, symlinks resolved) path.
    pub path: PathBuf,
    /// Hex SHA-256 of the file's exact bytes.
    pub sha256: String,
    /// When it was trusted (RFC 3339, UTC).
    pub trusted_at: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreFile {
    #[serde(default, rename = "file")]
    files: Vec<Entry>,
}

/// What the store says about a file's current content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Trusted,
    /// Trusted once, with other content.
    Changed,
    Unknown,
}

#[derive(Debug)]
pub struct TrustStore {
    path: PathBuf,
    scope: ServiceScope,
    entries: Vec<Entry>,
}

/// The system service's trust store (see the module's comment for why here).
pub const SYSTEM_STORE: &str = "/etc/cohort/trusted.toml";

const HEADER: &str = "# Settings files trusted with `cohort trust`: the SHA-256 of each file's exact content.\n\
                      # A file whose content no longer matches is untrusted again. Change this with `cohort trust`.\n\n";

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let d = cohort_oci::sha256_digest(bytes);
    d.strip_prefix("sha256:").unwrap_or(&d).to_string()
}

impl TrustStore {
    /// Where the store of `scope` lives. User scope: the user's state directory, which is
    /// also the user service's, so `cohort trust` and `cohort serve` agree on it.
    pub fn default_path(scope: ServiceScope) -> Option<PathBuf> {
        match scope {
            ServiceScope::User => crate::service::state_dir(scope).map(|d| d.join("trusted.toml")),
            ServiceScope::System => Some(PathBuf::from(SYSTEM_STORE)),
        }
    }

    /// Reads the store at `path`; a missing file is an empty store.
    pub fn open(path: &Path, scope: ServiceScope) -> Result<TrustStore, TrustError> {
        let read_err = |source| TrustError::Read {
            path: path.to_path_buf(),
            source,
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(read_err(e)),
        };
        if scope == ServiceScope::System && !text.is_empty() {
            // The service's own user must not be able to trust things for itself.
            let meta = std::fs::metadata(path).map_err(read_err)?;
            if meta.uid() != 0 || meta.mode() & 0o022 != 0 {
                return Err(TrustError::Unsafe {
                    path: path.to_path_buf(),
                });
            }
        }
        let file: StoreFile = toml::from_str(&text).map_err(|e| TrustError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Ok(TrustStore {
            path: path.to_path_buf(),
            scope,
            entries: file.files,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Whether the file at `canonical` with content hash `sha256` is trusted.
    pub fn verdict(&self, canonical: &Path, sha256: &str) -> Verdict {
        match self.entries.iter().find(|e| e.path == canonical) {
            Some(e) if e.sha256 == sha256 => Verdict::Trusted,
            Some(_) => Verdict::Changed,
            None => Verdict::Unknown,
        }
    }

    /// Trusts this content of `canonical`, replacing what was trusted for it before.
    pub fn trust(&mut self, canonical: &Path, sha256: &str) {
        self.entries.retain(|e| e.path != canonical);
        self.entries.push(Entry {
            path: canonical.to_path_buf(),
            sha256: sha256.to_string(),
            trusted_at: crate::run::state::now(),
        });
    }

    /// Takes back the trust in `canonical`; false if it was not trusted.
    pub fn revoke(&mut self, canonical: &Path) -> bool {
        let before = self.entries.len();
        self.entries.retain(|e| e.path != canonical);
        self.entries.len() != before
    }

    /// Writes the store whole: a temporary file in the same directory, fsynced, renamed
    /// over the old one, so a crash leaves either the old store or the new one.
    pub fn save(&self) -> Result<(), TrustError> {
        let err = |source| TrustError::Write {
            path: self.path.clone(),
            source,
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        // System: hashes and paths only; the service's user must read it, only root write it.
        let (dir_mode, mode) = match self.scope {
            ServiceScope::User => (0o700, 0o600),
            ServiceScope::System => (0o755, 0o644),
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(dir_mode)
            .create(dir)
            .map_err(err)?;
        let body = toml::to_string(&StoreFile {
            files: self.entries.clone(),
        })
        .map_err(|e| err(std::io::Error::other(e)))?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".trusted.toml.")
            .tempfile_in(dir)
            .map_err(err)?;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(err)?;
        tmp.write_all(HEADER.as_bytes()).map_err(err)?;
        tmp.write_all(body.as_bytes()).map_err(err)?;
        tmp.as_file().sync_all().map_err(err)?;
        tmp.persist(&self.path).map_err(|e| err(e.error))?;
        // The rename itself is durable once the directory is.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trust_change_revoke_and_the_file_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/cohort/trusted.toml");
        let mut store = TrustStore::open(&path, ServiceScope::User).unwrap();
        assert!(store.entries().is_empty(), "a missing store is empty");
        let file = Path::new("/repo/cohort.toml");
        let a = sha256_hex(b"[agent]\nkind = \"command\"\n");
        assert_eq!(a.len(), 64);
        assert_eq!(store.verdict(file, &a), Verdict::Unknown);
        store.trust(file, &a);
        store.trust(Path::new("/other/cohort.toml"), &a);
        store.save().unwrap();

        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        let store = TrustStore::open(&path, ServiceScope::User).unwrap();
        assert_eq!(store.verdict(file, &a), Verdict::Trusted);
        assert_eq!(store.verdict(file, &sha256_hex(b"other")), Verdict::Changed);

        // Trusting new content replaces the old hash; revoking forgets the path.
        let mut store = store;
        store.trust(file, "b");
        assert_eq!(store.entries().len(), 2);
        assert_eq!(store.verdict(file, &a), Verdict::Changed);
        assert!(store.revoke(file));
        assert!(!store.revoke(file));
        store.save().unwrap();
        let store = TrustStore::open(&path, ServiceScope::User).unwrap();
        assert_eq!(store.verdict(file, "b"), Verdict::Unknown);
        assert_eq!(store.entries().len(), 1);
        // No temporary files are left behind.
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().flatten().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn a_damaged_store_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trusted.toml");
        std::fs::write(&path, "[[file]]\npath = 3\n").unwrap();
        let e = TrustStore::open(&path, ServiceScope::User).unwrap_err().to_string();
        assert!(e.contains("trusted.toml") && e.contains("damaged"), "{e}");
    }

    #[test]
    fn a_system_store_others_can_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trusted.toml");
        std::fs::write(&path, "").unwrap();
        // Empty: nothing is trusted, so nothing to check.
        assert!(TrustStore::open(&path, ServiceScope::System).is_ok());
        std::fs::write(&path, "[[file]]\npath = \"/a\"\nsha256 = \"x\"\ntrusted_at = \"t\"\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(matches!(
            TrustStore::open(&path, ServiceScope::System),
            Err(TrustError::Unsafe { .. })
        ));
    }
}
