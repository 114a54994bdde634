//! What an agent changed in its checkout, read without trusting the checkout.
//!
//! The checkout is compared with cohort's own index of it (kept where the agent cannot reach),
//! through [`safefs::Dir`]: no symlink is followed, no FIFO or device opened, no filter,
//! attribute or hook of the checkout applied. Files are hashed as they stream past, never
//! read whole, and one over the size limit is reported, not read. What git would not keep
//! (ignored files, FIFOs, sockets, devices, a nested `.git`) is removed, so the checkout
//! holds exactly the tree that is committed.
//!
//! Two passes, as git's own status: tracked entries are checked against their stat data
//! (only those that differ are hashed), then every directory is listed for what is new.
//! `.gitignore` files are read from the checkout as data (regular files only), and the
//! repository's `info/exclude` and `core.excludesFile` (the user's) come first.

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;

use anyhow::{Context, Result};
use gix::bstr::{BStr, BString, ByteSlice};
use gix::index::entry::{Mode, Stat};
use rustix::fs as rfs;

use super::safefs::{Dir, Kind};
use super::Oid;

/// A new or changed file or symlink, hashed but not yet written to the object store.
#[derive(Debug, Clone)]
pub struct Upsert {
    pub path: BString,
    pub id: Oid,
    pub mode: Mode,
    pub stat: Stat,
    /// A symlink's target (its blob's content).
    pub link: Option<Vec<u8>>,
    pub size: u64,
}

#[derive(Debug, Default)]
pub struct Changes {
    pub upserts: Vec<Upsert>,
    /// Tracked paths no longer there (or no longer a file or symlink).
    pub removed: Vec<BString>,
    /// Tracked entries whose content is unchanged but whose stat data is not (index position).
    pub refreshed: Vec<(usize, Stat)>,
    /// Files over the size limit: neither hashed nor committed.
    pub oversized: Vec<(BString, u64)>,
    /// What was removed from the checkout because git would not keep it, and why.
    pub dropped: Vec<(BString, &'static str)>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.removed.is_empty()
    }
}

/// Sees every chunk of every new or changed file as it is hashed, with its path.
pub type Observer<'a> = dyn FnMut(&BStr, &[u8]) + 'a;

/// What the comparison needs besides the checkout and the index.
pub struct Settings<'a> {
    pub hash: gix::hash::Kind,
    pub stat: gix::index::entry::stat::Options,
    /// `core.fileMode`: whether the executable bit counts.
    pub file_mode: bool,
    /// Patterns from `info/exclude` and `core.excludesFile`.
    pub excludes: gix::ignore::Search,
    pub max_file_size: u64,
    /// Sees every chunk of every new or changed file as it is hashed (the secret scan).
    pub observe: Option<&'a mut Observer<'a>>,
}

/// Deeper than this is refused: the walk holds one descriptor per level.
const MAX_DEPTH: usize = 512;
/// The largest `.gitignore` read.
const MAX_IGNORE_FILE: u64 = 1024 * 1024;

/// Compares the checkout at `root` with `index`, removing what git would not keep.
pub fn compare(root: &Dir, index: &gix::index::File, settings: &mut Settings<'_>) -> Result<Changes> {
    let mut changes = Changes::default();
    tracked(root, index, settings, &mut changes)?;
    let mut walk = Walk {
        index,
        settings,
        changes: &mut changes,
    };
    walk.dir(root, &BString::default(), false, 0)?;
    Ok(changes)
}

