//! A pool of reusable checkouts (linked worktrees sharing the repository's
//! object store), at most one per concurrently running task.
//!
//! A checkout is made once per slot and then moved from task to task with
//! [`checkout::move_to`], which writes only the files that differ. The pool
//! lives in the git dir, outside the user's working tree, and is removed at
//! the end of the run.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

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

    /// Points the checkout at `branch_ref` and makes its files match `base`.
    pub fn prepare(&self, branch_ref: &str, base: Oid) -> Result<checkout::MoveStats> {
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

    /// A free checkout, or a new one. A leased checkout is held by one task
    /// until [`Pool::release`]; the caller bounds concurrency, so the pool
    /// grows to at most that many slots.
    pub fn lease(&self) -> Result<Checkout> {
        let slot = {
            let mut st = self.state.lock().unwrap();
            if let Some(c) = st.free.pop() {
                return Ok(c);
            }
            st.made += 1;
            st.made - 1
        };
        self.make(slot)
    }

    pub fn release(&self, checkout: Checkout) {
        self.state.lock().unwrap().free.push(checkout);
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
        Ok(Checkout { slot, path, admin })
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
