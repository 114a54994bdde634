//! The secret scan that runs before cohort commits the user's files.
//!
//! People have pushed `.env` files and keys by accident with tools like this
//! one; a snapshot commit that might later be pushed must not carry them.

use std::fmt;
use std::path::Path;
use std::sync::LazyLock;

use regex::bytes::Regex;

use crate::secret::Secret;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub path: String,
    pub what: &'static str,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Findings {
    pub found: Vec<Finding>,
    /// `--allow-file` paths that matched no scanned file: a typo, or a path
    /// not relative to the repository root. Said, so the user is not misled.
    pub unmatched_allow: Vec<String>,
}

impl fmt::Display for Findings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "refusing to commit files that look like they hold secrets (nothing was changed):"
        )?;
        for x in &self.found {
            writeln!(f, "  {}: {}", x.path, x.what)?;
        }
        for a in &self.unmatched_allow {
            writeln!(f, "  (--allow-file {a} matched no new or changed file)")?;
        }
        write!(
            f,
            "remove them, add them to .gitignore, or pass --allow-file PATH (relative to the repository root) \
             for a file you are sure about"
        )
    }
}

/// Token shapes of common providers, plus private-key blocks.
static PATTERNS: LazyLock<Vec<(Regex, &'static str)>> = LazyLock::new(|| {
    [
        (
            r"-----BEGIN ([A-Z0-9]+ )*PRIVATE KEY( BLOCK)?-----",
            "a private key block",
        ),
        (
            r"\bsk-(proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}",
            "an OpenAI-style API key (sk-...)",
        ),
        (r"\bAKIA[0-9A-Z]{16}\b", "an AWS access key id"),
        (r"\bgh[pousr]_[A-Za-z0-9]{36,}", "a GitHub token"),
        (r"\bgithub_pat_[A-Za-z0-9_]{22,}", "a GitHub token"),
        (r"\bglpat-[A-Za-z0-9_-]{20,}", "a GitLab token"),
        (r"\bxox[abposr]-[A-Za-z0-9-]{10,}", "a Slack token"),
        (r"\bAIza[0-9A-Za-z_-]{35}", "a Google API key"),
        (r"\b[rs]k_live_[0-9A-Za-z]{24,}", "a Stripe live key"),
        (r"\bsk-ant-[A-Za-z0-9_-]{20,}", "an Anthropic API key"),
    ]
    .into_iter()
    .map(|(re, what)| (Regex::new(re).expect("valid pattern"), what))
    .collect()
});

/// Only the start of very large files is scanned.
const SCAN_LIMIT: usize = 8 * 1024 * 1024;

/// True for `.env`-style files, which hold secrets by convention: `.env`,
/// `.env.local` and other `.env.*`, `prod.env` and other `*.env`, and
/// direnv's `.envrc` (it usually exports the same secrets). Example and
/// template variants (`.env.example`, `example.env`, ...) are meant to be
/// committed; other names that merely contain "env" are not matched.
pub fn is_env_file(name: &str) -> bool {
    const TEMPLATE: [&str; 5] = ["example", "sample", "template", "dist", "defaults"];
    let templated = TEMPLATE
        .iter()
        .any(|t| name.ends_with(&format!(".{t}")) || name == format!("{t}.env"));
    !templated && (name == ".env" || name == ".envrc" || name.starts_with(".env.") || name.ends_with(".env"))
}

/// Scans the files at `paths` (relative to `workdir`) for secrets, skipping
/// the ones in `allowed` (relative to the repository root).
pub fn scan<'a>(
    workdir: &Path,
    paths: impl IntoIterator<Item = &'a str>,
    key: Option<&Secret>,
    allowed: &[String],
) -> Findings {
    let allowed: Vec<&str> = allowed.iter().map(|a| a.trim_start_matches("./")).collect();
    let mut used = vec![false; allowed.len()];
    let key = key.filter(|k| k.expose().len() >= 8);
    let mut out = Vec::new();
    for path in paths {
        if let Some(i) = allowed.iter().position(|a| *a == path) {
            used[i] = true;
            continue;
        }
        let name = path.rsplit('/').next().unwrap_or(path);
        if is_env_file(name) {
            out.push(Finding {
                path: path.into(),
                what: "a .env-style file that is not ignored",
            });
            continue;
        }
        let Ok(mut bytes) = std::fs::read(workdir.join(path)) else {
            continue;
        };
        bytes.truncate(SCAN_LIMIT);
        if let Some(k) = key {
            if memfind(&bytes, k.expose().as_bytes()) {
                out.push(Finding {
                    path: path.into(),
                    what: "the configured API key",
                });
                continue;
            }
        }
        if let Some((_, what)) = PATTERNS.iter().find(|(re, _)| re.is_match(&bytes)) {
            out.push(Finding {
                path: path.into(),
                what,
            });
        }
    }
    let unmatched_allow = allowed
        .iter()
        .zip(used)
        .filter(|(_, used)| !used)
        .map(|(a, _)| a.to_string())
        .collect();
    Findings {
        found: out,
        unmatched_allow,
    }
}

/// The secret scan of what a task hands back, fed as its files stream past (chunk by chunk,
/// file after file, as they are hashed) and with the objects of the agent's own commits.
/// The end of each chunk is kept, so a secret split between two chunks is still found.
#[derive(Debug, Default)]
pub struct StreamScan {
    key: Option<Vec<u8>>,
    path: Vec<u8>,
    tail: Vec<u8>,
    pub found: Vec<Finding>,
}

