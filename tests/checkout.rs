//! Moving reused checkouts between trees writes the right files, through
//! both the fast path (known clean tree) and the repair path (dirty disk).

mod support;
use cohort::git::{self, pool::Pool, refs};
use std::sync::Arc;
use support::*;

/// Commits a tree shape on a new branch and returns its commit id.
fn commit_shape(s: &Scratch, branch: &str, files: &[(&str, &str)]) -> git::Oid {
    s.git(&["checkout", "-q", "--orphan", branch]);
    s.git(&["rm", "-rq", "--cached", "."]);
    for e in std::fs::read_dir(&s.work).unwrap().flatten() {
        if e.file_name() != ".git" {
            let p = e.path();
            if p.is_dir() {
                std::fs::remove_dir_all(p).unwrap()
            } else {
                std::fs::remove_file(p).unwrap()
            }
        }
    }
    for (p, c) in files {
        s.write(p, c);
    }
    s.git(&["add", "-A"]);
    s.git(&["commit", "-q", "-m", branch]);
    s.git(&["rev-parse", "HEAD"]).trim().parse().unwrap()
}

/// A checkout leased from a new pool, with branch `t` at `at` (the
/// checkout itself is not prepared yet).
struct Leased {
    repo: gix::Repository,
    pool: Arc<Pool>,
    co: git::pool::Lease,
}

fn lease(s: &Scratch, at: git::Oid) -> Leased {
    let paths = git::RepoPaths::discover(&s.work).unwrap();
    let pool = Arc::new(Pool::new(&paths.common_dir, "test-run", s.tmp.path().join("pool")));
    let co = pool.lease().unwrap();
    let repo = paths.open().unwrap();
    refs::cas(&repo, "refs/heads/t", None, at, "test").unwrap();
    Leased { repo, pool, co }
}

fn assert_matches(checkout: &std::path::Path, files: &[(&str, &str)]) {
    let status = git_in(checkout, &["status", "--porcelain", "--untracked-files=all"]);
    assert_eq!(status, "", "checkout differs from its commit");
    for (p, c) in files {
        assert_eq!(std::fs::read_to_string(checkout.join(p)).unwrap(), *c, "{p}");
    }
}

/// What cohort's own index of the checkout (in its admin dir, which the agent never sees) says
/// differs from the files: changed and untracked paths. Empty when they match exactly.
fn cohort_status(co: &git::pool::Checkout) -> String {
    let dir = co.path.parent().unwrap();
    let (gd, wt) = (co.admin.display().to_string(), co.path.display().to_string());
    let changed = git_in(dir, &["--git-dir", &gd, "--work-tree", &wt, "diff", "--name-only"]);
    let untracked = git_in(dir, &["--git-dir", &gd, "--work-tree", &wt, "ls-files", "--others"]);
    changed + &untracked
}

/// The tree of cohort's index of the checkout equals `commit`'s.
fn index_holds(co: &git::pool::Checkout, commit: git::Oid) -> bool {
    let dir = co.path.parent().unwrap();
    let gd = co.admin.display().to_string();
    let tree = git_in(dir, &["--git-dir", &gd, "write-tree"]);
    let want = git_in(dir, &["--git-dir", &gd, "rev-parse", &format!("{commit}^{{tree}}")]);
    tree == want
}

