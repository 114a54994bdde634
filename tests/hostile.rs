//! The hostile-agent suite on the host runtime: one test per attack that goes through what
//! the agent owns (its checkout and its private git dir) and what it prints. An agent on the
//! host runs as the user and can write the user's files directly; the README says so, and the
//! container runs (tests/hostile_podman.rs) cover those attacks. Each test runs the attack as
//! task 1 and an honest bystander as task 2 in the same checkout slot (`-j 1`), then checks
//! the repository's config, hooks and refs, the user's branch, the service branch, cohort's
//! state, the files outside the repository, and what was merged.

mod support;

use support::hostile::{self, Expect, ATTACKS};
use support::*;

fn run_attack(attack: &str) {
    let (_, expect, _) = ATTACKS
        .iter()
        .find(|(a, ..)| *a == attack)
        .copied()
        .unwrap_or_else(|| panic!("no attack {attack}"));
    let s = Scratch::new();
    hostile::arm(&s);
    let before = hostile::guard(&s);
    let (tasks, prompt) = hostile::plan(&s, &[attack, "bystander"]);
    let out = s
        .cohort()
        .env("HOSTILE_SEALED_ONLY", "1")
        .args(["run", "--runtime", "host", "-j", "1", "--agent", "command"])
        .args(["--agent-command", "sh hostile.sh {task}", "--tasks"])
        .arg(&tasks)
        .arg("--prompt")
        .arg(&prompt)
        .output()
        .unwrap();
    let want_code = if expect == Expect::Merged { 0 } else { 1 };
    assert_eq!(code(&out), want_code, "{attack}: {}", text(&out));
    hostile::check_sealed(&s, &before, 2);
    let report = s.status_json();
    hostile::check_task(&s, &report, 1, attack, expect);
    // The bystander ran next in the same checkout and was merged whole.
    hostile::check_task(&s, &report, 2, "bystander", Expect::Merged);
    let log = hostile::task_log(&s, 1);
    match attack {
        "endless" => {
            assert!(log.contains("[cohort: line cut at 1 MiB]"), "the long line is not cut");
            assert!(
                log.contains("after-the-long-line"),
                "reading stopped after the long line"
            );
            assert!(log.len() < 4 << 20, "the log holds the whole line: {} bytes", log.len());
        }
        "utf8" => {
            assert!(
                log.contains("x\u{fffd}\u{fffd} not utf-8"),
                "invalid UTF-8 is not replaced"
            );
            assert!(log.contains("still-here"), "reading stopped at invalid UTF-8");
            assert!(log.contains("--- exit: Code(0)"), "the agent did not exit 0 (SIGPIPE?)");
        }
        "sparse" => assert!(report["tasks"][0]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("max_file_size")),
        _ => {}
    }
    s.fsck();
}

macro_rules! attacks {
    ($($name:ident => $attack:literal),* $(,)?) => {
        $(#[test] fn $name() { run_attack($attack) })*
    };
}

attacks! {
    hooks_in_its_git_dir => "hooks",
    config_fsmonitor_hookspath_filters_merge_drivers_include => "config",
    refs_user_service_other_task_packed => "refs",
    state_db_and_logs => "state",
    another_tasks_checkout => "checkout",
    dot_git_replaced_by_a_symlink => "git-symlink",
    dot_git_replaced_by_a_fifo => "git-fifo",
    dot_git_replaced_by_dev_zero => "git-devzero",
    checkout_root_swapped_for_a_symlink => "root-symlink",
    ten_gib_sparse_file => "sparse",
    endless_line => "endless",
    invalid_utf8 => "utf8",
    git_gc_prune_now => "gc",
    the_agents_own_git_works => "gitworks",
}

/// Every attack in ATTACKS has its test here.
#[test]
fn every_attack_has_a_test() {
    let src = include_str!("hostile.rs");
    for (attack, ..) in ATTACKS {
        assert!(src.contains(&format!("=> \"{attack}\"")), "no host test for {attack}");
    }
}