/// More than the longest secret looked for (keys are at most a few hundred bytes).
const OVERLAP: usize = 4096;

impl StreamScan {
    pub fn new(key: Option<&Secret>) -> StreamScan {
        StreamScan {
            key: key
                .filter(|k| k.expose().len() >= 8)
                .map(|k| k.expose().as_bytes().to_vec()),
            ..Default::default()
        }
    }

    /// A file (or object) named `path` is handed back: `.env`-style names are findings.
    pub fn name(&mut self, path: &str) {
        let name = path.rsplit('/').next().unwrap_or(path);
        if is_env_file(name) {
            self.add(path, "a .env-style file");
        }
    }

    /// The next chunk of `path`'s content.
    pub fn chunk(&mut self, path: &[u8], data: &[u8]) {
        if path != self.path.as_slice() {
            self.path = path.to_vec();
            self.tail.clear();
        }
        let mut window = std::mem::take(&mut self.tail);
        window.extend_from_slice(data);
        let shown = String::from_utf8_lossy(path).into_owned();
        if let Some(k) = &self.key {
            if memfind(&window, k) {
                self.add(&shown, "the configured API key");
            }
        }
        for (re, what) in PATTERNS.iter() {
            if re.is_match(&window) {
                self.add(&shown, what);
            }
        }
        let keep = window.len().min(OVERLAP);
        self.tail = window.split_off(window.len() - keep);
    }

    fn add(&mut self, path: &str, what: &'static str) {
        if !self.found.iter().any(|f| f.path == path && f.what == what) {
            self.found.push(Finding {
                path: path.into(),
                what,
            });
        }
    }

    /// The findings as one line for a task's reason: where, and what (never the secret).
    pub fn describe(&self) -> String {
        let list: Vec<String> = self.found.iter().map(|f| format!("{} ({})", f.path, f.what)).collect();
        format!("the task's change holds secrets: {}", list.join(", "))
    }
}

fn memfind(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_keys_tokens_and_env_files() {
        let dir = tempfile::tempdir().unwrap();
        let w = |name: &str, body: &str| std::fs::write(dir.path().join(name), body).unwrap();
        w("id", "-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n");
        w("conf.py", "TOKEN = 'ghp_abcdefghijklmnopqrstuvwxyz0123456789'\n");
        w("notes.txt", "my key is test-key-1234567890 ok\n");
        w("clean.rs", "fn main() { let sk = 1; }\n");
        w(".env", "A=1\n");
        w(".env.example", "A=\n");
        w("aws.txt", "AKIAABCDEFGHIJKLMNOP\n");
        let key = Secret::new("test-key-1234567890");
        let all = [
            "id",
            "conf.py",
            "notes.txt",
            "clean.rs",
            ".env",
            ".env.example",
            "aws.txt",
        ];
        let f = scan(dir.path(), all, Some(&key), &[]);
        let hits: Vec<&str> = f.found.iter().map(|x| x.path.as_str()).collect();
        assert_eq!(hits, ["id", "conf.py", "notes.txt", ".env", "aws.txt"]);
        assert!(
            !f.to_string().contains("test-key-1234567890"),
            "the message must not repeat the key"
        );
        let f = scan(
            dir.path(),
            all,
            Some(&key),
            &["./.env".into(), "id".into(), "nope".into()],
        );
        assert_eq!(f.found.len(), 3);
        assert_eq!(f.unmatched_allow, ["nope"]);
        assert!(f.to_string().contains("--allow-file nope matched no"), "{f}");
    }

    #[test]
    fn streamed_secrets_are_found_across_chunks() {
        let key = Secret::new("test-key-1234567890");
        let mut s = StreamScan::new(Some(&key));
        s.chunk(b"a.txt", b"nothing here, but the key starts: test-key-12");
        s.chunk(b"a.txt", b"34567890 and ends here");
        s.chunk(b"b.txt", b"ghp_abcdefghijklmnopqrstuvwxyz0123456789\n");
        s.chunk(b"c.txt", b"clean");
        s.name("dir/.env");
        s.name("dir/.env.example");
        let hits: Vec<(&str, &str)> = s.found.iter().map(|f| (f.path.as_str(), f.what)).collect();
        assert_eq!(
            hits,
            [
                ("a.txt", "the configured API key"),
                ("b.txt", "a GitHub token"),
                ("dir/.env", "a .env-style file")
            ]
        );
        assert!(!s.describe().contains("test-key"), "{}", s.describe());
        // A split across files is not a secret.
        let mut s = StreamScan::new(Some(&key));
        s.chunk(b"x", b"test-key-12");
        s.chunk(b"y", b"34567890");
        assert!(s.found.is_empty());
    }

    #[test]
    fn env_file_names() {
        for name in [".env", ".env.local", ".env.production", ".envrc", "prod.env", "app.env"] {
            assert!(is_env_file(name), "{name}");
        }
        let templates = [
            ".env.example",
            ".env.sample",
            "prod.env.example",
            "example.env",
            "sample.env",
        ];
        let others = [
            "env",
            "environment.rs",
            ".environment",
            "dotenv.rs",
            "prod.env.rs",
            "my.envelope",
        ];
        for name in templates.iter().chain(&others) {
            assert!(!is_env_file(name), "{name}");
        }
    }
}
