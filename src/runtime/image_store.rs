//! cohort's image blob store (`$XDG_CACHE_HOME/cohort/image/blobs`, an OCI image layout):
//! `image build` records each tag it builds in the store's `index.json`, and `gc` removes the
//! blobs no recorded tag uses.
//!
//! A build and a gc exclude each other through one lock file next to the store: a build
//! holds it shared from before it writes (or reuses) its first blob until its tag is
//! recorded, and gc takes it exclusively, without waiting (a build in progress makes gc
//! leave the store alone). Without it gc could remove a layer a build has just written, or
//! is about to reuse from the layer cache, before the tag that names it is recorded, and the
//! build would then write a manifest naming a missing blob. Temporary files are removed only
//! when over an hour old as well: a writer that does not take the lock (an older cohort)
//! keeps its file in progress.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use cohort_oci::{BlobStore, BuiltImage, Unused};

/// Temporary files younger than this may be a write in progress.
const TEMP_AGE: Duration = Duration::from_secs(3600);

/// Held by a build while its blobs are not yet named by its tag.
pub struct BuildLock(#[allow(dead_code)] File);

fn lock_file(store_dir: &Path, suffix: &str) -> Result<(File, PathBuf)> {
    let path = store_dir.with_extension(suffix);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    Ok((file, path))
}

/// Takes the store's lock shared (waiting for a gc that holds it).
pub fn lock_for_build(store_dir: &Path) -> Result<BuildLock> {
    if let Some(parent) = store_dir.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let (file, path) = lock_file(store_dir, "lock")?;
    crate::lockfile::try_lock_shared(&file, true).with_context(|| format!("cannot lock {}", path.display()))?;
    Ok(BuildLock(file))
}

/// Records `image` as `tag`'s in the store's index, one writer at a time (two builds of
/// different tags would otherwise each rewrite the index from the same earlier read).
pub fn record_tag(store: &BlobStore, tag: &str, image: &BuiltImage) -> Result<()> {
    let (file, path) = lock_file(store.root(), "index-lock")?;
    crate::lockfile::try_lock(&file, true).with_context(|| format!("cannot lock {}", path.display()))?;
    store
        .tag(tag, image)
        .with_context(|| format!("cannot record {tag} in {}", store.root().display()))
}

/// What `collect` found.
#[derive(Debug)]
pub enum Collected {
    /// No store: no image was ever built here.
    NoStore,
    /// A build holds the store: nothing was touched.
    Busy,
    /// Blobs but no recorded tag (all built before tags were recorded): nothing was touched,
    /// since every blob would look unused.
    NoTags { blobs: usize },
    /// What no tag uses (removed unless it was a dry run), and how many tags are recorded.
    Unused {
        tags: usize,
        items: Vec<Unused>,
        bytes: u64,
    },
}

/// Removes (or with `dry_run` lists) what in the store at `store_dir` no recorded tag uses.
pub fn collect(store_dir: &Path, dry_run: bool) -> Result<Collected> {
    if !store_dir.join("blobs").is_dir() {
        return Ok(Collected::NoStore);
    }
    let (file, path) = lock_file(store_dir, "lock")?;
    if !crate::lockfile::try_lock(&file, false).with_context(|| format!("cannot lock {}", path.display()))? {
        return Ok(Collected::Busy);
    }
    let store = BlobStore::open(store_dir).with_context(|| format!("cannot open {}", store_dir.display()))?;
    if !store.has_index() {
        let blobs = std::fs::read_dir(store_dir.join("blobs/sha256"))
            .map(|rd| rd.count())
            .unwrap_or(0);
        return Ok(Collected::NoTags { blobs });
    }
    let tags = store.tags().context("cannot read the image store's index.json")?.len();
    let items = store
        .unused(TEMP_AGE, SystemTime::now())
        .with_context(|| format!("cannot list {}", store_dir.display()))?;
    let bytes = items.iter().map(|u| u.bytes).sum();
    if !dry_run {
        store
            .remove_unused(&items)
            .with_context(|| format!("cannot remove unused blobs from {}", store_dir.display()))?;
    }
    Ok(Collected::Unused { tags, items, bytes })
}
