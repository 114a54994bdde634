//! Shared test support: scratch repositories with a bare origin (set up and
//! inspected with the git CLI, which the product itself never runs), the
//! cohort binary, and the agent fixtures.
#![allow(dead_code)]

pub mod hostile;
pub mod netns;
pub mod remotes;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(rel)
}

/// The pinned codex CLI's path (installed by fixtures/install-codex.sh when missing).
pub fn codex() -> String {
    let out = Command::new("sh").arg(fixture("install-codex.sh")).output().unwrap();
    assert!(
        out.status.success(),
        "installing codex: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

pub fn agent(name: &str) -> String {
    fixture(&format!("agents/{name}")).display().to_string()
}

/// A bare `origin` and a clone of it with one commit, in a temp dir.
pub struct Scratch {
    pub tmp: tempfile::TempDir,
    pub origin: PathBuf,
    pub work: PathBuf,
}

/// The git CLI for test set-up and inspection, as a user who also reads repositories that
/// another test user owns (the rootless podman tests).
pub fn git_cmd() -> Command {
    let mut c = Command::new("git");
    c.env("GIT_CONFIG_COUNT", "1")
        .env("GIT_CONFIG_KEY_0", "safe.directory")
        .env("GIT_CONFIG_VALUE_0", "*");
    c
}

pub fn git_in(dir: &Path, args: &[&str]) -> String {
    let out = git_cmd()
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "Test")
        .env("GIT_AUTHOR_EMAIL", "test@example.com")
        .env("GIT_COMMITTER_NAME", "Test")
        .env("GIT_COMMITTER_EMAIL", "test@example.com")
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

impl Scratch {
    pub fn new() -> Scratch {
        let tmp = tempfile::tempdir().unwrap();
        let origin = tmp.path().join("origin.git");
        let work = tmp.path().join("work");
        git_in(
            tmp.path(),
            &["init", "-q", "--bare", "-b", "main", origin.to_str().unwrap()],
        );
        git_in(
            tmp.path(),
            &["clone", "-q", origin.to_str().unwrap(), work.to_str().unwrap()],
        );
        git_in(&work, &["checkout", "-q", "-b", "main"]);
        git_in(&work, &["config", "user.name", "Test"]);
        git_in(&work, &["config", "user.email", "test@example.com"]);
        std::fs::write(work.join("README.md"), "# scratch\n").unwrap();
        std::fs::write(work.join(".gitignore"), "*.log\ntarget/\n").unwrap();
        git_in(&work, &["add", "."]);
        git_in(&work, &["commit", "-q", "-m", "initial"]);
        git_in(&work, &["push", "-q", "-u", "origin", "main"]);
        Scratch { tmp, origin, work }
    }

    /// A repository with no remote at all.
    pub fn local_only() -> Scratch {
        let s = Scratch::new();
        git_in(&s.work, &["remote", "remove", "origin"]);
        s
    }

    pub fn git(&self, args: &[&str]) -> String {
        git_in(&self.work, args)
    }

    pub fn write(&self, rel: &str, content: &str) {
        let p = self.work.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }

    pub fn read(&self, rel: &str) -> Option<String> {
        std::fs::read_to_string(self.work.join(rel)).ok()
    }

    /// A second clone, for pushing to origin behind the user's back.
    pub fn other_clone(&self) -> PathBuf {
        let other = self.tmp.path().join("other");
        if !other.exists() {
            git_in(
                self.tmp.path(),
                &["clone", "-q", self.origin.to_str().unwrap(), other.to_str().unwrap()],
            );
        }
        other
    }

    pub fn request(&self, name: &str, text: &str) -> PathBuf {
        let p = self.tmp.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    pub fn cohort(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_cohort"));
        c.current_dir(&self.work)
            .env_remove("OPENAI_API_KEY")
            .env_remove("COHORT_LOG")
            // The test machine's TLS and proxy settings are not the scratch user's: the
            // remotes tests name their own CA and proxies (git lets these override config).
            .env_remove("GIT_SSL_CAINFO")
            .env_remove("GIT_SSL_CAPATH")
            .env_remove("https_proxy")
            .env_remove("HTTPS_PROXY")
            .env_remove("http_proxy")
            .env_remove("HTTP_PROXY")
            .env_remove("all_proxy")
            .env_remove("ALL_PROXY")
            // The host runtime unless a test points cohort at a podman socket:
            // a socket on the test machine must not change what these tests run.
            .env("CONTAINER_HOST", "unix:///nonexistent/cohort-tests/podman.sock")
            // The user's settings, credentials and trust store are the scratch's own (where
            // HOME=<scratch> would put them): the developer's are never read or written.
            .env("XDG_CONFIG_HOME", self.tmp.path().join(".config"))
            .env("XDG_STATE_HOME", self.tmp.path().join(".local/state"))
            // Nor the developer's image cache (`gc` collects it): one kept for the tests,
            // shared so that image builds stay warm from test to test.
            .env("XDG_CACHE_HOME", test_cache_home());
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cohort().args(args).output().unwrap()
    }

    /// Task subjects of the merge commits on the service branch's first-parent line.
    pub fn merged_tasks(&self, branch: &str) -> Vec<String> {
        self.git(&["log", "--first-parent", "--merges", "--format=%s", branch])
            .lines()
            .filter_map(|l| l.strip_prefix("Merge task ").map(String::from))
            .collect()
    }

    pub fn fsck(&self) {
        let out = Command::new("git")
            .args(["fsck", "--strict", "--no-progress"])
            .current_dir(&self.work)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git fsck: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn status_json(&self) -> serde_json::Value {
        let out = self.run(&["report", "--json"]);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("report --json: {}", text(&out)))
    }
}

/// The cohort binary run as `user` (the rootless podman tests' developer) in `s`'s repository,
/// with `home` and `runtime_dir` (the user's podman socket lives there) and `s`'s own settings
/// and state directories, as `Scratch::cohort` gives root.
pub fn cohort_as_user(s: &Scratch, user: &str, home: &Path, runtime_dir: &Path) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", user, "--", "env"]);
    c.arg(format!("HOME={}", home.display()));
    c.arg(format!("XDG_RUNTIME_DIR={}", runtime_dir.display()));
    c.arg(format!("XDG_CONFIG_HOME={}", s.tmp.path().join(".config").display()));
    c.arg(format!(
        "XDG_STATE_HOME={}",
        s.tmp.path().join(".local/state").display()
    ));
    c.arg(env!("CARGO_BIN_EXE_cohort"));
    c.current_dir(&s.work);
    c
}

/// The tests' `XDG_CACHE_HOME`, under the target directory.
pub fn test_cache_home() -> PathBuf {
    let base = option_env!("CARGO_TARGET_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    base.join("cohort-tests-cache")
}

pub fn text(out: &Output) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

/// A request document with `n` tasks.
pub fn tasks_doc(n: usize) -> String {
    (1..=n).map(|i| format!("- task number {i}\n")).collect()
}

/// True once a process is gone (or a zombie waiting to be reaped); killed
/// processes take a moment to be torn down, so this waits up to 5 s.
pub fn gone(pid: &str) -> bool {
    for _ in 0..50 {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return true,
            Ok(stat) if stat.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')) => return true,
            Ok(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
        }
    }
    false
}

/// Every file below `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}
