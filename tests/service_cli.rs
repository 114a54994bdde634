//! `cohort service` and `cohort doctor` on a host without systemd: every refusal comes
//! before anything is written, with the fix. (The service itself runs in the VM test; the
//! id-range checks and `--setup`'s edits are unit-tested in `service::subid` on temp files.)

mod support;
use support::*;

#[test]
fn install_refuses_what_cannot_work_before_writing_anything() {
    let s = Scratch::new();
    let units = s.tmp.path().join("config");
    let run = |args: &[&str]| {
        s.cohort()
            .env("XDG_CONFIG_HOME", &units)
            .args(["service", "install"])
            .args(args)
            .output()
            .unwrap()
    };
    // Not a repository.
    let out = run(&["--scope", "user", "--repo", s.tmp.path().to_str().unwrap()]);
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(text(&out).contains("--repo"), "{}", text(&out));
    // A root-owned repository for the system service (these tests run as root).
    if nix_is_root() {
        let out = run(&["--scope", "system"]);
        assert_eq!(code(&out), 2, "{}", text(&out));
        assert!(text(&out).contains("owned by root"), "{}", text(&out));
    }
    // The key is not placed.
    let out = s
        .cohort()
        .env("XDG_CONFIG_HOME", &units)
        .env("HOME", s.tmp.path())
        .args(["service", "install", "--scope", "user"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 2, "{}", text(&out));
    // Every problem doctor finds is named at once, each with its fix, and what --setup can
    // do is said (no systemd here: the socket, systemd and the key all fail).
    let t = text(&out);
    for want in [
        "not installing cohort.service",
        "podman socket: ",
        "fix: systemctl --user enable --now podman.socket",
        "credentials: ",
        "key: ",
        "fix: cohort keys place openai_api_key --scope user",
        "cohort doctor --scope user",
        "`cohort service install --setup` sets up: podman socket",
    ] {
        assert!(t.contains(want), "missing {want:?} in:\n{t}");
    }
    assert!(!units.join("systemd/user/cohort.service").exists(), "no unit written");
    // --setup cannot start podman.socket without a service manager: still exit 2, with why.
    let out = s
        .cohort()
        .env("XDG_CONFIG_HOME", &units)
        .env("HOME", s.tmp.path())
        .args(["service", "install", "--scope", "user", "--setup"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(text(&out).contains("--setup could not finish"), "{}", text(&out));
    assert!(!units.join("systemd/user/cohort.service").exists(), "no unit written");
}

#[test]
fn doctor_names_each_problem_and_its_fix() {
    let s = Scratch::new();
    let out = s
        .cohort()
        .env("HOME", s.tmp.path())
        .args(["doctor", "--scope", "user"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 1, "{}", text(&out));
    let t = text(&out);
    for want in [
        "FAIL  podman socket",
        "systemctl --user enable --now podman.socket",
        "FAIL  credentials",
        "FAIL  key",
        "cohort keys place openai_api_key --scope user",
    ] {
        assert!(t.contains(want), "missing {want:?} in:\n{t}");
    }
}

fn nix_is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}
