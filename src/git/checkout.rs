//! Moving a working tree from whatever it holds to a target tree, writing
//! only the files that differ.
//!
//! File creation is the expensive part of a checkout (~0.5–0.8 ms a file on
//! the machines this was built on). A reused checkout whose content is known
//! (it was just committed) is moved with a tree diff alone; otherwise its
//! index is compared with the disk first (stat data makes that cheap) and
//! dirty or untracked paths are repaired too. Large batches of files are
//! written from several threads.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{Context, Result};
use gix::bstr::{BStr, BString, ByteSlice};
use gix::dir::walk::EmissionMode;
use gix::index::entry::Stat;
use gix::objs::tree::EntryKind;
use gix::status::index_worktree::Item as WorktreeItem;
use gix::status::plumbing::index_as_worktree::EntryStatus;
use gix::status::UntrackedFiles;

use super::snapshot::diff_paths;
use super::Oid;

/// One file of a tree, flattened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlatEntry {
    pub path: BString,
    pub id: Oid,
    pub kind: EntryKind,
}

fn entries_of(index: &gix::index::File) -> Vec<FlatEntry> {
    let backing = index.path_backing();
    index
        .entries()
        .iter()
        .filter(|e| e.stage_raw() == 0)
        .filter_map(|e| {
            let kind = e.mode.to_tree_entry_mode()?.kind();
            Some(FlatEntry {
                path: e.path_in(backing).to_owned(),
                id: e.id,
                kind,
            })
        })
        .collect()
}

/// What to do with files git does not track.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Untracked {
    /// Leave them (the user's own working tree).
    Keep,
    /// Remove them, ignored ones too (a pool checkout being reset).
    Remove,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct MoveStats {
    pub written: usize,
    pub removed: usize,
    /// The checksum of the index written.
    pub index_checksum: Option<Oid>,
}

/// Makes the working tree of `repo` hold exactly `target` (plus, with
/// `Untracked::Keep`, untracked and ignored files), and writes a matching
/// index with fresh stat data.
///
/// `known` is a tree the working tree and index are known to hold exactly
/// (cohort just committed it); then only the tree diff is applied.
pub fn move_to(repo: &gix::Repository, target: Oid, untracked: Untracked, known: Option<Oid>) -> Result<MoveStats> {
    let workdir = repo
        .workdir()
        .context("the checkout has no working tree")?
        .to_path_buf();
    let has_index = repo.index_path().is_file();
    let old_index = if has_index { Some(repo.index()?) } else { None };
    let mut to_write: Vec<FlatEntry> = Vec::new();
    let mut to_remove: Vec<BString> = Vec::new();

    if let (Some(from), Some(old)) = (known, &old_index) {
        // A pool checkout's own index holding `from`: update it in place.
        if super::stage::recorded_tree(repo.git_dir(), old) == Some(from) {
            return move_by_diff(repo, &workdir, old, from, target);
        }
    }
    let target_index = repo.index_from_tree(&target)?;
    let wanted = entries_of(&target_index);
    let find = |p: &BStr| {
        wanted
            .binary_search_by(|e| e.path.as_bstr().cmp(p))
            .ok()
            .map(|i| &wanted[i])
    };

    match (known, &old_index) {
        (Some(from), Some(_)) => {
            for change in diff_paths(repo, from, target)? {
                match (change.new.is_some(), find(change.path.as_bstr())) {
                    (false, _) | (_, None) => to_remove.push(change.path),
                    (_, Some(e)) => to_write.push(e.clone()),
                }
            }
        }
        _ => {
            let current = old_index.as_ref().map(|i| entries_of(i)).unwrap_or_default();
            let (dirty, strays) = if has_index {
                worktree_status(repo, untracked)?
            } else {
                Default::default()
            };
            // Merge-join the current index and the target, both in index order.
            let (mut i, mut j) = (0, 0);
            while i < current.len() || j < wanted.len() {
                let ord = match (current.get(i), wanted.get(j)) {
                    (Some(a), Some(b)) => a.path.cmp(&b.path),
                    (Some(_), None) => std::cmp::Ordering::Less,
                    _ => std::cmp::Ordering::Greater,
                };
                match ord {
                    std::cmp::Ordering::Less => {
                        to_remove.push(current[i].path.clone());
                        i += 1;
                    }
                    std::cmp::Ordering::Greater => {
                        to_write.push(wanted[j].clone());
                        j += 1;
                    }
                    std::cmp::Ordering::Equal => {
                        let (a, b) = (&current[i], &wanted[j]);
                        if a.id != b.id || a.kind != b.kind || dirty.contains(&b.path) {
                            to_write.push(b.clone());
                        }
                        i += 1;
                        j += 1;
                    }
                }
            }
            // Untracked leftovers, and conflicted paths the target does not have.
            for stray in strays.iter().chain(dirty.iter()) {
                let p = stray.as_bstr();
                let trimmed = p.strip_suffix(b"/").map(|s| s.as_bstr()).unwrap_or(p);
                if find(trimmed).is_none() {
                    to_remove.push(trimmed.to_owned());
                }
            }
        }
    }

    for path in &to_remove {
        remove_path(&workdir, path.as_bstr())?;
    }
    let fresh = write_entries(repo, &workdir, &to_write)?;
    let index = write_index(repo, target_index, old_index.as_ref().map(|i| &***i), &fresh)?;
    Ok(MoveStats {
        written: to_write.len(),
        removed: to_remove.len(),
        index_checksum: index.checksum(),
    })
}

