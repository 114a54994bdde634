//! The hostile-agent suite in task containers, against a real disposable podman service,
//! rootful and rootless: every attack of `support::hostile::ATTACKS` as its own task of one
//! run (with an honest bystander), each task checked on its own, then the repository's
//! config, hooks and refs, the user's branch, the service branch, cohort's state and the
//! files outside the repository. Here the agent also goes for the repository's git dir and
//! cohort's files by their host paths, which a container must not reach.
//! Needs podman + runc: `bash fixtures/podman-service.sh install`.

#[path = "support/podman.rs"]
mod podman_support;
mod support;

use std::path::Path;
use std::process::{Command, Output};

use podman_support::{PodmanService, ROOTLESS_USER};
use support::hostile::{self, Expect, ATTACKS};
use support::*;

/// `[image] programs`: the defaults plus what the attacks use that an agent image lacks.
fn image_config() -> String {
    let mut programs: Vec<String> = cohort_oci::default_programs()
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    programs.extend(["/usr/bin/mkfifo".into(), "/usr/bin/truncate".into()]);
    // No network: rootless podman here cannot open /dev/net/tun for slirp4netns.
    format!("[image]\nprograms = {programs:?}\n\n[container]\nnetwork = \"none\"\n")
}

/// The scratch repository, armed, with the image settings committed.
fn repo() -> Scratch {
    let s = Scratch::new();
    s.write("cohort.toml", &image_config());
    s.git(&["add", "cohort.toml"]);
    s.git(&["commit", "-q", "-m", "image settings"]);
    hostile::arm(&s);
    s
}

/// Runs cohort as `user` (None: as root) in the repository.
fn cohort_as(s: &Scratch, service: &PodmanService, user: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = match user {
        None => s.cohort(),
        Some(u) => cohort_as_user(s, u, &service.dir().join("home"), &service.dir().join("xdg")),
    };
    cmd.env("CONTAINER_HOST", service.container_host()).args(args);
    cmd.output().unwrap()
}

fn suite(service: &PodmanService, s: &Scratch, user: Option<&str>) {
    // `[image] programs` and `[container] network` are sensitive: the file is trusted first.
    let out = cohort_as(s, service, user, &["trust"]);
    assert_eq!(code(&out), 0, "trust: {}", text(&out));
    let out = cohort_as(s, service, user, &["image", "build"]);
    assert_eq!(code(&out), 0, "image build: {}", text(&out));
    let before = hostile::guard(s);
    let mut tasks: Vec<&str> = ATTACKS.iter().map(|(a, ..)| *a).collect();
    tasks.push("bystander");
    let (t, p) = hostile::plan(s, &tasks);
    let (t, p) = (t.display().to_string(), p.display().to_string());
    let out = cohort_as(
        s,
        service,
        user,
        &[
            "run",
            "--runtime",
            "podman",
            "-j",
            "2",
            "--agent",
            "command",
            "--agent-command",
            "sh hostile.sh {task}",
            "--tasks",
            &t,
            "--prompt",
            &p,
        ],
    );
    // The sparse file fails its task, so the run ends 1.
    assert_eq!(code(&out), 1, "{}", text(&out));
    if user.is_some() {
        // The checks read as root, which git refuses in another user's repository.
        chown(s.tmp.path(), "root");
    }
    hostile::check_sealed(s, &before, tasks.len());
    let report = s.status_json();
    let mut failed = Vec::new();
    for (i, (attack, _, in_container)) in ATTACKS.iter().enumerate() {
        let check = || hostile::check_task(s, &report, i + 1, attack, *in_container);
        let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(check));
        if checked.is_err() {
            failed.push(*attack);
        }
    }
    assert!(
        failed.is_empty(),
        "attacks that got through: {failed:?}\n{}",
        text(&out)
    );
    hostile::check_task(s, &report, tasks.len(), "bystander", Expect::Merged);
    let utf8 = ATTACKS.iter().position(|(a, ..)| *a == "utf8").unwrap() + 1;
    assert!(hostile::task_log(s, utf8).contains("still-here"));
    let endless = ATTACKS.iter().position(|(a, ..)| *a == "endless").unwrap() + 1;
    assert!(hostile::task_log(s, endless).contains("[cohort: line cut at 1 MiB]"));
    let left = service
        .cli()
        .args(["ps", "-a", "-q", "--filter", "label=cohort.run"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&left.stdout).trim(),
        "",
        "task containers left behind"
    );
}

#[test]
fn hostile_agents_in_rootful_containers() {
    let service = PodmanService::start();
    let s = repo();
    suite(&service, &s, None);
    s.fsck();
}

#[test]
fn hostile_agents_in_rootless_containers() {
    let service = PodmanService::start_rootless(ROOTLESS_USER);
    let s = repo();
    // The user owns the repository, as a developer owns theirs.
    chown(s.tmp.path(), ROOTLESS_USER);
    suite(&service, &s, Some(ROOTLESS_USER));
}

fn chown(dir: &Path, user: &str) {
    let ok = Command::new("chown").arg("-R").arg(user).arg(dir).status().unwrap();
    assert!(ok.success(), "chown {user} {}", dir.display());
}
