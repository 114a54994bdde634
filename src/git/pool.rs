//! A pool of reusable checkouts (linked worktrees sharing the repository's
//! object store), at most one per concurrently running task.
//!
//! A checkout is made once per slot and then moved from task to task with
//! [`checkout::move_to`], which writes only the files that differ. The pool
//! lives in the git dir, outside the user's working tree, and is removed at
//! the end of the run.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};

use super::{checkout, refs, stage, Oid};

/// A file in a checkout's private git dir naming the tree its files and
/// index hold exactly; written after cohort commits, emptied before an
/// agent runs. Without it, a checkout is compared with its index first.
/// (Emptied in place rather than removed: on a file system without a
/// journal, ext4 skips over recently freed inodes when it allocates one,
/// so every file removed makes the next files created a little slower.)
pub const CLEAN_MARK: &str = "cohort-clean";

#[derive(Debug, Clone)]
pub struct Checkout {
    pub slot: usize,
    /// The working tree the agent runs in.
    pub path: PathBuf,
    /// The worktree's private git dir (`<common>/worktrees/<name>`).
    pub admin: PathBuf,
    /// The repository's git dir, shared by all its worktrees.
    pub common_dir: PathBuf,
}

impl Checkout {
    /// Opens the checkout as a repository, first restoring its `.git` link
    /// in case the agent deleted it.
    pub fn open(&self) -> Result<gix::Repository> {
        std::fs::create_dir_all(&self.path)?;
        let link = self.path.join(".git");
        let want = format!("gitdir: {}\n", self.admin.display());
        if std::fs::read_to_string(&link).ok().as_deref() != Some(want.as_str()) {
            if link.is_dir() {
                std::fs::remove_dir_all(&link)?;
            }
            std::fs::write(&link, want)?;
        }
        super::open(&self.path)
    }

    /// Removes what a killed agent's git may have left in the checkout's
    /// git dir: lock files (gix, like git, refuses to write while one
    /// exists, so one stale `index.lock` would fail every later task in
    /// this slot) and, with `unfinished`, a merge, rebase, cherry-pick,
    /// revert or bisect the agent began. Only for a leased checkout whose
    /// agent has ended: then no one else can hold these.
    pub fn clear_leftovers(&self, branch_ref: &str, unfinished: bool) -> Result<()> {
        const LOCKS: [&str; 2] = ["index.lock", "HEAD.lock"];
        const UNFINISHED: [&str; 10] = [
            "MERGE_HEAD",
            "MERGE_MSG",
            "MERGE_MODE",
            "AUTO_MERGE",
            "CHERRY_PICK_HEAD",
            "REVERT_HEAD",
            "BISECT_LOG",
            "rebase-merge",
            "rebase-apply",
            "sequencer",
        ];
        let branch_lock = self.common_dir.join(format!("{branch_ref}.lock"));
        let mut paths: Vec<PathBuf> = LOCKS.iter().map(|n| self.admin.join(n)).collect();
        paths.push(branch_lock);
        if unfinished {
            paths.extend(UNFINISHED.iter().map(|n| self.admin.join(n)));
        }
        for p in paths {
            let gone = match std::fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => std::fs::remove_dir_all(&p),
                Ok(_) => std::fs::remove_file(&p),
                Err(_) => continue,
            };
            gone.with_context(|| format!("cannot remove {}", p.display()))?;
            tracing::debug!(path = %p.display(), "removed an agent's leftover");
        }
        Ok(())
    }

    /// Points the checkout at `branch_ref` and makes its files match `base`.
    pub fn prepare(&self, branch_ref: &str, base: Oid) -> Result<checkout::MoveStats> {
        self.clear_leftovers(branch_ref, true)?;
        let repo = self.open()?;
        refs::set_head_symbolic(&repo, branch_ref)?;
        let tree = super::tree_of(&repo, base)?;
        // Trust the clean mark once: from here on the agent may change anything.
        let mark = self.admin.join(CLEAN_MARK);
        let known = std::fs::read_to_string(&mark)
            .ok()
            .and_then(|s| s.trim().parse::<Oid>().ok());
        if known.is_some() {
            std::fs::write(&mark, "")?;
        }
        let stats = checkout::move_to(&repo, tree, checkout::Untracked::Remove, known)
            .with_context(|| format!("cannot update checkout {}", self.path.display()))?;
        stage::record(&self.admin, tree, stats.index_checksum)?;
        Ok(stats)
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
            self.pool.state.lock().unwrap().free.push(c);
        }
    }
}

