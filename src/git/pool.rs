//! A pool of reusable checkouts, at most one per concurrently running task, each sealed
//! from the repository's git dir.
//!
//! A slot is three directories of the run: the checkout the agent works in, the agent's
//! private git dir (see `private`; the checkout's `.git` file points there), and cohort's own
//! admin dir for it (its index of the checkout, the clean mark), which the agent never sees.
//! cohort opens the admin dir as a linked worktree of the repository, so its view of the
//! checkout uses the repository's objects and the user's config, never the agent's.
//!
//! A checkout is made once per slot and then moved from task to task with
//! [`checkout::move_to`], which writes only the files that differ. Everything lives inside the
//! git dir, outside the user's working tree: in the run's directory, removed at the end of
//! the run, or, for a pool kept between runs ([`Pool::kept`]), in `.git/cohort/pool`, where
//! each slot is held by one process at a time through an OFD lock on `<slot>.lock`.
//!
//! Git never sees a pool checkout as a worktree: the admin dir is not listed under
//! `.git/worktrees` and its HEAD is detached, so a task branch is never "checked out" twice.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};

use super::safefs::{self, Dir};
use super::seed::{Seed, SEED};
use super::{checkout, private, stage, Oid};

/// A file in a checkout's admin dir naming the tree its files and index hold exactly;
/// written after cohort commits, emptied before an agent runs. Without it, the checkout's
/// files are not trusted and it is made anew.
/// (Emptied in place rather than removed: on a file system without a journal, ext4 skips
/// over recently freed inodes when it allocates one, so every file removed makes the next
/// files created a little slower.)
pub const CLEAN_MARK: &str = "cohort-clean";

#[derive(Debug, Clone)]
pub struct Checkout {
    pub slot: usize,
    /// The working tree the agent runs in.
    pub path: PathBuf,
    /// cohort's own git dir for the checkout: its index and clean mark. Never shown to an agent.
    pub admin: PathBuf,
    /// The agent's private git dir (the checkout's `.git` file names it).
    pub git_dir: PathBuf,
    /// The repository's git dir.
    pub common_dir: PathBuf,
    /// Device and inode of `path` when cohort made it: a checkout the agent swapped for
    /// another directory or a symlink is told apart.
    id: (u64, u64),
    /// Bounds how many checkouts are written whole at once (see [`Gate`]).
    gate: Arc<Gate>,
    /// Where a checkout written whole is copied from (see `seed`).
    seed: Arc<Seed>,
}

impl Checkout {
    /// cohort's view of the checkout: the admin dir as a worktree of the repository.
    pub fn open(&self) -> Result<gix::Repository> {
        super::open(&self.admin)
    }

    /// The checkout directory, opened without following a symlink, if it is still the one
    /// cohort made.
    pub fn root(&self) -> Result<Dir> {
        let replaced = || {
            format!(
                "the agent replaced its checkout directory {} (with a symlink or another directory); \
                 nothing from it is taken",
                self.path.display()
            )
        };
        let dir = Dir::open(&self.path).with_context(replaced)?;
        anyhow::ensure!(dir.id()? == self.id, replaced());
        Ok(dir)
    }

    /// Removes lock files a killed cohort may have left in the admin dir (gix, like git,
    /// refuses to write while one exists).
    pub fn clear_leftovers(&self) -> Result<()> {
        for name in ["index.lock", "HEAD.lock"] {
            safefs::remove_path(&self.admin.join(name))
                .with_context(|| format!("cannot remove {}", self.admin.join(name).display()))?;
        }
        Ok(())
    }