/// The fast move of a checkout known to hold `from` exactly: the tree diff
/// is applied to the files and to the existing index, so unchanged entries
/// are neither looked up nor re-read.
fn move_by_diff(
    repo: &gix::Repository,
    workdir: &Path,
    old: &gix::index::File,
    from: Oid,
    target: Oid,
) -> Result<MoveStats> {
    let mut to_write = Vec::new();
    let mut to_remove = Vec::new();
    for change in diff_paths(repo, from, target)? {
        match change.new {
            Some((id, kind)) => to_write.push(FlatEntry {
                path: change.path,
                id,
                kind,
            }),
            None => to_remove.push(change.path),
        }
    }
    for path in &to_remove {
        remove_path(workdir, path.as_bstr())?;
    }
    let fresh = write_entries(repo, workdir, &to_write)?;
    let mut index = old.clone();
    let gone: HashSet<&BStr> = to_remove.iter().map(|p| p.as_bstr()).collect();
    index.remove_entries(|_, path, _| gone.contains(path));
    let mut added = Vec::new();
    for e in &to_write {
        let mode = match e.kind {
            EntryKind::Blob => gix::index::entry::Mode::FILE,
            EntryKind::BlobExecutable => gix::index::entry::Mode::FILE_EXECUTABLE,
            EntryKind::Link => gix::index::entry::Mode::SYMLINK,
            EntryKind::Commit => gix::index::entry::Mode::COMMIT,
            EntryKind::Tree => continue,
        };
        // Symlinks and submodules are not opened; their stat is looked up.
        let stat = fresh.get(&e.path).copied().unwrap_or_else(|| {
            gix::index::fs::Metadata::from_path_no_follow(&workdir.join(super::rela_path(e.path.as_bstr())))
                .ok()
                .and_then(|m| Stat::from_fs(&m).ok())
                .unwrap_or_default()
        });
        match index.entry_index_by_path(e.path.as_bstr()) {
            Ok(i) => {
                let entry = &mut index.entries_mut()[i];
                (entry.id, entry.mode, entry.stat) = (e.id, mode, stat);
            }
            Err(_) => added.push((e, mode, stat)),
        }
    }
    for (e, mode, stat) in added {
        index.dangerously_push_entry(stat, e.id, gix::index::entry::Flags::empty(), mode, e.path.as_bstr());
    }
    index.sort_entries();
    index.remove_tree();
    index
        .write(gix::index::write::Options::default())
        .context("cannot write the index")?;
    Ok(MoveStats {
        written: to_write.len(),
        removed: to_remove.len(),
        index_checksum: index.checksum(),
    })
}

