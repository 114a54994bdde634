//! Registry credentials from containers' auth files (containers-auth.json(5)), read in order
//! until one has an entry for the registry: `$REGISTRY_AUTH_FILE` or else
//! `$XDG_RUNTIME_DIR/containers/auth.json`, then `$XDG_CONFIG_HOME/containers/auth.json`
//! (`~/.config/…`), then `~/.docker/config.json`. Within a file the most specific key wins:
//! `host/ns/repo`, then `host/ns`, then `host`. Credential helpers are not run.

use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde_json::Value;

use crate::reference::Reference;

/// A user name and password (or token). `Debug` shows neither.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Credentials(<redacted>)")
    }
}

impl Credentials {
    /// The `Authorization: Basic …` value.
    pub fn basic(&self) -> String {
        crate::push::basic_value(&self.username, &self.password)
    }
}

/// The auth files to read, in order, from the environment.
pub fn auth_files() -> Vec<PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    let home = env("HOME");
    let mut out = Vec::new();
    if let Some(f) = env("REGISTRY_AUTH_FILE") {
        out.push(f);
    } else if let Some(d) = env("XDG_RUNTIME_DIR") {
        out.push(d.join("containers/auth.json"));
    }
    if let Some(d) = env("XDG_CONFIG_HOME").or_else(|| home.as_ref().map(|h| h.join(".config"))) {
        out.push(d.join("containers/auth.json"));
    }
    if let Some(h) = &home {
        out.push(h.join(".docker/config.json"));
    }
    out
}

/// The first credentials for `reference` in `files` (missing files are skipped). An
/// unreadable or malformed file is an error naming it, never quoting it.
pub fn credentials_for(files: &[PathBuf], reference: &Reference) -> Result<Option<Credentials>, String> {
    for file in files {
        let text = match std::fs::read(file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("cannot read {}: {e}", file.display())),
        };
        let json: Value = serde_json::from_slice(&text).map_err(|_| {
            format!(
                "{} is not a JSON auth file (see containers-auth.json(5))",
                file.display()
            )
        })?;
        if let Some(c) = lookup(&json, reference, file)? {
            return Ok(Some(c));
        }
    }
    Ok(None)
}

/// `host/a/b` → `["host/a/b", "host/a", "host"]`.
fn keys(reference: &Reference) -> Vec<String> {
    let mut out = Vec::new();
    let mut key = format!("{}/{}", reference.registry, reference.repository);
    loop {
        out.push(key.clone());
        match key.rsplit_once('/') {
            Some((parent, _)) => key = parent.to_owned(),
            None => break,
        }
    }
    out
}

/// A docker config key may be a URL (`https://host/v1/`): its authority is the host.
fn normalize(key: &str) -> &str {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .map(|rest| rest.split('/').next().unwrap_or(rest))
        .unwrap_or(key);
    k.trim_end_matches('/')
}

fn lookup(json: &Value, reference: &Reference, file: &Path) -> Result<Option<Credentials>, String> {
    let Some(auths) = json["auths"].as_object() else {
        return Ok(None);
    };
    for want in keys(reference) {
        let Some((_, entry)) = auths.iter().find(|(k, _)| normalize(k) == want) else {
            continue;
        };
        let Some(auth) = entry["auth"].as_str().filter(|a| !a.is_empty()) else {
            continue;
        };
        let bad = || {
            format!(
                "{}: the entry for {want} is not base64 of user:password",
                file.display()
            )
        };
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|_| bad())?;
        let text = String::from_utf8(decoded).map_err(|_| bad())?;
        let (user, password) = text.split_once(':').ok_or_else(bad)?;
        return Ok(Some(Credentials {
            username: user.to_owned(),
            password: password.to_owned(),
        }));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn most_specific_key_then_next_file() {
        let dir = tempfile::tempdir().unwrap();
        let enc = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let first = dir.path().join("auth.json");
        std::fs::write(
            &first,
            format!(
                r#"{{"auths":{{"reg.test:5000":{{"auth":"{}"}},"reg.test:5000/team":{{"auth":"{}"}}}}}}"#,
                enc("host:pw1"),
                enc("team:pw:2")
            ),
        )
        .unwrap();
        let second = dir.path().join("config.json");
        std::fs::write(
            &second,
            format!(
                r#"{{"auths":{{"https://other.test/v1/":{{"auth":"{}"}}}}}}"#,
                enc("d:pw3")
            ),
        )
        .unwrap();
        let files = vec![dir.path().join("missing.json"), first, second.clone()];
        let team = Reference::parse("reg.test:5000/team/cohort:1").unwrap();
        let c = credentials_for(&files, &team).unwrap().unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("team", "pw:2"));
        let other = Reference::parse("reg.test:5000/solo:1").unwrap();
        assert_eq!(credentials_for(&files, &other).unwrap().unwrap().username, "host");
        let docker = Reference::parse("other.test/x:1").unwrap();
        assert_eq!(credentials_for(&files, &docker).unwrap().unwrap().password, "pw3");
        let none = Reference::parse("nowhere.test/x:1").unwrap();
        assert_eq!(credentials_for(&files, &none).unwrap(), None);
        assert_eq!(format!("{c:?}"), "Credentials(<redacted>)");

        std::fs::write(&second, "not json").unwrap();
        let err = credentials_for(&[second], &none).unwrap_err();
        assert!(err.contains("not a JSON auth file"), "{err}");
    }
}