/// The first pass: every tracked entry against its stat data.
fn tracked(root: &Dir, index: &gix::index::File, s: &mut Settings<'_>, out: &mut Changes) -> Result<()> {
    // Directories of consecutive entries are shared: keep the last one open.
    let mut cached: Option<(BString, Option<Dir>)> = None;
    let timestamp = index.timestamp();
    for (i, entry) in index.entries().iter().enumerate() {
        if entry.stage_raw() != 0 || entry.mode == Mode::COMMIT || entry.mode == Mode::DIR {
            continue; // cohort writes no conflicts; submodules stay as they are
        }
        let path = entry.path(index);
        let (dir_path, name) = match path.rfind_byte(b'/') {
            Some(p) => (path[..p].as_bstr(), path[p + 1..].as_bstr()),
            None => (BStr::new(""), path),
        };
        if cached.as_ref().map(|(p, _)| p.as_bstr()) != Some(dir_path) {
            let dir = root.sub_beneath(super::rela_path(dir_path))?;
            cached = Some((dir_path.to_owned(), dir));
        }
        let Some((_, Some(dir))) = &cached else {
            out.removed.push(path.to_owned()); // a leading component is gone, or a symlink now
            continue;
        };
        let name = OsStr::from_bytes(name);
        let Some(st) = dir.stat(name)? else {
            out.removed.push(path.to_owned());
            continue;
        };
        let kind = kind_of(&st);
        let stat = stat_of(&st);
        let want_mode = match kind {
            Kind::File => file_mode(&st, s.file_mode, Some(entry.mode)),
            Kind::Symlink => Mode::SYMLINK,
            // A directory now: its files are new (the second pass). Anything else goes.
            Kind::Dir => {
                out.removed.push(path.to_owned());
                continue;
            }
            Kind::Other => {
                dir.remove(name)?;
                out.removed.push(path.to_owned());
                out.dropped.push((path.to_owned(), "not a file, directory or symlink"));
                continue;
            }
        };
        if want_mode == entry.mode && stat.matches(&entry.stat, s.stat) && !stat.is_racy(timestamp, s.stat) {
            continue;
        }
        // Hashed unobserved: only what changed is shown to the observer (the secret scan must
        // not see a tracked file the agent did not touch), then, when changed, once more.
        // A tracked file is hashed whatever its size: one over the limit that is unchanged
        // (only its stat data differs, or it is racily clean) is no change at all.
        let observe = s.observe.take();
        let looked = read_entry(dir, name, path, kind, want_mode, stat, s, Limit::AfterHash);
        s.observe = observe;
        match looked? {
            Looked::Gone => out.removed.push(path.to_owned()),
            Looked::Oversized(size) => out.oversized.push((path.to_owned(), size)),
            Looked::Hashed(u) if u.id == entry.id && u.mode == entry.mode => out.refreshed.push((i, u.stat)),
            Looked::Hashed(u) if u.size > s.max_file_size => out.oversized.push((path.to_owned(), u.size)),
            Looked::Hashed(u) => {
                if let Some(observe) = s.observe.as_mut() {
                    show_to(dir, name, path, &u, &mut **observe)?;
                }
                out.upserts.push(u);
            }
        }
    }
    Ok(())
}

struct Walk<'w, 's> {
    index: &'w gix::index::File,
    settings: &'w mut Settings<'s>,
    changes: &'w mut Changes,
}

impl Walk<'_, '_> {
    /// The second pass: what is in `dir` (at `rel`, `""` for the root) and not tracked.
    /// `ignored`: the directory itself is ignored (it was entered for tracked files only).
    fn dir(&mut self, dir: &Dir, rel: &BString, ignored: bool, depth: usize) -> Result<()> {
        anyhow::ensure!(
            depth < MAX_DEPTH,
            "the checkout nests directories more than {MAX_DEPTH} deep (at {rel})"
        );
        let pushed = self.push_gitignore(dir, rel)?;
        let result = self.entries(dir, rel, ignored, depth);
        if pushed {
            self.settings.excludes.patterns.pop();
        }
        result
    }