pub struct Pool {
    common_dir: PathBuf,
    name_prefix: String,
    root: PathBuf,
    state: Mutex<PoolState>,
}

#[derive(Default)]
struct PoolState {
    free: Vec<Checkout>,
    made: usize,
}

impl Pool {
    /// A pool for one run; `root` is where checkouts are made.
    pub fn new(common_dir: &Path, run_id: &str, root: PathBuf) -> Pool {
        Pool {
            common_dir: common_dir.to_path_buf(),
            name_prefix: format!("cohort-{run_id}-"),
            root,
            state: Mutex::new(PoolState::default()),
        }
    }

    /// A free checkout, or a new one, held by one task until the lease is
    /// dropped (on every path, errors included). The caller bounds
    /// concurrency, so the pool grows to at most that many slots.
    pub fn lease(self: &Arc<Self>) -> Result<Lease> {
        let slot = {
            let mut st = self.state.lock().unwrap();
            match st.free.pop() {
                Some(c) => return Ok(Lease::new(self, c)),
                None => {
                    st.made += 1;
                    st.made - 1
                }
            }
        };
        let checkout = self.make(slot)?;
        Ok(Lease::new(self, checkout))
    }

    fn make(&self, slot: usize) -> Result<Checkout> {
        let path = self.root.join(slot.to_string());
        let admin = self
            .common_dir
            .join("worktrees")
            .join(format!("{}{slot}", self.name_prefix));
        if !self.root.is_dir() {
            std::fs::create_dir_all(&self.root).with_context(|| format!("cannot create {}", self.root.display()))?;
            spread_subdirectories(&self.root);
        }
        std::fs::create_dir_all(&path).with_context(|| format!("cannot create {}", path.display()))?;
        std::fs::create_dir_all(&admin).with_context(|| format!("cannot create {}", admin.display()))?;
        // The linked-worktree layout git itself uses, so the agent's own git
        // commands work in the checkout.
        write_if_changed(&admin.join("commondir"), "../..\n")?;
        write_if_changed(&admin.join("gitdir"), &format!("{}\n", path.join(".git").display()))?;
        if !admin.join("HEAD").exists() {
            // Placeholder until `prepare` points it at a task branch.
            let repo = super::open(&self.common_dir)?;
            let head = repo.head_id().context("the repository has no HEAD commit")?;
            std::fs::write(admin.join("HEAD"), format!("{}\n", head.detach()))?;
        }
        Ok(Checkout {
            slot,
            path,
            admin,
            common_dir: self.common_dir.clone(),
        })
    }

    /// Removes every checkout this pool made (and any left from an earlier
    /// process of the same run).
    pub fn remove_all(&self) -> Result<()> {
        checkout::remove_tree(&self.root)?;
        let worktrees = self.common_dir.join("worktrees");
        if let Ok(rd) = std::fs::read_dir(&worktrees) {
            for entry in rd.flatten() {
                if entry.file_name().to_string_lossy().starts_with(&self.name_prefix) {
                    std::fs::remove_dir_all(entry.path())?;
                }
            }
        }
        let _ = std::fs::remove_dir(&worktrees); // only if now empty
        self.state.lock().unwrap().free.clear();
        Ok(())
    }
}

fn write_if_changed(path: &Path, content: &str) -> Result<()> {
    if std::fs::read_to_string(path).ok().as_deref() != Some(content) {
        std::fs::write(path, content).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
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
