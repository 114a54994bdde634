//! A pool's seed: one more checkout, which no agent or verify command ever runs in, so that a
//! slot that must be made whole can be copied from it (then moved by a tree diff to its base)
//! instead of written from the object store. A copy needs a source no agent can change while
//! it is read, and every slot but the seed is an agent's. The first checkout a pool writes
//! goes straight from the object store, so the first agent waits for one write, not two; the
//! second builds the seed (a write) and copies it; every later one copies.
//!
//! Not used by cohort's pools ([`super::pool::Pool::with_seed`] turns it on): measured with
//! `cargo bench --bench pool` on this machine's ext4, a pool's third checkout of 3,072 files
//! copied from the seed took 1.21–1.25× the time of writing it. Making the files costs the
//! same either way and dominates; a copy adds opening each source. It is kept so the
//! comparison can be made again where making files is cheap (tmpfs, another file system).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};

use anyhow::{Context, Result};
use gix::index::entry::{Mode, Stat};

use super::{checkout, stage, Oid};

/// The seed's name among a pool's slot directories (slots are numbered).
pub const SEED: &str = "seed";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No checkout has been written whole yet: the first goes straight to the object store.
    Unused,
    /// The next checkout written whole builds the seed.
    Wanted,
    Building,
    /// The seed holds this tree (its files and its index, with fresh stat data).
    Ready(Oid),
    /// Not used by this process (another holds it, or building it failed): write instead.
    Absent,
}

#[derive(Debug)]
pub struct Seed {
    /// The seed's files.
    path: PathBuf,
    /// Its admin dir: a linked worktree's git dir, as a slot's (index, clean mark).
    admin: PathBuf,
    common_dir: PathBuf,
    state: Mutex<State>,
    ready: Condvar,
    /// The OFD lock on `seed.lock` of a kept pool: one process uses a seed at a time.
    _lock: Option<std::fs::File>,
}

impl Seed {
    /// The seed of the pool at `base`. With `lock` (a kept pool) it is used only if this
    /// process gets the lock, and one a former run left clean is ready at once.
    pub fn new(common_dir: &Path, base: &Path, lock: bool) -> Seed {
        let path = base.join("checkouts").join(SEED);
        let admin = base.join("admin").join(SEED);
        let (state, held) = match lock {
            false => (State::Unused, None),
            true => match take_lock(base) {
                Some(file) => (kept_state(common_dir, &admin).unwrap_or(State::Unused), Some(file)),
                None => (State::Absent, None),
            },
        };
        Seed {
            path,
            admin,
            common_dir: common_dir.to_path_buf(),
            state: Mutex::new(state),
            ready: Condvar::new(),
            _lock: held,
        }
    }

    /// A seed that is never built: every checkout is written from the object store.
    pub fn unused(common_dir: &Path, base: &Path) -> Seed {
        Seed {
            state: Mutex::new(State::Absent),
            ..Seed::new(common_dir, base, false)
        }
    }

    /// Fills the empty checkout `to` (files and the index in `to_admin`) from the seed,
    /// building the seed at `tree` first if this is the call to build it. Returns the tree
    /// the copy holds, or `None` when the caller should write from the object store.
    pub fn copy_into(&self, tree: Oid, to: &Path, to_admin: &Path) -> Result<Option<Oid>> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match *st {
                State::Unused => {
                    *st = State::Wanted;
                    return Ok(None);
                }
                State::Absent => return Ok(None),
                State::Building => st = self.ready.wait(st).unwrap_or_else(|e| e.into_inner()),
                State::Ready(seed_tree) => {
                    drop(st);
                    self.copy(to, to_admin)?;
                    return Ok(Some(seed_tree));
                }
                State::Wanted => {
                    *st = State::Building;
                    drop(st);
                    let built = self.build(tree);
                    let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                    *st = match &built {
                        Ok(()) => State::Ready(tree),
                        Err(e) => {
                            tracing::debug!("no seed checkout, writing each: {e:#}");
                            State::Absent
                        }
                    };
                    self.ready.notify_all();
                    drop(st);
                    return match built {
                        Ok(()) => {
                            self.copy(to, to_admin)?;
                            Ok(Some(tree))
                        }
                        Err(_) => Ok(None),
                    };
                }
            }
        }
    }

    fn copy(&self, to: &Path, to_admin: &Path) -> Result<()> {
        let hash = super::open(&self.common_dir)?.object_hash();
        copy(hash, &self.path, &self.admin, to, to_admin)
    }

    /// Writes the seed at `tree` from the object store, as a slot is written whole.
    fn build(&self, tree: Oid) -> Result<()> {
        for p in [&self.path, &self.admin] {
            super::safefs::remove_path(p).with_context(|| format!("cannot remove {}", p.display()))?;
            std::fs::create_dir_all(p).with_context(|| format!("cannot create {}", p.display()))?;
        }
        std::fs::write(self.admin.join("commondir"), format!("{}\n", self.common_dir.display()))?;
        std::fs::write(
            self.admin.join("gitdir"),
            format!("{}\n", self.path.join(".git").display()),
        )?;
        let repo = super::open(&self.common_dir)?;
        let head = repo.head_id().context("the repository has no HEAD commit")?;
        std::fs::write(self.admin.join("HEAD"), format!("{}\n", head.detach()))?;
        let repo = super::open(&self.admin)?;
        let stats = checkout::move_to(&repo, tree, checkout::Untracked::Remove, None)?;
        stage::record(&self.admin, tree, stats.index_checksum)?;
        std::fs::write(self.admin.join(super::pool::CLEAN_MARK), tree.to_string())?;
        Ok(())
    }
}