#[test]
fn checkouts_move_between_trees_by_both_paths() {
    let s = Scratch::new();
    let a_files = [
        ("a.txt", "a\n"),
        ("dir/x.txt", "x\n"),
        ("dir/sub/y.txt", "y\n"),
        ("thing", "file\n"),
        ("same.txt", "unchanged\n"),
        ("dir/same2.txt", "unchanged too\n"),
    ];
    let b_files = [
        ("a.txt", "a2\n"),
        ("dir/z.txt", "z\n"),
        ("thing/inner.txt", "now a dir\n"),
        ("new/deep/n.txt", "n\n"),
        ("same.txt", "unchanged\n"),
        ("dir/same2.txt", "unchanged too\n"),
    ];
    let a = commit_shape(&s, "shape-a", &a_files);
    let b = commit_shape(&s, "shape-b", &b_files);
    s.git(&["checkout", "-q", "main"]);

    let Leased { repo, pool, co, .. } = lease(&s, a);

    // First use: every file written.
    co.prepare("refs/heads/t", a).unwrap();
    assert_matches(&co.path, &a_files);
    // Commit (nothing changed), which marks it clean; then move by tree diff.
    let tc = git::commit::commit_all(&co, "refs/heads/t", a, "m", Default::default()).unwrap();
    assert!(tc.is_empty());
    assert!(co.admin.join(git::pool::CLEAN_MARK).exists());
    refs::cas(&repo, "refs/heads/t", Some(a), b, "test").unwrap();
    // Unchanged files get an old mtime: a rewrite would give them a new one.
    let old = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
    let mtime = |p: &str| std::fs::metadata(co.path.join(p)).unwrap().modified().unwrap();
    for p in ["same.txt", "dir/same2.txt"] {
        let f = std::fs::OpenOptions::new().write(true).open(co.path.join(p)).unwrap();
        f.set_modified(old).unwrap();
    }
    let stats = co.prepare("refs/heads/t", b).unwrap();
    assert_matches(&co.path, &b_files);
    assert_eq!(stats.written, 4, "only changed files are written: {stats:?}");
    assert_eq!(stats.removed, 3, "{stats:?}"); // dir/x.txt, dir/sub/y.txt, the file `thing`
    assert_eq!(
        (mtime("same.txt"), mtime("dir/same2.txt")),
        (old, old),
        "unchanged files are not rewritten"
    );
    assert!(!co.path.join("dir/sub").exists(), "emptied directories are removed");

    // Repair path: dirty the disk as a crashed agent would, no clean mark.
    std::fs::write(co.path.join("a.txt"), "scribbled\n").unwrap();
    std::fs::write(co.path.join("junk.txt"), "junk\n").unwrap();
    std::fs::remove_file(co.path.join("dir/z.txt")).unwrap();
    std::fs::create_dir_all(co.path.join("junkdir/more")).unwrap();
    std::fs::write(co.path.join("junkdir/more/f"), "f\n").unwrap();
    std::fs::remove_file(co.path.join(".git")).unwrap();
    refs::cas(&repo, "refs/heads/t", Some(b), a, "test").unwrap();
    co.prepare("refs/heads/t", a).unwrap();
    assert_matches(&co.path, &a_files);
    assert!(!co.path.join("junk.txt").exists() && !co.path.join("junkdir").exists());

    drop(co);
    pool.remove_all().unwrap();
    for d in ["checkouts", "admin", "gitdirs"] {
        assert!(!s.tmp.path().join("pool").join(d).exists(), "{d}");
    }
    assert_eq!(s.git(&["worktree", "list"]).lines().count(), 1);
}

