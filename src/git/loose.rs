//! The object side of `cohort gc`: when there are many loose objects, all of them go into one
//! new pack (with its index), in-process with gix-pack, and the loose files that are then
//! packed are removed, as `git repack -d` followed by `git prune-packed` would.
//!
//! Every loose object is packed, reachable or not: the simplest safe form. Nothing is ever
//! pruned. Deciding an object is unreachable needs every root git knows (all refs, every
//! reflog entry, each worktree's HEAD and index, objects a concurrent process wrote a moment
//! ago and has not yet named); miss one and work is lost. Unreachable objects (those the
//! refs gc deleted held) stay, packed, until git's own `gc` prunes them after its grace period.
//!
//! The order keeps the repository whole at every step, as git's does: the pack and its index
//! are written under temporary names (indexing re-reads and checks every entry), flushed to
//! disk, renamed into `objects/pack/` pack first and index last (a pack is used only once
//! its index is there), and the new index is read back to check it names every object before
//! any loose file goes. A loose object written meanwhile was not listed and stays loose.

use std::fs;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use anyhow::{anyhow, bail, Context, Result};
use gix::error::ErrorExt;
use gix::parallel::InOrderIter;
use gix_pack::data::output::{self, entry::iter_from_counts};

use super::Oid;

/// git's `gc.auto` default: `git gc --auto` packs loose objects once there are about this
/// many. cohort follows the repository's `gc.auto` (0 turns packing off, as for git).
pub const DEFAULT_THRESHOLD: usize = 6700;

/// The loose objects of `objects_dir`: id, path and bytes on disk.
pub fn loose_objects(objects_dir: &Path) -> Result<Vec<(Oid, PathBuf, u64)>> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    for byte in 0..=255u8 {
        let dir = objects_dir.join(format!("{byte:02x}"));
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        for e in rd.flatten() {
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.len() != 38 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
                continue; // git's own temporary files (tmp_obj_*), or junk
            }
            let Ok(id) = Oid::from_hex(format!("{byte:02x}{name}").as_bytes()) else {
                continue;
            };
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_file() {
                out.push((id, e.path(), meta.blocks() * 512));
            }
        }
    }
    Ok(out)
}

/// How many loose objects make packing worthwhile: the repository's `gc.auto`, else git's
/// default. `None`: packing is off (`gc.auto` is 0 or negative).
pub fn threshold(repo: &gix::Repository) -> Option<usize> {
    match repo.config_snapshot().integer("gc.auto") {
        Some(n) if n <= 0 => None,
        Some(n) => Some(n as usize),
        None => Some(DEFAULT_THRESHOLD),
    }
}

/// A temporary pack directory this old was left by a gc that was killed: no gc takes an hour
/// to write one pack, and one still writing has touched its files more recently.
pub const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);