    fn entries(&mut self, dir: &Dir, rel: &BString, ignored: bool, depth: usize) -> Result<()> {
        for (name, kind) in dir
            .entries()
            .with_context(|| format!("cannot list {}", show(rel.as_bstr())))?
        {
            let path = join(rel, name.as_bytes());
            if name == ".git" {
                if !rel.is_empty() {
                    // A nested repository's git dir: never part of a tree (git refuses the name).
                    dir.remove(&name)?;
                    self.changes.dropped.push((path, "a nested .git"));
                }
                continue; // the checkout's own link to its git dir, cohort's
            }
            let tracked = self.index.entry_index_by_path(path.as_bstr()).is_ok();
            match kind {
                Kind::Dir => {
                    let mut prefix = path.clone();
                    prefix.push(b'/');
                    let has_tracked = self.index.prefixed_entries(prefix.as_bstr()).is_some();
                    let is_ignored = ignored || self.is_ignored(&path, true);
                    if is_ignored && !has_tracked {
                        dir.remove(&name)?;
                        self.changes.dropped.push((path, "ignored"));
                        continue;
                    }
                    if let Some(sub) = dir.sub(&name)? {
                        self.dir(&sub, &path, is_ignored, depth + 1)?;
                    }
                }
                // Tracked files were looked at in the first pass.
                _ if tracked => {}
                Kind::Other => {
                    dir.remove(&name)?;
                    self.changes.dropped.push((path, "not a file, directory or symlink"));
                }
                Kind::File | Kind::Symlink => {
                    if ignored || self.is_ignored(&path, false) {
                        dir.remove(&name)?;
                        self.changes.dropped.push((path, "ignored"));
                        continue;
                    }
                    let Some(st) = dir.stat(&name)? else { continue };
                    let mode = match kind {
                        Kind::File => file_mode(&st, self.settings.file_mode, None),
                        _ => Mode::SYMLINK,
                    };
                    match read_entry(
                        dir,
                        &name,
                        path.as_bstr(),
                        kind,
                        mode,
                        stat_of(&st),
                        self.settings,
                        Limit::Before,
                    )? {
                        Looked::Gone => {}
                        Looked::Oversized(size) => self.changes.oversized.push((path, size)),
                        Looked::Hashed(u) => self.changes.upserts.push(u),
                    }
                }
            }
        }
        Ok(())
    }

    fn is_ignored(&self, path: &BString, is_dir: bool) -> bool {
        self.settings
            .excludes
            .pattern_matching_relative_path(path.as_bstr(), Some(is_dir), gix::glob::pattern::Case::Sensitive)
            .is_some_and(|m| !m.pattern.is_negative())
    }

    /// Adds the patterns of `dir`'s `.gitignore` (a regular file; a symlink or FIFO there is
    /// not read), relative to `rel`.
    fn push_gitignore(&mut self, dir: &Dir, rel: &BString) -> Result<bool> {
        let Some(bytes) = dir.read_small(OsStr::new(".gitignore"), MAX_IGNORE_FILE)? else {
            return Ok(false);
        };
        // A virtual root, so the list's base becomes `rel`.
        let root = std::path::Path::new("/");
        let source = root.join(super::rela_path(rel.as_bstr())).join(".gitignore");
        self.settings
            .excludes
            .add_patterns_buffer(&bytes, source, Some(root), Default::default())?;
        Ok(true)
    }
}

enum Looked {
    Gone,
    Oversized(u64),
    Hashed(Upsert),
}

/// Hashes one file or symlink in `dir` (streaming, showing each chunk to the observer).
/// When a file over `max_file_size` is told apart: a new one before it is read (it is never
/// committed); a tracked one after it is hashed (it may be unchanged).
#[derive(PartialEq, Eq)]
enum Limit {
    Before,
    AfterHash,
}

#[allow(clippy::too_many_arguments)]
fn read_entry(
    dir: &Dir,
    name: &OsStr,
    path: &BStr,
    kind: Kind,
    mode: Mode,
    stat: Stat,
    s: &mut Settings<'_>,
    limit: Limit,
) -> Result<Looked> {
    let err = || format!("cannot read {}", show(path));
    if kind == Kind::Symlink {
        let target = dir.read_link(name).with_context(err)?;
        if let Some(observe) = s.observe.as_mut() {
            observe(path, &target);
        }
        let id = gix::objs::compute_hash(s.hash, gix::objs::Kind::Blob, &target).with_context(err)?;
        let size = target.len() as u64;
        return Ok(Looked::Hashed(Upsert {
            path: path.to_owned(),
            id,
            mode,
            stat,
            link: Some(target),
            size,
        }));
    }
    let Some((file, st)) = dir.open_file(name).with_context(err)? else {
        return Ok(Looked::Gone);
    };
    let size = st.st_size as u64;
    if size > s.max_file_size && limit == Limit::Before {
        return Ok(Looked::Oversized(size));
    }
    let id = hash_stream(file, size, s.hash, path, s.observe.as_deref_mut()).with_context(err)?;
    Ok(Looked::Hashed(Upsert {
        path: path.to_owned(),
        id,
        mode,
        stat: stat_of(&st),
        link: None,
        size,
    }))
}

