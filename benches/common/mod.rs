//! What the benches share: the benchmark repository (generated, deterministic, shaped like
//! rust-lang/cargo) and their flags.

use std::path::Path;
use std::process::Command;

pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "bench")
        .env("GIT_AUTHOR_EMAIL", "bench@example.com")
        .env("GIT_COMMITTER_NAME", "bench")
        .env("GIT_COMMITTER_EMAIL", "bench@example.com")
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A deterministic tree of `files` files in nested directories, sizes like
/// a Rust project's sources (a few hundred bytes to ~20 KB).
pub fn generate_repo(dir: &Path, files: usize) {
    git(dir, &["init", "-q", "-b", "main"]);
    let mut seed: u64 = 0x9e3779b97f4a7c15;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..files {
        let r = next();
        let d1 = r % 24;
        let d2 = (r >> 8) % 6;
        let sub = if i % 3 == 0 {
            format!("crates/c{d1}/src/m{d2}")
        } else {
            format!("tests/t{d1}")
        };
        let p = dir.join(&sub);
        std::fs::create_dir_all(&p).unwrap();
        let size = 200 + (next() % 20_000) as usize;
        let line = format!("// file {i} of the benchmark repository, padded to a realistic size\n");
        let body: String = line.repeat(size / line.len() + 1);
        std::fs::write(p.join(format!("f{i}.rs")), body).unwrap();
    }
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "-q", "-m", "generated"]);
}

/// The value after flag `name` on the bench's command line, or `default`.
pub fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.into())
}