/// Committing what an agent changed updates the checkout's index in place
/// (the fast path) and leaves it exactly matching the commit; an agent that
/// staged things itself takes the slow path with the same result.
#[test]
fn commits_update_the_index_in_place_and_stay_clean() {
    use std::os::unix::fs::PermissionsExt;
    let s = Scratch::new();
    let a_files = [
        ("a.txt", "a\n"),
        ("dir/x.txt", "x\n"),
        ("gone.txt", "g\n"),
        ("thing", "file\n"),
    ];
    let a = commit_shape(&s, "shape-a", &a_files);
    s.git(&["checkout", "-q", "main"]);
    let Leased { pool, co, .. } = lease(&s, a);
    co.prepare("refs/heads/t", a).unwrap();

    // What an agent might do, without touching the index.
    std::fs::write(co.path.join("a.txt"), "changed\n").unwrap();
    std::fs::remove_file(co.path.join("gone.txt")).unwrap();
    std::fs::write(co.path.join("new.txt"), "new\n").unwrap();
    std::fs::create_dir_all(co.path.join("new/deep")).unwrap();
    std::fs::write(co.path.join("new/deep/n.txt"), "n\n").unwrap();
    std::fs::write(co.path.join("run.sh"), "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(co.path.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("a.txt", co.path.join("link")).unwrap();
    std::fs::remove_file(co.path.join("thing")).unwrap();

    let tc = git::commit::commit_all(&co, "refs/heads/t", a, "m", Default::default()).unwrap();
    let tree = s.git(&["ls-tree", "-r", "--format=%(objectmode) %(path)", "t"]);
    assert_eq!(
        tree,
        "100644 a.txt\n100644 dir/x.txt\n120000 link\n100644 new.txt\n100644 new/deep/n.txt\n100755 run.sh\n"
    );
    assert_eq!(tc.files_changed.len(), 7, "{:?}", tc.files_changed);
    assert_eq!(cohort_status(&co), "", "index and files match the commit");
    assert!(index_holds(&co, tc.tip));

    // An agent that stages by itself (in its private index): the same result.
    let tip = tc.tip;
    co.prepare("refs/heads/t", tip).unwrap();
    assert_matches(&co.path, &[("a.txt", "changed\n")]);
    std::fs::write(co.path.join("a.txt"), "staged\n").unwrap();
    git_in(&co.path, &["add", "a.txt"]);
    std::fs::write(co.path.join("b.txt"), "unstaged\n").unwrap();
    let tc = git::commit::commit_all(&co, "refs/heads/t", tip, "m2", Default::default()).unwrap();
    assert_eq!(tc.files_changed, ["a.txt", "b.txt"]);
    assert_eq!(cohort_status(&co), "");
    assert!(index_holds(&co, tc.tip));
    // Nothing changed since: an empty commit step, still clean.
    let again = git::commit::commit_all(&co, "refs/heads/t", tc.tip, "m3", Default::default()).unwrap();
    assert!(again.is_empty() && again.tip == tc.tip);

    drop(co);
    pool.remove_all().unwrap();
}

/// An agent that replaces a tracked file with a directory of the same name: the files in it
/// are committed, on the fast path and on the slow one (the agent also staged something).
#[test]
fn a_file_replaced_by_a_directory_is_committed_with_its_contents() {
    let s = Scratch::new();
    let a_files = [("a.txt", "a\n"), ("thing", "file\n"), ("other", "o\n")];
    let a = commit_shape(&s, "shape-a", &a_files);
    s.git(&["checkout", "-q", "main"]);
    let Leased { pool, co, .. } = lease(&s, a);
    co.prepare("refs/heads/t", a).unwrap();
    let ls = |repo: &std::path::Path| git_in(repo, &["ls-tree", "-r", "--format=%(path)", "t"]);

    std::fs::remove_file(co.path.join("thing")).unwrap();
    std::fs::create_dir_all(co.path.join("thing/deep")).unwrap();
    std::fs::write(co.path.join("thing/inner.txt"), "i\n").unwrap();
    std::fs::write(co.path.join("thing/deep/d.txt"), "d\n").unwrap();
    let tc = git::commit::commit_all(&co, "refs/heads/t", a, "m", Default::default()).unwrap();
    assert_eq!(ls(&s.work), "a.txt\nother\nthing/deep/d.txt\nthing/inner.txt\n");
    assert_eq!(tc.files_changed.len(), 3, "{:?}", tc.files_changed);
    assert_eq!(cohort_status(&co), "");

    // The slow path: the agent staged a change itself.
    let tip = tc.tip;
    co.prepare("refs/heads/t", tip).unwrap();
    std::fs::write(co.path.join("a.txt"), "staged\n").unwrap();
    git_in(&co.path, &["add", "a.txt"]);
    std::fs::remove_file(co.path.join("other")).unwrap();
    std::fs::create_dir(co.path.join("other")).unwrap();
    std::fs::write(co.path.join("other/o.txt"), "o2\n").unwrap();
    let tc = git::commit::commit_all(&co, "refs/heads/t", tip, "m2", Default::default()).unwrap();
    assert_eq!(ls(&s.work), "a.txt\nother/o.txt\nthing/deep/d.txt\nthing/inner.txt\n");
    assert_eq!(tc.files_changed, ["a.txt", "other", "other/o.txt"]);
    assert_eq!(cohort_status(&co), "");

    drop(co);
    pool.remove_all().unwrap();
}

/// A pool checkout goes to its next task holding its tree and nothing else:
/// ignored files an agent made are removed by the commit step (fast and full
/// paths) and by the repair of a dirty checkout, so they cannot reach a later
/// task's commit once no `.gitignore` covers them.
#[test]
fn ignored_files_do_not_outlive_their_task() {
    let s = Scratch::new();
    let a = commit_shape(&s, "shape-a", &[("a.txt", "a\n"), (".gitignore", "*.log\nbuild/\n")]);
    s.git(&["checkout", "-q", "main"]);
    let Leased { repo, pool, co, .. } = lease(&s, a);
    co.prepare("refs/heads/t", a).unwrap();

    // Fast path: the agent changed files but not the index.
    std::fs::write(co.path.join("notes.log"), "private notes\n").unwrap();
    std::fs::create_dir_all(co.path.join("build/deep")).unwrap();
    std::fs::write(co.path.join("build/deep/out.o"), "object\n").unwrap();
    std::fs::write(co.path.join("work.txt"), "work\n").unwrap();
    let tc = git::commit::commit_all(&co, "refs/heads/t", a, "m", Default::default()).unwrap();
    assert_eq!(tc.files_changed, ["work.txt"]);
    assert!(!co.path.join("notes.log").exists() && !co.path.join("build").exists());

    // Full path: the agent staged something itself.
    co.prepare("refs/heads/t", tc.tip).unwrap();
    std::fs::write(co.path.join("again.log"), "more notes\n").unwrap();
    std::fs::write(co.path.join("a.txt"), "staged\n").unwrap();
    git_in(&co.path, &["add", "a.txt"]);
    let tc = git::commit::commit_all(&co, "refs/heads/t", tc.tip, "m2", Default::default()).unwrap();
    assert_eq!(tc.files_changed, ["a.txt"]);
    assert!(!co.path.join("again.log").exists());

    // Repair path: a dead agent left an ignored file; the next task's tree
    // has no .gitignore, and its commit must not pick the file up.
    std::fs::write(co.path.join("left.log"), "left by a dead agent\n").unwrap();
    std::fs::write(co.admin.join(git::pool::CLEAN_MARK), "").unwrap(); // as `prepare` leaves it
    let bare = commit_shape(&s, "shape-b", &[("a.txt", "a\n")]);
    s.git(&["checkout", "-q", "main"]);
    refs::cas(&repo, "refs/heads/t", Some(tc.tip), bare, "test").unwrap();
    co.prepare("refs/heads/t", bare).unwrap();
    assert!(!co.path.join("left.log").exists());
    let tc = git::commit::commit_all(&co, "refs/heads/t", bare, "m3", Default::default()).unwrap();
    assert!(tc.is_empty(), "{:?}", tc.files_changed);

    drop(co);
    pool.remove_all().unwrap();
}

/// A killed cohort leaves lock files in its admin dir, and a killed agent's git leaves half-done
/// operations and locks in its private git dir; the commit step and the next task's checkout
/// cope with both.
#[test]
fn stale_locks_and_unfinished_operations_are_cleared() {
    let s = Scratch::new();
    let a = commit_shape(&s, "shape-a", &[("a.txt", "a\n")]);
    s.git(&["checkout", "-q", "main"]);
    let Leased { pool, co, .. } = lease(&s, a);
    co.prepare("refs/heads/t", a).unwrap();

    std::fs::write(co.path.join("a.txt"), "work\n").unwrap();
    std::fs::write(co.admin.join("index.lock"), "").unwrap();
    std::fs::write(co.admin.join("HEAD.lock"), "").unwrap();
    std::fs::write(co.git_dir.join("index.lock"), "").unwrap();
    let tc = git::commit::commit_all(&co, "refs/heads/t", a, "m", Default::default()).unwrap();
    assert_eq!(tc.files_changed, ["a.txt"]);

    std::fs::write(co.admin.join("index.lock"), "").unwrap();
    std::fs::write(co.git_dir.join("MERGE_HEAD"), format!("{a}\n")).unwrap();
    std::fs::create_dir_all(co.git_dir.join("rebase-merge")).unwrap();
    co.prepare("refs/heads/t", tc.tip).unwrap();
    for leftover in ["MERGE_HEAD", "rebase-merge", "index.lock"] {
        assert!(!co.git_dir.join(leftover).exists(), "{leftover}");
    }
    assert_eq!(git_in(&co.path, &["status", "--porcelain"]), "");

    drop(co);
    pool.remove_all().unwrap();
}

/// Commits an agent made on a detached HEAD (or another branch) that build
/// on the task branch end up on the task branch.
#[test]
fn an_agents_detached_commits_are_kept() {
    let s = Scratch::new();
    let a = commit_shape(&s, "shape-a", &[("a.txt", "a\n")]);
    s.git(&["checkout", "-q", "main"]);
    let Leased { pool, co, .. } = lease(&s, a);
    co.prepare("refs/heads/t", a).unwrap();

    git_in(&co.path, &["checkout", "-q", "--detach"]);
    std::fs::write(co.path.join("b.txt"), "b\n").unwrap();
    git_in(&co.path, &["add", "b.txt"]);
    git_in(&co.path, &["commit", "-q", "-m", "agent on a detached HEAD"]);
    let agent_commit = git_in(&co.path, &["rev-parse", "HEAD"]).trim().to_string();
    std::fs::write(co.path.join("c.txt"), "c\n").unwrap();

    let tc = git::commit::commit_all(&co, "refs/heads/t", a, "task", Default::default()).unwrap();
    assert_eq!(tc.files_changed, ["b.txt", "c.txt"]);
    assert_eq!(s.git(&["rev-parse", &format!("{}^", tc.tip)]).trim(), agent_commit);
    // The agent's commit object came into the repository, checked; the next task's git dir
    // is on its branch again.
    assert_eq!(s.git(&["cat-file", "-t", &agent_commit]).trim(), "commit");
    co.prepare("refs/heads/t", tc.tip).unwrap();
    assert_eq!(git_in(&co.path, &["symbolic-ref", "HEAD"]).trim(), "refs/heads/t");
    assert_eq!(git_in(&co.path, &["rev-parse", "HEAD"]).trim(), tc.tip.to_string());

    drop(co);
    pool.remove_all().unwrap();
}

#[test]
fn a_pool_with_a_seed_copies_the_third_checkout_exactly_and_moves_it_by_a_diff() {
    let s = Scratch::new();
    let files = [
        ("a.txt", "a\n"),
        ("dir/b.txt", "b\n"),
        ("dir/deeper/c.sh", "#!/bin/sh\n"),
    ];
    let one = commit_shape(&s, "one", &files);
    let two = commit_shape(
        &s,
        "two",
        &[("a.txt", "a2\n"), ("dir/b.txt", "b\n"), ("new.txt", "n\n")],
    );
    let paths = git::RepoPaths::discover(&s.work).unwrap();
    let base = s.tmp.path().join("pool");
    let pool = Arc::new(Pool::new(&paths.common_dir, "seeded", base.clone()).with_seed());
    // The first is written, the second builds the seed (at `one`) and is copied from it.
    let first = pool.lease().unwrap();
    first.prepare("refs/heads/t1", one).unwrap();
    assert!(!base.join("checkouts/seed").exists());
    let second = pool.lease().unwrap();
    second.prepare("refs/heads/t2", one).unwrap();
    assert!(base.join("checkouts/seed/dir/deeper/c.sh").is_file());
    // The third is copied from the seed at `one`, then moved by a diff to `two`.
    let third = pool.lease().unwrap();
    let moved = third.prepare("refs/heads/t3", two).unwrap();
    assert_eq!(moved.written + moved.removed, 3, "{moved:?}");
    assert_matches(
        &third.path,
        &[("a.txt", "a2\n"), ("dir/b.txt", "b\n"), ("new.txt", "n\n")],
    );
    assert!(!third.path.join("dir/deeper").exists());
    assert_eq!(cohort_status(&third), "");
    assert_eq!(cohort_status(&second), "");
    assert_matches(&second.path, &files);
}