    /// Points the checkout at `branch_ref` and makes its files match `base`, and sets up the
    /// agent's private git dir for that branch.
    pub fn prepare(&self, branch_ref: &str, base: Oid) -> Result<checkout::MoveStats> {
        self.clear_leftovers()?;
        let root = self.root()?;
        let tree = super::tree_of(&self.open()?, base)?;
        // Trust the clean mark once: from here on the agent may change anything.
        let mark = self.admin.join(CLEAN_MARK);
        let known = std::fs::read_to_string(&mark)
            .ok()
            .and_then(|s| s.trim().parse::<Oid>().ok());
        let mut known = known;
        let _whole = match known {
            Some(_) => {
                std::fs::write(&mark, "")?;
                None
            }
            None => {
                let permit = self.gate.enter();
                self.wipe(&root)?;
                // Copied from the seed, the checkout then holds the seed's tree exactly.
                known = self.seed.copy_into(tree, &self.path, &self.admin)?;
                Some(permit)
            }
        };
        // Opened after the copy, which wrote the index.
        let repo = self.open()?;
        let stats = checkout::move_to(&repo, tree, checkout::Untracked::Remove, known)
            .with_context(|| format!("cannot update checkout {}", self.path.display()))?;
        stage::record(&self.admin, tree, stats.index_checksum)?;
        let link = format!("gitdir: {}\n", self.git_dir.display());
        root.write_file(OsStr::new(".git"), link.as_bytes(), 0o644)
            .with_context(|| format!("cannot write {}/.git", self.path.display()))?;
        let index = std::fs::read(self.admin.join("index")).context("cannot read the checkout's index")?;
        let who = super::signature(&repo);
        private::prepare(
            &self.git_dir,
            &private::Setup {
                branch_ref,
                base,
                index: &index,
                objects: &self.common_dir.join("objects"),
                name: &who.name.to_string(),
                email: &who.email.to_string(),
            },
        )?;
        Ok(stats)
    }

    /// The tree cohort's index of the checkout holds (what it last wrote or committed there),
    /// if that index is still the one cohort wrote. Another place that runs the agent (a
    /// remote worker) is sent the checkout as this tree.
    pub fn tree(&self) -> Result<Option<Oid>> {
        let index = match gix::index::File::at(
            self.admin.join("index"),
            gix::hash::Kind::Sha1,
            false,
            Default::default(),
        ) {
            Ok(i) => i,
            Err(_) => return Ok(None),
        };
        Ok(stage::recorded_tree(&self.admin, &index))
    }

    /// Says the checkout's files are no longer known to match its tree (a program cohort does
    /// not trust is about to run in it): the next [`Checkout::prepare`] writes it anew.
    pub fn mark_unclean(&self) -> Result<()> {
        std::fs::write(self.admin.join(CLEAN_MARK), "").context("cannot update the checkout's clean mark")
    }

    /// Says the checkout's files and cohort's index of it hold exactly `tree`.
    pub(crate) fn mark_clean(&self, tree: Oid) -> Result<()> {
        std::fs::write(self.admin.join(CLEAN_MARK), tree.to_string()).context("cannot update the checkout's clean mark")
    }

    /// Empties a checkout whose content cohort cannot vouch for (an agent ran in it and no
    /// commit step finished), and its index, so it is written anew.
    fn wipe(&self, root: &Dir) -> Result<()> {
        for (name, _) in root.entries()? {
            root.remove(&name)?;
        }
        for name in ["index", stage::INDEX_RECORD] {
            safefs::remove_path(&self.admin.join(name))?;
        }
        Ok(())
    }

    /// Removes the slot's directories (a checkout that must not be used again).
    fn remove(&self) -> Result<()> {
        for p in [&self.path, &self.admin, &self.git_dir] {
            safefs::remove_path(p).with_context(|| format!("cannot remove {}", p.display()))?;
        }
        Ok(())
    }
}

/// A checkout held by one task; it goes back to its pool when dropped.
pub struct Lease {
    pool: Arc<Pool>,
    checkout: Option<Checkout>,
}

impl Lease {
    fn new(pool: &Arc<Pool>, checkout: Checkout) -> Lease {
        Lease {
            pool: pool.clone(),
            checkout: Some(checkout),
        }
    }
}

impl Lease {
    /// Removes the checkout instead of returning it to the pool: what is in it cannot be
    /// trusted or used again (a swapped checkout directory, a failed commit step). The next
    /// lease makes a new one.
    pub fn discard(mut self) -> Result<()> {
        match self.checkout.take() {
            Some(c) => {
                let removed = c.remove();
                // A kept pool's slot is free again (empty, so it is made anew).
                self.pool
                    .state
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .held
                    .remove(&c.slot);
                removed
            }
            None => Ok(()),
        }
    }
}

