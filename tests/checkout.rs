//! Moving reused checkouts between trees writes the right files, through
//! both the fast path (known clean tree) and the repair path (dirty disk).

mod support;
use cohort::git::{self, pool::Pool, refs};
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

fn assert_matches(checkout: &std::path::Path, files: &[(&str, &str)]) {
    let status = git_in(checkout, &["status", "--porcelain", "--untracked-files=all"]);
    assert_eq!(status, "", "checkout differs from its commit");
    for (p, c) in files {
        assert_eq!(std::fs::read_to_string(checkout.join(p)).unwrap(), *c, "{p}");
    }
}

#[test]
fn checkouts_move_between_trees_by_both_paths() {
    let s = Scratch::new();
    let a_files = [
        ("a.txt", "a\n"),
        ("dir/x.txt", "x\n"),
        ("dir/sub/y.txt", "y\n"),
        ("thing", "file\n"),
    ];
    let b_files = [
        ("a.txt", "a2\n"),
        ("dir/z.txt", "z\n"),
        ("thing/inner.txt", "now a dir\n"),
        ("new/deep/n.txt", "n\n"),
    ];
    let a = commit_shape(&s, "shape-a", &a_files);
    let b = commit_shape(&s, "shape-b", &b_files);
    s.git(&["checkout", "-q", "main"]);

    let paths = git::RepoPaths::discover(&s.work).unwrap();
    let pool = Pool::new(&paths.common_dir, "test-run", s.tmp.path().join("pool"));
    let co = pool.lease().unwrap();
    let repo = paths.open().unwrap();
    refs::cas(&repo, "refs/heads/t", None, a, "test").unwrap();

    // First use: every file written.
    co.prepare("refs/heads/t", a).unwrap();
    assert_matches(&co.path, &a_files);
    // Commit (nothing changed), which marks it clean; then move by tree diff.
    let tc = git::commit::commit_all(&co, "refs/heads/t", a, "m").unwrap();
    assert!(tc.is_empty());
    assert!(co.admin.join(git::pool::CLEAN_MARK).exists());
    refs::cas(&repo, "refs/heads/t", Some(a), b, "test").unwrap();
    let stats = co.prepare("refs/heads/t", b).unwrap();
    assert_matches(&co.path, &b_files);
    assert!(stats.written <= 4, "only changed files are written: {stats:?}");
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

    pool.release(co);
    pool.remove_all().unwrap();
    assert!(!s.tmp.path().join("pool").exists());
    assert_eq!(s.git(&["worktree", "list"]).lines().count(), 1);
}
