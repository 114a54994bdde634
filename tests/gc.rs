//! `cohort gc`: old runs go (refs, run directories, state rows), kept runs and held runs stay,
//! `--dry-run` lists exactly what a real gc removes and changes nothing.

mod support;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::*;

fn run_agent(s: &Scratch, doc: &str, agent_name: &str, extra: &[&str]) -> String {
    let req = s.request("req.md", doc);
    let a = agent(agent_name);
    let mut args = vec![
        "run",
        req.to_str().unwrap(),
        "--agent",
        "command",
        "--agent-command",
        a.as_str(),
    ];
    args.extend(extra);
    let out = s.run(&args);
    assert!(code(&out) <= 1, "{}", text(&out));
    s.status_json()["run"]["id"].as_str().unwrap().to_string()
}

/// Every cohort ref (task branches and kept attempts) with its value.
fn cohort_refs(s: &Scratch) -> BTreeSet<String> {
    s.git(&[
        "for-each-ref",
        "--format=%(refname) %(objectname)",
        "refs/heads/cohort/task/",
        "refs/cohort/",
    ])
    .lines()
    .map(String::from)
    .collect()
}

fn runs_dir(s: &Scratch) -> PathBuf {
    s.work.join(".git/cohort/runs")
}

/// Every path below the runs directory: what a dry run must leave exactly as it was.
fn tree(dir: &Path) -> BTreeSet<PathBuf> {
    files_under(dir).into_iter().collect()
}

/// The `ref NAME` lines of gc's output.
fn listed_refs(out: &str) -> BTreeSet<String> {
    out.lines()
        .filter_map(|l| l.trim_start().strip_prefix("ref "))
        .map(|l| l.split(' ').next().unwrap().to_string())
        .collect()
}

fn listed(out: &str, what: &str) -> BTreeSet<String> {
    out.lines()
        .filter_map(|l| l.trim_start().strip_prefix(what))
        .map(|l| l.split(" (").next().unwrap().to_string())
        .collect()
}

