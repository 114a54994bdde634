//! Checking an ssh host key against OpenSSH known_hosts files (sshd(8) "SSH_KNOWN_HOSTS
//! FILE FORMAT"): plain and hashed (`|1|salt|hmac`) names, `[host]:port` for other ports
//! than 22, patterns with `*`, `?` and `!`, and `@revoked` lines. `@cert-authority` lines
//! are skipped (host certificates are checked by their plain key like any other).
//!
//! Our own reader rather than russh's: its reader stops at the first line it cannot parse
//! (a key type it lacks, a marker, tabs) and knows no `@revoked` nor patterns.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use russh::keys::{HashAlg, PublicKey};

/// What the files say about a host's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A line names this host with this key.
    Known,
    /// Lines name this host with other keys of the same type: `(file, line)` of each.
    Changed(Vec<(PathBuf, usize)>),
    /// An `@revoked` line names this key.
    Revoked(PathBuf, usize),
    /// No line names this host with a key of this type.
    Unknown,
}

/// `pattern` (with `*` and `?`) matches `name`, case-insensitively as ssh does for hosts.
fn glob(pattern: &[u8], name: &[u8]) -> bool {
    match (pattern.first(), name.first()) {
        (None, None) => true,
        (Some(b'*'), _) => glob(&pattern[1..], name) || (!name.is_empty() && glob(pattern, &name[1..])),
        (Some(b'?'), Some(_)) => glob(&pattern[1..], &name[1..]),
        (Some(p), Some(n)) if p.eq_ignore_ascii_case(n) => glob(&pattern[1..], &name[1..]),
        _ => false,
    }
}

/// `|1|base64(salt)|base64(hmac_sha1(salt, name))` names `name`.
fn hashed_matches(entry: &str, name: &str) -> bool {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut parts = entry.trim_start_matches("|1|").split('|');
    let (Some(Ok(salt)), Some(Ok(mac))) = (parts.next().map(|s| b64.decode(s)), parts.next().map(|s| b64.decode(s)))
    else {
        return false;
    };
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, &salt);
    aws_lc_rs::hmac::verify(&key, name.as_bytes(), &mac).is_ok()
}

/// A line's comma-separated host patterns name `name` (`host` or `[host]:port`): one
/// positive match and no negated one.
fn names(patterns: &str, name: &str) -> bool {
    let mut hit = false;
    for p in patterns.split(',') {
        if p.starts_with("|1|") {
            hit |= hashed_matches(p, name);
        } else if let Some(neg) = p.strip_prefix('!') {
            if glob(neg.as_bytes(), name.as_bytes()) {
                return false;
            }
        } else if glob(p.as_bytes(), name.as_bytes()) {
            hit = true;
        }
    }
    hit
}

/// Check `key` for `name` (`host`, or `[host]:port` when the port is not 22) against the
/// files in order; a missing file counts as empty.
pub fn check(files: &[PathBuf], name: &str, key: &PublicKey) -> Verdict {
    let mut changed = Vec::new();
    let mut known = false;
    for file in files {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.split_whitespace();
            let mut first = fields.next().unwrap_or("");
            let marker = first.strip_prefix('@').map(str::to_owned);
            if marker.is_some() {
                first = fields.next().unwrap_or("");
            }
            let (Some(_kind), Some(b64)) = (fields.next(), fields.next()) else {
                continue;
            };
            if !names(first, name) {
                continue;
            }
            // A line with a key type this client cannot parse says nothing about this key.
            let Ok(recorded) = russh::keys::parse_public_key_base64(b64) else {
                continue;
            };
            let same = recorded.key_data() == key.key_data();
            match marker.as_deref() {
                Some("revoked") if same => return Verdict::Revoked(file.clone(), i + 1),
                Some(_) => {}
                None if same => known = true,
                None if recorded.algorithm() == key.algorithm() => changed.push((file.clone(), i + 1)),
                None => {}
            }
        }
    }
    if known {
        Verdict::Known
    } else if !changed.is_empty() {
        Verdict::Changed(changed)
    } else {
        Verdict::Unknown
    }
}