/// Streams a changed file (or a symlink's target) past `observe`.
fn show_to(dir: &Dir, name: &OsStr, path: &BStr, u: &Upsert, observe: &mut Observer<'_>) -> Result<()> {
    if let Some(target) = &u.link {
        observe(path, target);
        return Ok(());
    }
    let err = || format!("cannot read {}", show(path));
    let Some((mut file, _)) = dir.open_file(name).with_context(err)? else {
        return Ok(());
    };
    let mut buf = vec![0u8; (u.size as usize).clamp(1, 256 * 1024)];
    loop {
        let n = file.read(&mut buf).with_context(err)?;
        if n == 0 {
            return Ok(());
        }
        observe(path, &buf[..n]);
    }
}

/// The blob id of exactly `size` bytes from `reader`, read in pieces.
pub fn hash_stream<'o>(
    mut reader: impl Read,
    size: u64,
    kind: gix::hash::Kind,
    path: &BStr,
    mut observe: Option<&mut Observer<'o>>,
) -> Result<Oid> {
    let mut hasher = gix::hash::hasher(kind);
    hasher.update(&gix::objs::encode::loose_header(gix::objs::Kind::Blob, size));
    let mut buf = vec![0u8; (size as usize).clamp(1, 256 * 1024)];
    let mut left = size;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        anyhow::ensure!(n as u64 <= left, "the file grew while it was read");
        hasher.update(&buf[..n]);
        if let Some(o) = observe.as_mut() {
            o(path, &buf[..n]);
        }
        left -= n as u64;
    }
    anyhow::ensure!(left == 0, "the file shrank while it was read");
    Ok(hasher.try_finalize()?)
}

fn kind_of(st: &rfs::Stat) -> Kind {
    match rfs::FileType::from_raw_mode(st.st_mode) {
        rfs::FileType::RegularFile => Kind::File,
        rfs::FileType::Directory => Kind::Dir,
        rfs::FileType::Symlink => Kind::Symlink,
        _ => Kind::Other,
    }
}

/// A regular file's mode: executable when the owner may run it and `core.fileMode` holds;
/// otherwise the index's mode, if tracked.
fn file_mode(st: &rfs::Stat, honour: bool, tracked: Option<Mode>) -> Mode {
    match (honour, tracked) {
        (false, Some(m)) if m == Mode::FILE || m == Mode::FILE_EXECUTABLE => m,
        (false, _) => Mode::FILE,
        (true, _) if st.st_mode & 0o100 != 0 => Mode::FILE_EXECUTABLE,
        (true, _) => Mode::FILE,
    }
}

/// Index stat data from a `stat` result (the fields git keeps, truncated as git does).
pub fn stat_of(st: &rfs::Stat) -> Stat {
    use gix::index::entry::stat::Time;
    Stat {
        mtime: Time {
            secs: st.st_mtime as u32,
            nsecs: st.st_mtime_nsec as u32,
        },
        ctime: Time {
            secs: st.st_ctime as u32,
            nsecs: st.st_ctime_nsec as u32,
        },
        dev: st.st_dev as u32,
        ino: st.st_ino as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        size: st.st_size as u32,
    }
}

fn join(rel: &BString, name: &[u8]) -> BString {
    let mut p = rel.clone();
    if !p.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

fn show(p: &BStr) -> String {
    if p.is_empty() {
        "the checkout".into()
    } else {
        p.to_str_lossy().into_owned()
    }
}