/// Starts a run of `n` hanging agents and waits until they all run.
fn start_hanging(s: &Scratch, n: usize) -> std::process::Child {
    let pids = s.tmp.path().join("pids");
    let _ = std::fs::remove_file(&pids);
    let req = s.request("hang.md", &tasks_doc(n));
    let mut child = s
        .cohort()
        .env("COHORT_TEST_PIDS", &pids)
        .args([
            "run",
            req.to_str().unwrap(),
            "--agent-command",
            &agent("hang.sh"),
            "-j",
            &n.to_string(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..300 {
        if std::fs::read_to_string(&pids).unwrap_or_default().lines().count() >= n {
            return child;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the hanging agents did not start within 30 s");
}

fn kill_9(s: &Scratch, mut child: std::process::Child) {
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let pids = std::fs::read_to_string(s.tmp.path().join("pids")).unwrap_or_default();
    for pid in pids.split_whitespace() {
        assert!(gone(pid), "agent {pid} outlived cohort");
    }
}

#[test]
fn gc_removes_old_runs_and_keeps_what_kept_runs_need() {
    let s = Scratch::new();
    // Oldest first: conflicts redone (attempt refs), merged work, a killed run, a failed
    // task, a kept conflict. The newest two are kept.
    let retried = run_agent(&s, "- alpha\n- beta\n", "shared-file.sh", &["-j", "2"]);
    let merged = run_agent(&s, &tasks_doc(3), "write.sh", &["-j", "3"]);
    kill_9(&s, start_hanging(&s, 2));
    let killed = s.status_json()["run"]["id"].as_str().unwrap().to_string();
    assert_ne!(killed, merged);
    let failed = run_agent(&s, "- break it\n", "fail.sh", &[]);
    let conflict = run_agent(
        &s,
        "- gamma\n- delta\n",
        "shared-file.sh",
        &["-j", "2", "--on-conflict", "keep"],
    );
    let statuses: BTreeSet<String> = s.status_json()["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["status"].as_str().unwrap().to_string())
        .collect();
    assert!(statuses.contains("conflict"), "{statuses:?}");
    let refs_before = cohort_refs(&s);
    assert!(
        refs_before
            .iter()
            .any(|r| r.starts_with(&format!("refs/cohort/attempts/{retried}/"))),
        "the redone conflict kept its first attempt: {refs_before:?}"
    );
    // A codex home in a finished, kept run, and one in the abandoned run.
    for run in [&failed, &killed] {
        let home = runs_dir(&s).join(run).join("attempts/001-1/codex-home");
        std::fs::create_dir_all(home.join("sessions")).unwrap();
        std::fs::write(home.join("sessions/big.jsonl"), vec![b'x'; 256 * 1024]).unwrap();
    }

    // Defaults (newest 10, younger than 30 days): every run stays, and only the codex home of
    // the finished run goes (the abandoned run may still be resumed into it).
    let out = s.run(&["gc"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(listed_refs(&stdout).is_empty(), "{stdout}");
    assert!(!runs_dir(&s).join(&failed).join("attempts/001-1/codex-home").exists());
    assert!(runs_dir(&s).join(&killed).join("attempts/001-1/codex-home").exists());
    assert_eq!(cohort_refs(&s), refs_before);

    // The dry run lists and changes nothing.
    let files_before = tree(&runs_dir(&s));
    let status_before = s.run(&["status", "--json"]).stdout;
    let dry = s.run(&["gc", "--keep-runs", "2", "--older-than", "0s", "--dry-run"]);
    assert_eq!(code(&dry), 0, "{}", text(&dry));
    let dry_out = String::from_utf8_lossy(&dry.stdout).to_string();
    assert!(dry_out.contains("would free"), "{dry_out}");
    assert_eq!(cohort_refs(&s), refs_before, "{dry_out}");
    assert_eq!(tree(&runs_dir(&s)), files_before);
    assert_eq!(s.run(&["status", "--json"]).stdout, status_before);
    for run in [&retried, &merged, &killed] {
        assert!(dry_out.contains(&format!("remove run {run}")), "{dry_out}");
    }
    for run in [&failed, &conflict] {
        assert!(dry_out.contains(&format!("keep run {run}")), "{dry_out}");
    }

    let out = s.run(&["gc", "--keep-runs", "2", "--older-than", "0s"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let real = String::from_utf8_lossy(&out.stdout).to_string();
    // What the dry run listed is what went.
    assert_eq!(listed_refs(&real), listed_refs(&dry_out), "{real}");
    assert_eq!(listed(&real, "dir "), listed(&dry_out, "dir "));
    assert_eq!(listed(&real, "codex-home "), listed(&dry_out, "codex-home "));
    let gone: BTreeSet<String> = refs_before.difference(&cohort_refs(&s)).cloned().collect();
    let gone_names: BTreeSet<String> = gone.iter().map(|r| r.split(' ').next().unwrap().to_string()).collect();
    assert_eq!(gone_names, listed_refs(&real));
    // Every ref of the removed runs went, attempts included; every ref of the kept runs stays.
    for r in cohort_refs(&s) {
        assert!(r.contains(&failed) || r.contains(&conflict), "left: {r}");
    }
    for r in &refs_before {
        if r.contains(&failed) || r.contains(&conflict) {
            let name = r.split(' ').next().unwrap();
            assert_eq!(
                s.git(&["rev-parse", name]).trim(),
                r.split(' ').nth(1).unwrap(),
                "kept {name} resolves"
            );
        }
    }
    for run in [&retried, &merged, &killed] {
        assert!(!runs_dir(&s).join(run).exists(), "{run}'s directory is gone");
        let report = s.run(&["report", run]);
        assert_eq!(code(&report), 2, "{}", text(&report));
    }
    // The kept runs report as before (the failed task's branch still holds its work).
    for run in [&failed, &conflict] {
        let report = s.run(&["report", run, "--json"]);
        assert!(code(&report) <= 1, "{}", text(&report));
    }
    let failed_report = s.run(&["report", &failed, "--json"]);
    let failed_report: serde_json::Value = serde_json::from_slice(&failed_report.stdout).unwrap();
    let branch = failed_report["tasks"][0]["branch"].as_str().unwrap();
    assert!(s.git(&["ls-tree", "--name-only", branch]).contains("partial-001.txt"));
    assert!(!s.run(&["logs", "1", "--run", &failed]).stdout.is_empty());
    // The refs left were packed: no loose files, and git reads them from packed-refs.
    let packed = std::fs::read_to_string(s.work.join(".git/packed-refs")).unwrap();
    for r in cohort_refs(&s) {
        let name = r.split(' ').next().unwrap();
        assert!(packed.contains(name), "{name} is packed");
        assert!(!s.work.join(".git").join(name).exists(), "{name} has no loose file");
    }
    s.fsck();
    assert_eq!(s.git(&["rev-parse", "--verify", "-q", "cohort/service"]).len(), 41);
    assert_eq!(s.git(&["worktree", "list"]).lines().count(), 1);
    // The service branch still has every merged task.
    assert!(s
        .merged_tasks("cohort/service")
        .iter()
        .any(|t| t.contains("task number 3")));

    // A second gc finds nothing more, and a new run works on the collected repository.
    let again = s.run(&["gc", "--keep-runs", "2", "--older-than", "0s"]);
    assert!(
        listed_refs(&String::from_utf8_lossy(&again.stdout)).is_empty(),
        "{}",
        text(&again)
    );
    run_agent(&s, "- one more\n", "write.sh", &[]);
    assert_eq!(s.status_json()["tasks"][0]["status"], "merged");
    let status = s.run(&["status"]);
    let status = String::from_utf8_lossy(&status.stdout).to_string();
    assert!(status.contains("cohort ref(s)"), "{status}");
    let json: serde_json::Value = serde_json::from_slice(&s.run(&["status", "--json"]).stdout).unwrap();
    assert_eq!(
        json["disk"]["cohort_refs"].as_u64().unwrap() as usize,
        cohort_refs(&s).len()
    );
    assert!(json["disk"]["cohort_dir_bytes"].as_u64().unwrap() > 0);
    s.fsck();
}

#[test]
fn a_run_whose_lock_is_held_is_untouched() {
    let s = Scratch::new();
    let old = run_agent(&s, &tasks_doc(2), "write.sh", &[]);
    let child = start_hanging(&s, 2);
    let live = s.status_json()["run"]["id"].as_str().unwrap().to_string();
    assert_ne!(live, old);
    let refs_before = cohort_refs(&s);
    assert!(refs_before.iter().any(|r| r.contains(&live)));
    let out = s.run(&["gc", "--keep-runs", "0", "--older-than", "0s"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(stdout.contains(&format!("left run {live} alone")), "{stdout}");
    // The old run went; everything of the live one is as it was.
    assert!(!runs_dir(&s).join(&old).exists());
    let live_refs: BTreeSet<String> = refs_before.iter().filter(|r| r.contains(&live)).cloned().collect();
    assert_eq!(cohort_refs(&s), live_refs, "{stdout}");
    for r in &live_refs {
        let name = r.split(' ').next().unwrap();
        assert!(
            s.work.join(".git").join(name).is_file(),
            "{name} was not packed while its run holds it"
        );
    }
    assert!(runs_dir(&s).join(&live).join("lock").exists());
    assert_eq!(s.status_json()["run"]["id"], live.as_str());
    kill_9(&s, child);
    // Work a task had committed when cohort was killed: a commit the service branch lacks.
    let branch = live_refs.iter().next().unwrap().split(' ').next().unwrap().to_string();
    let tree = s.git(&["rev-parse", &format!("{branch}^{{tree}}")]);
    let commit = s.git(&["commit-tree", tree.trim(), "-p", &branch, "-m", "half done"]);
    s.git(&["update-ref", &branch, commit.trim()]);
    // Once no process holds it, the stopped run is abandoned and goes, unmerged work too.
    let out = s.run(&["gc", "--keep-runs", "0", "--older-than", "0s"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        stdout.contains(&format!("ref {branch} (its run was abandoned)")),
        "{stdout}"
    );
    assert!(cohort_refs(&s).is_empty());
    assert!(!runs_dir(&s).join(&live).exists());
    s.fsck();
    assert_eq!(s.git(&["worktree", "list"]).lines().count(), 1);
}

/// A branch whose task merged but that the service branch no longer contains (someone reset
/// it) is not collected, and its run keeps what `report` needs.
#[test]
fn merged_work_missing_from_the_service_branch_is_kept() {
    let s = Scratch::new();
    let run = run_agent(&s, "- precious\n", "write.sh", &[]);
    s.git(&["branch", "-f", "cohort/service", "main"]);
    let out = s.run(&["gc", "--keep-runs", "0", "--older-than", "0s"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(stdout.contains("no longer contains it"), "{stdout}");
    assert_eq!(cohort_refs(&s).len(), 1);
    let report = s.run(&["report", &run]);
    assert_eq!(code(&report), 0, "{}", text(&report));
    s.fsck();
}

/// `git count-objects -v` as a map (`count`, `in-pack`, `packs`, …).
fn count_objects(s: &Scratch) -> std::collections::BTreeMap<String, u64> {
    s.git(&["count-objects", "-v"])
        .lines()
        .filter_map(|l| l.split_once(": "))
        .filter_map(|(k, v)| Some((k.to_string(), v.trim().parse().ok()?)))
        .collect()
}

/// Loose objects reach the repository's `gc.auto`: gc packs them all into one new pack
/// (with its index) in-process and removes the loose files; every object is still there and
/// `git fsck` is clean. Below the threshold, or with `gc.auto` 0, they stay loose.
#[test]
fn gc_packs_loose_objects_past_gc_auto() {
    let s = Scratch::new();
    run_agent(&s, &tasks_doc(3), "write.sh", &[]);
    let before = count_objects(&s);
    let loose = before["count"];
    assert!(loose >= 10, "{before:?}");
    let ids: Vec<String> = files_under(&s.work.join(".git/objects"))
        .iter()
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?;
            let dir = p.parent()?.file_name()?.to_str()?;
            (dir.len() == 2 && name.len() == 38).then(|| format!("{dir}{name}"))
        })
        .collect();
    assert_eq!(ids.len() as u64, loose);

    // Off, then above the count: nothing is packed.
    for (auto, says) in [("0", "gc.auto is 0"), ("100000", "fewer than gc.auto")] {
        s.git(&["config", "gc.auto", auto]);
        let dry = s.run(&["gc", "--dry-run"]);
        assert!(String::from_utf8_lossy(&dry.stdout).contains(says), "{}", text(&dry));
        let out = s.run(&["gc"]);
        assert_eq!(code(&out), 0, "{}", text(&out));
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("loose object(s) into"),
            "{}",
            text(&out)
        );
        assert_eq!(count_objects(&s)["count"], loose);
    }

    s.git(&["config", "gc.auto", &loose.to_string()]);
    let dry = s.run(&["gc", "--dry-run"]);
    let dry_out = String::from_utf8_lossy(&dry.stdout).to_string();
    assert!(
        dry_out.contains(&format!("would pack {loose} loose object(s)")),
        "{dry_out}"
    );
    assert_eq!(count_objects(&s)["count"], loose, "a dry run packs nothing");

    let out = s.run(&["gc"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        stdout.contains(&format!("packed {loose} loose object(s) into ")),
        "{stdout}"
    );
    let after = count_objects(&s);
    assert_eq!(after["count"], 0, "{after:?}");
    assert_eq!(after["in-pack"], before["in-pack"] + loose, "{after:?}");
    assert_eq!(after["packs"], before["packs"] + 1, "{after:?}");
    assert_eq!(after["garbage"], 0, "{after:?}");
    // Every object that was loose is in the new pack, readable; the pack verifies.
    let packed = s.git(&["cat-file", "--batch-check=%(objectname)", "--batch-all-objects"]);
    let packed: BTreeSet<&str> = packed.lines().collect();
    for id in &ids {
        assert!(packed.contains(id.as_str()), "{id} went missing");
    }
    let pack = stdout
        .split("loose object(s) into ")
        .nth(1)
        .unwrap()
        .split(" (")
        .next()
        .unwrap();
    let idx = PathBuf::from(pack).with_extension("idx");
    assert!(idx.is_file(), "{stdout}");
    s.git(&["verify-pack", idx.to_str().unwrap()]);
    s.fsck();
    assert!(
        std::fs::read_dir(s.work.join(".git/objects"))
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().starts_with("cohort-pack-")),
        "no temporary directory is left"
    );
    // The repository goes on: another run writes, merges and packs again.
    run_agent(&s, "- one more\n", "write.sh", &[]);
    assert_eq!(s.status_json()["tasks"][0]["status"], "merged");
    s.fsck();
}

/// A ref that moves between gc's plan and its removal fails the batch's one transaction:
/// gc then goes run by run and ref by ref, keeps the moved ref (and its run's rows and
/// directory) and removes everything else it planned to.
#[test]
fn a_ref_moved_after_the_plan_is_kept_and_the_rest_goes() {
    let s = Scratch::new();
    let first = run_agent(&s, &tasks_doc(2), "write.sh", &[]);
    let second = run_agent(&s, &tasks_doc(2), "write.sh", &[]);
    let paths = cohort::git::RepoPaths::discover(&s.work).unwrap();
    let state = cohort::run::state::State::open(&cohort::run::state_path(&paths)).unwrap();
    let opts = cohort::run::gc::GcOptions {
        keep_runs: 0,
        older_than: Duration::ZERO,
    };
    let plan = cohort::run::gc::plan(&paths, &state, opts, std::time::SystemTime::now()).unwrap();
    let refs = cohort_refs(&s);
    let moved = refs
        .iter()
        .map(|r| r.split(' ').next().unwrap().to_string())
        .find(|name| name.contains(&first))
        .unwrap();
    s.git(&["update-ref", &moved, "main"]);
    let done = cohort::run::gc::apply(&paths, &state, &plan).unwrap();
    assert!(
        done.skipped
            .iter()
            .any(|(run, why)| run == &first && why.contains("moved since")),
        "{:?}",
        done.skipped
    );
    let left: Vec<String> = cohort_refs(&s).into_iter().collect();
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].starts_with(&format!("{moved} ")), "{left:?}");
    assert!(
        runs_dir(&s).join(&first).exists(),
        "the run with a kept ref keeps its directory"
    );
    assert!(!runs_dir(&s).join(&second).exists());
    assert!(state.run(Some(&first)).unwrap().is_some());
    assert!(state.run(Some(&second)).unwrap().is_none());
    s.fsck();
}

/// `gc --dry-run --json`: the same plan as the text listing, as one JSON document; nothing
/// changes. `--json` without `--dry-run` is a usage error.
#[test]
fn dry_run_json_lists_what_the_text_listing_lists() {
    let s = Scratch::new();
    let old = run_agent(&s, &tasks_doc(2), "write.sh", &[]);
    let new = run_agent(&s, &tasks_doc(1), "write.sh", &[]);
    let args = ["gc", "--keep-runs", "1", "--older-than", "0s", "--dry-run"];
    let text_out = s.run(&args);
    let text_refs = listed_refs(&String::from_utf8_lossy(&text_out.stdout));
    let refs_before = cohort_refs(&s);
    let out = s.run(&[&args[..], &["--json"]].concat());
    assert_eq!(code(&out), 0, "{}", text(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let runs = doc["runs"].as_array().unwrap();
    let by_id = |id: &str| runs.iter().find(|r| r["run_id"] == id).unwrap().clone();
    assert_eq!(by_id(&old)["remove"], true);
    assert_eq!(by_id(&new)["remove"], false);
    let json_refs: BTreeSet<String> = runs
        .iter()
        .flat_map(|r| r["items"].as_array().unwrap().clone())
        .filter(|i| i["kind"] == "ref")
        .map(|i| i["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(json_refs, text_refs);
    assert_eq!(json_refs.len(), 2, "{doc}");
    assert!(doc["objects"]["loose"].as_u64().unwrap() > 0, "{doc}");
    assert_eq!(cohort_refs(&s), refs_before, "a dry run changes nothing");
    let bad = s.run(&["gc", "--json"]);
    assert_eq!(code(&bad), 2, "{}", text(&bad));
}

/// A temporary pack directory a killed gc left (nothing written in it for over an hour) goes
/// at the next gc, packing on or off; one being written (fresh) stays.
#[test]
fn gc_removes_what_a_killed_gc_left_of_a_pack() {
    let s = Scratch::new();
    run_agent(&s, "- one task\n", "write.sh", &[]);
    s.git(&["config", "gc.auto", "0"]);
    let objects = s.work.join(".git/objects");
    let (stale, fresh) = (objects.join("cohort-pack-killed"), objects.join("cohort-pack-busy"));
    for d in [&stale, &fresh] {
        std::fs::create_dir(d).unwrap();
        std::fs::write(d.join("stream.pack"), "PACK").unwrap();
    }
    for p in [stale.join("stream.pack"), stale.clone()] {
        let status = std::process::Command::new("touch")
            .args(["-h", "-d", "2 hours ago"])
            .arg(&p)
            .status()
            .unwrap();
        assert!(status.success());
    }
    let out = s.run(&["gc"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(text(&out).contains("removed 1 temporary pack"), "{}", text(&out));
    assert!(!stale.exists(), "the killed gc's directory is gone");
    assert!(
        fresh.join("stream.pack").is_file(),
        "a directory written a moment ago stays"
    );
    s.fsck();
}
