//! `cohort gc` on the image builder's blob store: the blobs no recorded tag uses go (listed
//! with their bytes by `--dry-run`, which changes nothing), every tagged image's blobs stay,
//! and a build holding the store's lock makes gc leave the store alone.

mod support;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use support::*;

fn blob_files(store: &Path) -> BTreeSet<PathBuf> {
    files_under(store).into_iter().collect()
}

/// The `blob sha256:…` lines of gc's output.
fn listed_blobs(out: &str) -> BTreeSet<String> {
    out.lines()
        .filter_map(|l| l.trim_start().strip_prefix("blob "))
        .map(|l| l.split(' ').next().unwrap().to_string())
        .collect()
}

#[test]
fn gc_removes_the_image_blobs_no_tag_uses() {
    let s = Scratch::new();
    let cache = s.tmp.path().join("cache");
    let store_dir = cache.join("cohort/image/blobs");
    let store = cohort_oci::BlobStore::open(&store_dir).unwrap();
    // Two small images built and tagged as `image build` does it: `a` twice (a file changed
    // between), `b` once from a's first content.
    let file = s.tmp.path().join("hello.txt");
    std::fs::write(&file, "hello\n").unwrap();
    let mut spec = cohort_oci::BuildSpec {
        programs: vec![PathBuf::from("/bin/sh")],
        files: vec![(file.clone(), "/opt/app/hello.txt".into())],
        source_date_epoch: 1_700_000_000,
        ..Default::default()
    };
    let first = cohort_oci::build(&spec, &store).unwrap();
    store.tag("localhost/a:1", &first).unwrap();
    spec.settings.labels.insert("which".into(), "b".into());
    let b = cohort_oci::build(&spec, &store).unwrap();
    store.tag("localhost/b:1", &b).unwrap();
    std::fs::write(&file, "changed\n").unwrap();
    spec.settings.labels.clear();
    let second = cohort_oci::build(&spec, &store).unwrap();
    store.tag("localhost/a:1", &second).unwrap();
    // Only a's first manifest and config are left unnamed: its layers are b's too.
    let gone: BTreeSet<String> = [first.manifest_digest.clone(), first.config_digest.clone()].into();
    let gc = |extra: &[&str]| {
        let out = s
            .cohort()
            .env("XDG_CACHE_HOME", &cache)
            .args(["gc"])
            .args(extra)
            .output()
            .unwrap();
        assert_eq!(code(&out), 0, "{}", text(&out));
        String::from_utf8_lossy(&out.stdout).to_string()
    };

    let before = blob_files(&store_dir);
    let dry = gc(&["--dry-run"]);
    assert_eq!(listed_blobs(&dry), gone, "{dry}");
    assert!(dry.contains("(2 tag(s) recorded): would remove 2 item(s)"), "{dry}");
    assert_eq!(blob_files(&store_dir), before, "a dry run changes nothing");

    // A build in progress holds the store's lock shared: gc leaves the store alone.
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(cache.join("cohort/image/blobs.lock"))
        .unwrap();
    // SAFETY: flock is plain data; zero is "the whole file".
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_RDLCK as i16;
    nix::fcntl::fcntl(&lock, nix::fcntl::FcntlArg::F_OFD_SETLK(&fl)).unwrap();
    let busy = gc(&[]);
    assert!(busy.contains("an image build is in progress; left alone"), "{busy}");
    assert_eq!(blob_files(&store_dir), before);
    drop(lock);

    let out = gc(&[]);
    assert_eq!(listed_blobs(&out), gone, "{out}");
    for d in &gone {
        assert!(!store.contains(d), "{d} is gone");
    }
    for image in [&second, &b] {
        assert!(store.contains(&image.manifest_digest) && store.contains(&image.config_digest));
        for l in &image.layers {
            assert!(store.contains(&l.digest));
        }
        // What stays is whole: each tagged image still writes as an archive.
        cohort_oci::write_oci_archive(&store, image, "x", &s.tmp.path().join("x.tar"), 0).unwrap();
    }
    let again = gc(&["--dry-run"]);
    assert!(listed_blobs(&again).is_empty(), "{again}");
}

/// A store written before tags were recorded has no index: every blob would look unused, so
/// gc leaves it alone and says how to record the tag.
#[test]
fn a_store_without_recorded_tags_is_left_alone() {
    let s = Scratch::new();
    let cache = s.tmp.path().join("cache");
    let store_dir = cache.join("cohort/image/blobs");
    let store = cohort_oci::BlobStore::open(&store_dir).unwrap();
    let (digest, _) = store.put(b"a layer of an older build").unwrap();
    let out = s.cohort().env("XDG_CACHE_HOME", &cache).args(["gc"]).output().unwrap();
    assert_eq!(code(&out), 0, "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("no tag recorded"), "{stdout}");
    assert!(store.contains(&digest));
}