/// `SHA256:…`, as `ssh-keygen -l` and ssh print it.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// The files to check: `override_` alone when given, else `$COHORT_KNOWN_HOSTS` alone when
/// set, else `~/.ssh/known_hosts` and `/etc/ssh/ssh_known_hosts` (as ssh reads them).
pub fn files(override_: Option<&Path>) -> Vec<PathBuf> {
    if let Some(p) = override_ {
        return vec![p.to_owned()];
    }
    if let Some(p) = std::env::var_os("COHORT_KNOWN_HOSTS").filter(|p| !p.is_empty()) {
        return vec![PathBuf::from(p)];
    }
    let mut out = Vec::new();
    if let Some(home) = home_dir() {
        out.push(home.join(".ssh/known_hosts"));
    }
    out.push(PathBuf::from("/etc/ssh/ssh_known_hosts"));
    out
}

/// `$HOME`, else the password database's home of the current user.
pub fn home_dir() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            nix::unistd::User::from_uid(nix::unistd::getuid())
                .ok()
                .flatten()
                .map(|u| u.dir)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIOaHcD4s9hHr/yYK7t8V4N0VQ+4HiKsalUba+EaXUFP7";
    const KEY_B: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIEWGWQ1IFQezSCV+RiyTBs1v1p9lwSc9zqEPkpXWH4VY";

    fn key(b64: &str) -> PublicKey {
        russh::keys::parse_public_key_base64(b64).unwrap()
    }

    fn file(dir: &Path, text: &str) -> Vec<PathBuf> {
        let p = dir.join("known_hosts");
        std::fs::write(&p, text).unwrap();
        vec![p]
    }

    /// `|1|salt|hmac` for `name`, made here the way ssh-keygen -H does.
    fn hashed(name: &str) -> String {
        let b64 = base64::engine::general_purpose::STANDARD;
        let salt = [7u8; 20];
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, &salt);
        let tag = aws_lc_rs::hmac::sign(&key, name.as_bytes());
        format!("|1|{}|{}", b64.encode(salt), b64.encode(tag.as_ref()))
    }

    #[test]
    fn plain_hashed_ports_and_patterns() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (key(KEY_A), key(KEY_B));
        let f = file(
            d.path(),
            &format!("# comment\n\nh1,h2 ssh-ed25519 {KEY_A}\n[h3]:2222\tssh-ed25519 {KEY_A} c\n"),
        );
        assert_eq!(check(&f, "h2", &a), Verdict::Known);
        assert_eq!(check(&f, "[h3]:2222", &a), Verdict::Known);
        // A port-22 entry does not vouch for another port, nor the other way round.
        assert_eq!(check(&f, "[h1]:2222", &a), Verdict::Unknown);
        assert_eq!(check(&f, "h3", &a), Verdict::Unknown);
        assert_eq!(check(&f, "h1", &b), Verdict::Changed(vec![(f[0].clone(), 3)]));

        let f = file(
            d.path(),
            &format!("{} ssh-ed25519 {KEY_B}\n", hashed("[10.0.0.2]:2200")),
        );
        assert_eq!(check(&f, "[10.0.0.2]:2200", &b), Verdict::Known);
        assert_eq!(check(&f, "[10.0.0.2]:2201", &b), Verdict::Unknown);
        assert!(matches!(check(&f, "[10.0.0.2]:2200", &a), Verdict::Changed(_)));

        let f = file(d.path(), &format!("*.lab,!bad.lab ssh-ed25519 {KEY_A}\n"));
        assert_eq!(check(&f, "w1.lab", &a), Verdict::Known);
        assert_eq!(check(&f, "bad.lab", &a), Verdict::Unknown);

        // A line of a type this client cannot read, and a marker, do not stop the reading.
        let f = file(
            d.path(),
            &format!("h ssh-foo AAAAB3Nz\n@cert-authority h ssh-ed25519 {KEY_B}\nh ssh-ed25519 {KEY_A}\n@revoked * ssh-ed25519 {KEY_B}\n"),
        );
        assert_eq!(check(&f, "h", &a), Verdict::Known);
        assert_eq!(check(&f, "h", &b), Verdict::Revoked(f[0].clone(), 4));
        assert_eq!(check(&[d.path().join("missing")], "h", &a), Verdict::Unknown);
        assert!(fingerprint(&a).starts_with("SHA256:"), "{}", fingerprint(&a));
    }
}