/// Removes the `cohort-pack-*` directories in `objects_dir` that nothing wrote for `age`
/// (a killed gc's; their objects are still loose, since loose files go only after the pack
/// is in place). Returns how many went.
pub fn remove_stale_temps(objects_dir: &Path, age: std::time::Duration) -> Result<usize> {
    let Ok(rd) = fs::read_dir(objects_dir) else {
        return Ok(0);
    };
    let now = std::time::SystemTime::now();
    let mut removed = 0;
    for e in rd.flatten() {
        if !e.file_name().to_string_lossy().starts_with("cohort-pack-") {
            continue;
        }
        // The newest write in it: a directory's own mtime moves only when entries come or go.
        let newest = fs::read_dir(e.path())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|f| f.metadata().ok()?.modified().ok())
            .chain(e.metadata().ok().and_then(|m| m.modified().ok()))
            .max();
        if newest.is_some_and(|t| now.duration_since(t).unwrap_or_default() >= age) {
            super::safefs::remove_path(&e.path()).with_context(|| format!("cannot remove {}", e.path().display()))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// What packing did.
#[derive(Debug, Clone)]
pub struct Packed {
    pub objects: usize,
    pub pack: PathBuf,
    pub pack_bytes: u64,
    /// Bytes the removed loose files took.
    pub freed: u64,
}

fn objects_dir(repo: &gix::Repository) -> PathBuf {
    repo.common_dir().join("objects")
}

/// Packs every loose object into one new pack and removes the loose files it then holds,
/// when there are at least `at_least` of them (`None` when there were fewer).
pub fn pack_loose(repo: &gix::Repository, at_least: usize) -> Result<Option<Packed>> {
    let objects = objects_dir(repo);
    let loose = loose_objects(&objects)?;
    if loose.is_empty() || loose.len() < at_least {
        return Ok(None);
    }
    let pack_dir = objects.join("pack");
    fs::create_dir_all(&pack_dir).with_context(|| format!("cannot create {}", pack_dir.display()))?;
    // Next to the pack directory, on the same file system (renames), where git keeps its own
    // temporary object directories; removed when dropped, a crash's by a later gc
    // (`remove_stale_temps`).
    let tmp = tempfile::Builder::new()
        .prefix("cohort-pack-")
        .tempdir_in(&objects)
        .with_context(|| format!("cannot create a temporary directory in {}", objects.display()))?;
    let raw = tmp.path().join("stream.pack");
    write_pack(repo, &loose, &raw)?;

    let interrupt = AtomicBool::new(false);
    let mut reader = BufReader::new(fs::File::open(&raw).with_context(|| format!("cannot read {}", raw.display()))?);
    let outcome = gix_pack::Bundle::write_to_directory(
        &mut reader,
        Some(tmp.path()),
        &mut gix::progress::Discard,
        &interrupt,
        None::<gix::objs::find::Never>,
        repo.object_hash(),
        gix_pack::bundle::write::Options::default(),
    )
    .map_err(|e| anyhow!("{e}"))
    .context("cannot index the new pack")?;
    let (Some(data), Some(index)) = (outcome.data_path, outcome.index_path) else {
        bail!("the new pack came out empty");
    };
    let name = |p: &Path| p.file_name().map(PathBuf::from).unwrap_or_default();
    let (final_pack, final_index) = (pack_dir.join(name(&data)), pack_dir.join(name(&index)));
    for p in [&data, &index] {
        fs::File::open(p)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("cannot flush {}", p.display()))?;
    }
    // Pack first, index last: git opens a pack only once its index exists. A pack of the
    // same objects already there (named by its content) is the same pack.
    if !final_pack.exists() {
        fs::rename(&data, &final_pack).with_context(|| format!("cannot move the pack to {}", final_pack.display()))?;
    }
    if !final_index.exists() {
        fs::rename(&index, &final_index)
            .with_context(|| format!("cannot move the pack index to {}", final_index.display()))?;
    }
    fs::File::open(&pack_dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot flush {}", pack_dir.display()))?;

    let idx = gix_pack::index::File::at(&final_index, repo.object_hash())
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| format!("cannot read back {}", final_index.display()))?;
    if let Some((id, _, _)) = loose.iter().find(|(id, _, _)| idx.lookup(id).is_none()) {
        bail!(
            "the new pack's index lacks {id}; no loose object was removed ({})",
            final_index.display()
        );
    }
    let mut freed = 0;
    for (_, path, bytes) in &loose {
        match fs::remove_file(path) {
            Ok(()) => freed += bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot remove {}", path.display())),
        }
    }
    let pack_bytes = fs::metadata(&final_pack).map(|m| m.len()).unwrap_or(0);
    Ok(Some(Packed {
        objects: loose.len(),
        pack: final_pack,
        pack_bytes,
        freed,
    }))
}

/// Streams a pack (version 2) of the `loose` objects, each whole, into `out`.
fn write_pack(repo: &gix::Repository, loose: &[(Oid, PathBuf, u64)], out: &Path) -> Result<()> {
    let num_entries = u32::try_from(loose.len()).context("too many loose objects for one pack")?;
    let mut db = repo.objects.clone().into_inner();
    db.prevent_pack_unload();
    db.ignore_replacements = true;
    // `None`: no copy from a pack; each object is read from the store and written whole
    // (gix-pack computes no deltas).
    let counts: Vec<output::Count> = loose
        .iter()
        .map(|(id, _, _)| output::Count::from_data(*id, None))
        .collect();
    let entries = iter_from_counts(
        counts,
        db,
        Box::new(gix::progress::Discard),
        iter_from_counts::Options {
            thread_limit: None,
            mode: iter_from_counts::Mode::PackCopyAndBaseObjects,
            allow_thin_pack: false,
            chunk_size: 64,
            version: gix_pack::data::Version::V2,
            compression: repo.pack_compression().map_err(|e| anyhow!("{e}"))?,
        },
    )
    .map_err(|e| anyhow!("{e}"))
    .context("cannot read the loose objects to pack")?;
    let file = fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut writer = BufWriter::new(file);
    let in_order = InOrderIter::from(entries).map(|chunk| {
        chunk.and_then(|entries| {
            if entries.iter().any(output::Entry::is_invalid) {
                Err(gix::error::message("a loose object to pack could not be read").raise())
            } else {
                Ok(entries)
            }
        })
    });
    let bytes = output::bytes::FromEntriesIter::new(
        in_order,
        &mut writer,
        num_entries,
        gix_pack::data::Version::V2,
        repo.object_hash(),
    );
    for written in bytes {
        written.map_err(|e| anyhow!("{e}")).context("cannot write the pack")?;
    }
    writer
        .flush()
        .with_context(|| format!("cannot write {}", out.display()))?;
    Ok(())
}