/// Paths whose content on disk differs from the index, and (with
/// `Untracked::Remove`) untracked ones, directories collapsed.
fn worktree_status(repo: &gix::Repository, untracked: Untracked) -> Result<(HashSet<BString>, Vec<BString>)> {
    let (mode, ignored) = match untracked {
        Untracked::Keep => (UntrackedFiles::None, None),
        Untracked::Remove => (UntrackedFiles::Collapsed, Some(EmissionMode::CollapseDirectory)),
    };
    let iter = repo
        .status(gix::progress::Discard)?
        .untracked_files(mode)
        .dirwalk_options(|o| o.emit_ignored(ignored))
        .index_worktree_rewrites(None)
        .index_worktree_submodules(None)
        .into_index_worktree_iter(None)?;
    let mut dirty = HashSet::new();
    let mut strays = Vec::new();
    for item in iter {
        match item.context("cannot compute the status of a checkout")? {
            WorktreeItem::Modification { rela_path, status, .. } => {
                if !matches!(status, EntryStatus::NeedsUpdate(_)) {
                    dirty.insert(rela_path);
                }
            }
            WorktreeItem::DirectoryContents { entry, .. } => {
                if matches!(
                    entry.status,
                    gix::dir::entry::Status::Untracked | gix::dir::entry::Status::Ignored(_)
                ) {
                    strays.push(entry.rela_path);
                }
            }
            WorktreeItem::Rewrite { .. } => {}
        }
    }
    Ok((dirty, strays))
}

/// Removes the ignored files of a pool checkout (whole directories at
/// once), for the commit step's full-status path; the fast path finds them
/// in its own status.
pub fn remove_ignored(repo: &gix::Repository) -> Result<()> {
    let workdir = repo
        .workdir()
        .context("the checkout has no working tree")?
        .to_path_buf();
    let options = repo
        .dirwalk_options()?
        .emit_ignored(Some(EmissionMode::CollapseDirectory))
        .emit_untracked(EmissionMode::CollapseDirectory);
    let index = repo.index_or_empty()?;
    let mut collect = gix::dir::walk::delegate::Collect::default();
    let interrupt = std::sync::atomic::AtomicBool::new(false);
    repo.dirwalk(&index, std::iter::empty::<&str>(), &interrupt, options, &mut collect)
        .context("cannot list the ignored files of a checkout")?;
    for (entry, _) in collect.into_entries_by_path() {
        if matches!(entry.status, gix::dir::entry::Status::Ignored(_)) {
            remove_path(&workdir, entry.rela_path.as_bstr())?;
        }
    }
    Ok(())
}

/// Stat data of files just written, taken from their open descriptors.
pub type FreshStats = HashMap<BString, Stat>;

/// Writes `index` (built from a tree) as the repository's index, with stat
/// data: from `fresh` for files just written, carried over from `old` where
/// the entry is unchanged, read from disk otherwise, so the next status
/// need not hash unchanged files.
pub fn write_index(
    repo: &gix::Repository,
    mut index: gix::index::File,
    old: Option<&gix::index::File>,
    fresh: &FreshStats,
) -> Result<gix::index::File> {
    let workdir = repo
        .workdir()
        .context("the checkout has no working tree")?
        .to_path_buf();
    let (entries, backing) = index.entries_mut_and_pathbacking();
    for entry in entries.iter_mut() {
        let path = entry.path_in(backing);
        if let Some(stat) = fresh.get(path) {
            entry.stat = *stat;
            continue;
        }
        let carried = old
            .and_then(|o| o.entry_by_path(path))
            .filter(|o| o.id == entry.id && o.mode == entry.mode && o.stat != Default::default());
        if let Some(o) = carried {
            entry.stat = o.stat;
            continue;
        }
        if let Ok(meta) = gix::index::fs::Metadata::from_path_no_follow(&workdir.join(super::rela_path(path))) {
            if let Ok(stat) = Stat::from_fs(&meta) {
                entry.stat = stat;
            }
        }
    }
    index
        .write(gix::index::write::Options::default())
        .context("cannot write the index")?;
    Ok(index)
}