impl std::ops::Deref for Lease {
    type Target = Checkout;
    fn deref(&self) -> &Checkout {
        self.checkout
            .as_ref()
            .expect("a lease holds its checkout until dropped")
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(c) = self.checkout.take() {
            self.pool.state.lock().unwrap_or_else(|e| e.into_inner()).free.push(c);
        }
    }
}

pub struct Pool {
    common_dir: PathBuf,
    name_prefix: String,
    /// Checkouts, admin dirs and private git dirs are made in subdirectories of this.
    base: PathBuf,
    /// Kept between runs: slots are locked while held, reused as they are (their clean mark
    /// says what they hold) and left in place at the end.
    kept: bool,
    gate: Arc<Gate>,
    seed: Arc<Seed>,
    state: Mutex<PoolState>,
}

#[derive(Default)]
struct PoolState {
    free: Vec<Checkout>,
    made: usize,
    /// The slot locks this process holds (a kept pool), by slot.
    held: std::collections::BTreeMap<usize, std::fs::File>,
}

/// Where a kept pool lives, below cohort's directory in the git dir.
pub const KEPT_POOL: &str = "pool";

const CHECKOUTS: &str = "checkouts";
const ADMIN: &str = "admin";
const GIT_DIRS: &str = "gitdirs";

impl Pool {
    /// A pool for one run, making its slots under `base` (the run's directory).
    pub fn new(common_dir: &Path, run_id: &str, base: PathBuf) -> Pool {
        Pool::at(common_dir, run_id, base, false)
    }

    fn at(common_dir: &Path, run_id: &str, base: PathBuf, kept: bool) -> Pool {
        Pool {
            common_dir: common_dir.to_path_buf(),
            name_prefix: format!("cohort-{run_id}-"),
            // Off: writing was measured cheaper than copying here (see `seed`).
            seed: Arc::new(Seed::unused(common_dir, &base)),
            base,
            kept,
            gate: Arc::new(Gate::for_this_machine()),
            state: Mutex::new(PoolState::default()),
        }
    }

    /// The same pool with a seed: every checkout made whole after its first is copied from
    /// the seed rather than written from the object store (`cargo bench --bench pool`
    /// measures one against the other).
    pub fn with_seed(mut self) -> Pool {
        self.seed = Arc::new(Seed::new(&self.common_dir, &self.base, self.kept));
        self
    }

    /// The pool kept between runs (`[run] keep_checkouts`, and the service), under
    /// `cohort_dir/pool`; this process takes only the slots no other one holds.
    pub fn kept(common_dir: &Path, run_id: &str, cohort_dir: &Path) -> Pool {
        Pool::at(common_dir, run_id, cohort_dir.join(KEPT_POOL), true)
    }