/// The lock of a kept pool's seed, if no other process holds it.
fn take_lock(base: &Path) -> Option<std::fs::File> {
    std::fs::create_dir_all(base).ok()?;
    crate::lockfile::try_lock_path(&base.join(format!("{SEED}.lock"))).ok()?
}

/// A kept seed is ready if its clean mark names a tree and its index is the one recorded.
fn kept_state(common_dir: &Path, admin: &Path) -> Option<State> {
    let hash = super::open(common_dir).ok()?.object_hash();
    let mark: Oid = std::fs::read_to_string(admin.join(super::pool::CLEAN_MARK))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let index = gix::index::File::at(admin.join("index"), hash, false, Default::default()).ok()?;
    (stage::recorded_tree(admin, &index) == Some(mark)).then_some(State::Ready(mark))
}

/// Copies the seed's files, as its index lists them, into the empty checkout `to`, and
/// writes `to`'s index: the seed's, with the stat data of the new files.
fn copy(hash: gix::hash::Kind, seed: &Path, seed_admin: &Path, to: &Path, to_admin: &Path) -> Result<()> {
    let mut index = gix::index::File::at(seed_admin.join("index"), hash, false, Default::default())
        .context("cannot read the seed checkout's index")?;
    let work: Vec<(usize, PathBuf, Mode)> = index
        .entries()
        .iter()
        .enumerate()
        .map(|(i, e)| (i, super::rela_path(e.path(&index)).to_path_buf(), e.mode))
        .collect();
    let mut made: HashSet<PathBuf> = HashSet::new();
    for (_, rel, _) in &work {
        for dir in rel.ancestors().skip(1).filter(|d| !d.as_os_str().is_empty()) {
            if !made.insert(dir.to_path_buf()) {
                break;
            }
        }
    }
    let mut dirs: Vec<&PathBuf> = made.iter().collect();
    dirs.sort(); // parents first
    for d in dirs {
        std::fs::create_dir(to.join(d)).with_context(|| format!("cannot create {}", to.join(d).display()))?;
    }
    let copy_part = |part: &[(usize, PathBuf, Mode)]| -> Result<Vec<(usize, Stat)>> {
        let mut out = Vec::with_capacity(part.len());
        for (i, rel, mode) in part {
            let (from, dest) = (seed.join(rel), to.join(rel));
            let err = || format!("cannot copy {} from the seed checkout", rel.display());
            if *mode == Mode::SYMLINK {
                std::os::unix::fs::symlink(std::fs::read_link(&from).with_context(err)?, &dest).with_context(err)?;
            } else if *mode == Mode::COMMIT {
                std::fs::create_dir(&dest).with_context(err)?;
                continue;
            } else {
                std::fs::copy(&from, &dest).with_context(err)?;
            }
            let meta = gix::index::fs::Metadata::from_path_no_follow(&dest).with_context(err)?;
            out.push((*i, Stat::from_fs(&meta).with_context(err)?));
        }
        Ok(out)
    };
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 8);
    let chunk = work.len().div_ceil(threads).max(1);
    let stats: Vec<(usize, Stat)> = std::thread::scope(|scope| {
        let handles: Vec<_> = work
            .chunks(chunk)
            .map(|part| scope.spawn(move || copy_part(part)))
            .collect();
        let mut all = Vec::with_capacity(work.len());
        for h in handles {
            all.extend(h.join().map_err(|_| anyhow::anyhow!("a seed copier panicked"))??);
        }
        Ok::<_, anyhow::Error>(all)
    })?;
    for (i, stat) in stats {
        index.entries_mut()[i].stat = stat;
    }
    let tree = std::fs::read_to_string(seed_admin.join(stage::INDEX_RECORD))
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<Oid>().ok())
        .context("the seed checkout's index record is missing")?;
    index.set_path(to_admin.join("index"));
    index
        .write(gix::index::write::Options::default())
        .context("cannot write the index")?;
    stage::record(to_admin, tree, index.checksum())
}