/// Writes tree entries to disk, large batches from several threads, and
/// returns the stat data of the files written.
fn write_entries(repo: &gix::Repository, workdir: &Path, entries: &[FlatEntry]) -> Result<FreshStats> {
    const PARALLEL_FROM: usize = 64;
    // Trees come from origin and from agents: a name that would leave the checkout or write
    // into a git dir is refused before anything is written.
    for e in entries {
        for comp in e.path.split(|b| *b == b'/') {
            super::import::check_name(comp.as_bstr(), false)
                .with_context(|| format!("cannot check out {}", e.path.to_str_lossy()))?;
        }
    }
    let mut dirs: Vec<&Path> = entries
        .iter()
        .filter_map(|e| super::rela_path(e.path.as_bstr()).parent())
        .collect();
    dirs.sort();
    dirs.dedup();
    for d in dirs {
        ensure_dir(workdir, &workdir.join(d))?;
    }
    let write_all = |repo: &gix::Repository, part: &[FlatEntry]| -> Result<Vec<(BString, Stat)>> {
        let mut out = Vec::with_capacity(part.len());
        for e in part {
            if let Some(stat) = write_entry(repo, workdir, e)? {
                out.push((e.path.clone(), stat));
            }
        }
        Ok(out)
    };
    if entries.len() < PARALLEL_FROM {
        return Ok(write_all(repo, entries)?.into_iter().collect());
    }
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 8);
    let shared = repo.clone().into_sync();
    let chunk = entries.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = entries
            .chunks(chunk)
            .map(|part| {
                let (shared, write_all) = (&shared, &write_all);
                scope.spawn(move || write_all(&shared.to_thread_local(), part))
            })
            .collect();
        let mut fresh = FreshStats::with_capacity(entries.len());
        for h in handles {
            fresh.extend(h.join().expect("a checkout writer panicked")?);
        }
        Ok(fresh)
    })
}

/// Writes one tree entry to disk, replacing whatever is at its path, and
/// returns the stat data of a regular file written. Its parent directory
/// must exist.
///
/// The common case (nothing there yet, or a regular file) costs one
/// `open(O_CREAT)` with the final mode, the write, an `fstat` for the index
/// and the close: file creation is the dominant cost of a first checkout.
fn write_entry(repo: &gix::Repository, workdir: &Path, entry: &FlatEntry) -> Result<Option<Stat>> {
    let path = workdir.join(super::rela_path(entry.path.as_bstr()));
    let write_err = || format!("cannot write {}", path.display());
    match entry.kind {
        // A submodule: leave an empty directory, as git does.
        EntryKind::Commit => {
            clear_unless(&path, |m| m.is_dir())?;
            std::fs::create_dir_all(&path).with_context(write_err)?;
        }
        EntryKind::Tree => {}
        EntryKind::Link => {
            let blob = repo.find_blob(entry.id)?;
            let target = super::rela_path(blob.data.as_bstr()).to_path_buf();
            if std::os::unix::fs::symlink(&target, &path).is_err() {
                clear_unless(&path, |_| false)?;
                std::os::unix::fs::symlink(target, &path).with_context(write_err)?;
            }
        }
        EntryKind::Blob | EntryKind::BlobExecutable => {
            let blob = repo.find_blob(entry.id)?;
            let mode = if entry.kind == EntryKind::BlobExecutable {
                0o755
            } else {
                0o644
            };
            let open = || {
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(mode)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)
            };
            // A symlink (ELOOP) or directory (EISDIR) in the way is removed first.
            let mut file = match open() {
                Ok(f) => f,
                Err(_) => {
                    clear_unless(&path, |m| m.is_file())?;
                    open().with_context(write_err)?
                }
            };
            file.write_all(&blob.data).with_context(write_err)?;
            // The mode given to open applies to new files only, less the umask.
            if file.metadata()?.permissions().mode() & 0o777 != mode {
                file.set_permissions(std::fs::Permissions::from_mode(mode))
                    .with_context(write_err)?;
            }
            let meta = gix::index::fs::Metadata::from_file(&file).with_context(write_err)?;
            return Ok(Stat::from_fs(&meta).ok());
        }
    }
    Ok(None)
}