    /// A free checkout, or a new one, held by one task until the lease is
    /// dropped (on every path, errors included). The caller bounds
    /// concurrency, so the pool grows to at most that many slots.
    pub fn lease(self: &Arc<Self>) -> Result<Lease> {
        let slot = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(c) = st.free.pop() {
                return Ok(Lease::new(self, c));
            }
            match self.kept {
                true => self.lock_free_slot(&mut st)?,
                false => {
                    st.made += 1;
                    st.made - 1
                }
            }
        };
        let made = match self.kept {
            true => self.open_kept(slot),
            false => self.make(slot),
        };
        if made.is_err() && self.kept {
            self.state.lock().unwrap_or_else(|e| e.into_inner()).held.remove(&slot);
        }
        Ok(Lease::new(self, made?))
    }

    /// The lowest slot of the kept pool that no process (this one included) holds, locked.
    fn lock_free_slot(&self, st: &mut PoolState) -> Result<usize> {
        std::fs::create_dir_all(&self.base).with_context(|| format!("cannot create {}", self.base.display()))?;
        for slot in 0.. {
            if st.held.contains_key(&slot) {
                continue;
            }
            if let Some(file) = crate::lockfile::try_lock_path(&self.base.join(format!("{slot}.lock")))? {
                st.held.insert(slot, file);
                return Ok(slot);
            }
        }
        unreachable!("slot numbers run out only after usize::MAX held locks")
    }

    /// A slot of the kept pool as an earlier run left it. Its files are used as they are only
    /// if its clean mark (in the admin dir, which no agent reaches) names a tree; otherwise
    /// `prepare` writes it anew. A checkout directory an agent swapped for a symlink is
    /// replaced.
    fn open_kept(&self, slot: usize) -> Result<Checkout> {
        let [path, admin, git_dir] = [CHECKOUTS, ADMIN, GIT_DIRS].map(|d| self.base.join(d).join(slot.to_string()));
        let whole = path.is_dir() && admin.join("commondir").is_file() && Dir::open(&path).is_ok();
        if !whole {
            return self.make(slot);
        }
        self.write_admin(&admin, &path)?;
        let id = Dir::open(&path)?.id()?;
        Ok(self.checkout(slot, path, admin, git_dir, id))
    }

    fn make(&self, slot: usize) -> Result<Checkout> {
        let roots = [CHECKOUTS, ADMIN, GIT_DIRS].map(|d| self.base.join(d));
        for root in &roots {
            if !root.is_dir() {
                std::fs::create_dir_all(root).with_context(|| format!("cannot create {}", root.display()))?;
                if root.ends_with(CHECKOUTS) {
                    spread_subdirectories(root);
                }
            }
        }
        let [path, admin, git_dir] = roots.map(|r| r.join(slot.to_string()));
        // What an earlier process of this run left in a slot (a crash while an agent ran) is
        // not trusted: the slot starts empty.
        for p in [&path, &admin, &git_dir] {
            safefs::remove_path(p).with_context(|| format!("cannot remove {}", p.display()))?;
            std::fs::create_dir(p).with_context(|| format!("cannot create {}", p.display()))?;
        }
        self.write_admin(&admin, &path)?;
        let id = Dir::open(&path)?.id()?;
        Ok(self.checkout(slot, path, admin, git_dir, id))
    }

    /// The admin dir has the layout of a linked worktree's git dir, so gix opens it as a
    /// worktree of the repository at `path`; git's own worktree list does not know it. Its
    /// HEAD is detached.
    fn write_admin(&self, admin: &Path, path: &Path) -> Result<()> {
        std::fs::write(admin.join("commondir"), format!("{}\n", self.common_dir.display()))?;
        std::fs::write(admin.join("gitdir"), format!("{}\n", path.join(".git").display()))?;
        let repo = super::open(&self.common_dir)?;
        let head = repo.head_id().context("the repository has no HEAD commit")?;
        std::fs::write(admin.join("HEAD"), format!("{}\n", head.detach()))?;
        Ok(())
    }

    fn checkout(&self, slot: usize, path: PathBuf, admin: PathBuf, git_dir: PathBuf, id: (u64, u64)) -> Checkout {
        Checkout {
            slot,
            path,
            admin,
            git_dir,
            common_dir: self.common_dir.clone(),
            id,
            gate: self.gate.clone(),
            seed: self.seed.clone(),
        }
    }

    /// The end of a run: a run's own pool removes its checkouts ([`Pool::remove_all`]); a kept
    /// pool leaves them for the next run and lets go of its slots.
    pub fn finish(&self) -> Result<()> {
        match self.kept {
            true => {
                let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                st.free.clear();
                st.held.clear();
                Ok(())
            }
            false => self.remove_all(),
        }
    }

    /// Removes every checkout this pool made (and any left from an earlier process of the
    /// same run, also by an older cohort that kept them under `worktrees/`).
    pub fn remove_all(&self) -> Result<()> {
        checkout::remove_tree(&self.base.join(CHECKOUTS))?;
        for d in [ADMIN, GIT_DIRS] {
            safefs::remove_path(&self.base.join(d))?;
        }
        let worktrees = self.common_dir.join("worktrees");
        if let Ok(rd) = std::fs::read_dir(&worktrees) {
            for entry in rd.flatten() {
                if entry.file_name().to_string_lossy().starts_with(&self.name_prefix) {
                    safefs::remove_path(&entry.path())?;
                }
            }
        }
        let _ = std::fs::remove_dir(&worktrees); // only if now empty
        self.state.lock().unwrap_or_else(|e| e.into_inner()).free.clear();
        Ok(())
    }
}

