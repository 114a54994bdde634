//! Merges into the service branch from many writers at once: each moves the
//! branch only by compare-and-swap and redoes its merge on the new tip when
//! it lost the race, so none is lost. (Within one cohort process merges are
//! serialised; this is the guard against other processes.)

mod support;
use cohort::git::{self, merge};
use support::*;

#[test]
fn concurrent_merges_from_many_writers_keep_every_one() {
    const WRITERS: usize = 6;
    const EACH: usize = 5;
    let s = Scratch::new();
    s.git(&["branch", "service"]);
    let mut tips = Vec::new();
    for i in 0..WRITERS * EACH {
        s.git(&["checkout", "-q", "-b", &format!("b{i}"), "main"]);
        s.write(&format!("f{i}.txt"), &format!("{i}\n"));
        s.git(&["add", "."]);
        s.git(&["commit", "-q", "-m", &format!("change {i}")]);
        tips.push(s.git(&["rev-parse", "HEAD"]).trim().parse::<git::Oid>().unwrap());
    }
    s.git(&["checkout", "-q", "main"]);

    let paths = git::RepoPaths::discover(&s.work).unwrap();
    let start = std::sync::Barrier::new(WRITERS);
    std::thread::scope(|scope| {
        for w in 0..WRITERS {
            let (paths, tips, start) = (&paths, &tips, &start);
            scope.spawn(move || {
                let repo = paths.open().unwrap(); // a handle of its own, as another process has
                start.wait();
                for &tip in &tips[w * EACH..(w + 1) * EACH] {
                    let out = merge::merge_into(&repo, "refs/heads/service", tip, &format!("Merge {tip}")).unwrap();
                    assert!(matches!(out, merge::MergeOutcome::Merged { .. }), "{out:?}");
                }
            });
        }
    });

    let merges = s.git(&["rev-list", "--first-parent", "--merges", "service"]);
    assert_eq!(merges.lines().count(), WRITERS * EACH, "one merge commit per branch");
    let files = s.git(&["ls-tree", "--name-only", "service"]);
    for i in 0..WRITERS * EACH {
        assert!(files.contains(&format!("f{i}.txt")), "change {i} lost: {files}");
    }
    s.fsck();
}