/// Removes whatever is at `path` unless `keep` says it can stay.
fn clear_unless(path: &Path, keep: impl Fn(&std::fs::Metadata) -> bool) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if keep(&m) => {}
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path)?,
        Ok(_) => std::fs::remove_file(path)?,
        Err(_) => {}
    }
    Ok(())
}

/// Creates `dir` and its parents, replacing a file that stands where a
/// directory must be.
fn ensure_dir(workdir: &Path, dir: &Path) -> Result<()> {
    // Component by component, never `is_dir()`: a symlink to a directory is replaced, not
    // written through.
    let mut cur = workdir.to_path_buf();
    for comp in dir.strip_prefix(workdir).unwrap_or(dir).components() {
        cur.push(comp);
        match std::fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => continue,
            Ok(_) => std::fs::remove_file(&cur)?,
            Err(_) => {}
        }
        std::fs::create_dir(&cur).with_context(|| format!("cannot create {}", cur.display()))?;
    }
    Ok(())
}

/// Removes a file or directory and then any parent directories it leaves
/// empty (git does not track directories).
pub(super) fn remove_path(workdir: &Path, rela: &BStr) -> Result<()> {
    let path = workdir.join(super::rela_path(rela));
    if path == workdir || path.file_name() == Some(".git".as_ref()) {
        return Ok(());
    }
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(&path)?,
        Ok(_) => std::fs::remove_file(&path)?,
        Err(_) => return Ok(()),
    }
    let mut parent = path.parent();
    while let Some(dir) = parent {
        if dir == workdir || std::fs::remove_dir(dir).is_err() {
            break;
        }
        parent = dir.parent();
    }
    Ok(())
}

/// Removes a directory tree from several threads.
///
/// The pool's checkouts hold a whole project each; their removal at the
/// end of a run is, with their creation, most of a short run's fixed cost.
/// The tree is split into enough subdirectories (a checkout has only a few
/// top-level entries of very different sizes) that the threads share the
/// work evenly; each piece is removed with `remove_dir_all`, which works
/// relative to directory descriptors (`openat`/`unlinkat`).
pub fn remove_tree(root: &Path) -> Result<()> {
    // A symlink where the tree was is removed itself, never followed.
    if std::fs::symlink_metadata(root).is_ok_and(|m| !m.is_dir()) {
        return super::safefs::remove_path(root).with_context(|| format!("cannot remove {}", root.display()));
    }
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 8);
    let mut pieces: Vec<std::path::PathBuf> = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    // Breadth first until there are plenty of pieces; the directories
    // expanded are left empty and go with the final remove_dir_all.
    while pieces.len() + dirs.len() < threads * 16 && !dirs.is_empty() {
        let mut next = Vec::new();
        for d in dirs.drain(..) {
            let Ok(rd) = std::fs::read_dir(&d) else { continue };
            for entry in rd.flatten() {
                match entry.file_type() {
                    Ok(t) if t.is_dir() => next.push(entry.path()),
                    _ => pieces.push(entry.path()),
                }
            }
        }
        dirs = next;
    }
    pieces.extend(dirs);
    let at = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let i = at.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(p) = pieces.get(i) else { break };
                let _ = match std::fs::symlink_metadata(p) {
                    Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
                    _ => std::fs::remove_file(p),
                };
            });
        }
    });
    match std::fs::remove_dir_all(root) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r.with_context(|| format!("cannot remove {}", root.display())),
    }
}