/// A slot of the kept pool, for `gc`.
#[derive(Debug, Clone)]
pub struct KeptSlot {
    /// Its number, or `seed`.
    pub name: String,
    /// Its checkout, admin dir and private git dir (none for the seed).
    pub dirs: Vec<PathBuf>,
    /// Held by a running cohort process: left alone.
    pub busy: bool,
}

/// The kept pool's slots under `cohort_dir`. With `remove`, every slot no process holds is
/// removed (under its lock, so a run cannot take it meanwhile); a run that starts later
/// makes its checkouts anew.
pub fn kept_slots(cohort_dir: &Path, remove: bool) -> Result<Vec<KeptSlot>> {
    let base = cohort_dir.join(KEPT_POOL);
    let mut slots: Vec<(usize, String)> = match std::fs::read_dir(base.join(CHECKOUTS)) {
        Ok(rd) => rd
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_str()?.to_string();
                match name.parse::<usize>() {
                    Ok(n) => Some((n, name)),
                    Err(_) => (name == SEED).then_some((usize::MAX, name)),
                }
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", base.display())),
    };
    slots.sort_unstable();
    let mut out = Vec::new();
    for (_, name) in slots {
        let kinds: &[&str] = if name == SEED {
            &[CHECKOUTS, ADMIN]
        } else {
            &[CHECKOUTS, ADMIN, GIT_DIRS]
        };
        let dirs: Vec<PathBuf> = kinds.iter().map(|d| base.join(d).join(&name)).collect();
        // Held until the end of this iteration: no run takes the slot while it is removed.
        let lock = crate::lockfile::try_lock_path(&base.join(format!("{name}.lock")))?;
        let free = lock.is_some();
        if free && remove {
            checkout::remove_tree(&dirs[0])?;
            for d in &dirs[1..] {
                safefs::remove_path(d).with_context(|| format!("cannot remove {}", d.display()))?;
            }
        }
        out.push(KeptSlot {
            name,
            dirs,
            busy: !free,
        });
    }
    Ok(out)
}

/// Lets at most as many checkouts be written whole at once as the machine has CPUs. Making
/// a file costs mostly kernel time, so sixteen checkouts written side by side on two CPUs
/// all finish late, together, and no agent starts before the last; through the gate the
/// first two are ready after the time of one, and their agents run while the rest are
/// written. Moving a checkout by a tree diff does not pass the gate.
#[derive(Debug)]
pub struct Gate {
    open: Mutex<usize>,
    freed: std::sync::Condvar,
}

/// A place taken at the [`Gate`], given back when dropped.
pub struct Permit<'a>(&'a Gate);

impl Gate {
    pub fn new(places: usize) -> Gate {
        Gate {
            open: Mutex::new(places.max(1)),
            freed: std::sync::Condvar::new(),
        }
    }

    fn for_this_machine() -> Gate {
        Gate::new(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2))
    }

    /// Waits for a place (first come, first served is not promised: any waiter may win).
    pub fn enter(&self) -> Permit<'_> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        while *open == 0 {
            open = self.freed.wait(open).unwrap_or_else(|e| e.into_inner());
        }
        *open -= 1;
        Permit(self)
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        *self.0.open.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.0.freed.notify_one();
    }
}

/// Marks `dir` as the top of independent directory hierarchies (the `T`
/// attribute of `chattr`), so ext4 places each checkout made in it in a
/// block group of its own choosing with room to spare, rather than next to
/// its parent. Next to the parent is typically where earlier checkouts were
/// just removed, and on ext4 without a journal every allocation there scans
/// past the inodes freed in the last minutes; a first checkout there was
/// measured at 3-10 times the cost. Best effort: other file systems refuse
/// or ignore it.
fn spread_subdirectories(dir: &Path) {
    use std::os::fd::AsRawFd;
    const FS_TOPDIR_FL: libc::c_int = 0x0002_0000;
    let Ok(f) = std::fs::File::open(dir) else { return };
    let mut flags: libc::c_int = 0;
    // SAFETY: both requests read or write one int through a valid pointer.
    unsafe {
        if libc::ioctl(f.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) == 0 && flags & FS_TOPDIR_FL == 0 {
            flags |= FS_TOPDIR_FL;
            libc::ioctl(f.as_raw_fd(), libc::FS_IOC_SETFLAGS, &flags);
        }
    }
}
