//! Whole-file open-file-description locks: the run lock, cache and checkout slots, the
//! service's state-directory lock. An OFD lock goes with the open file, so a process that
//! dies (`kill -9` included) never leaves a stale lock to clear by hand, and two opens of
//! one file in the same process exclude each other, as two processes do.

use std::fs::File;
use std::io;

/// A whole-file lock request for `fcntl`'s OFD commands.
pub(crate) fn whole_file_lock(kind: i32) -> libc::flock {
    // SAFETY: flock is plain data; zero is "from the start, to the end".
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as i16;
    lock.l_whence = libc::SEEK_SET as i16;
    lock
}

/// Takes a write lock on the whole of `file`: `Ok(false)` when another holds it and `wait`
/// is false; with `wait`, blocks until it is free.
pub(crate) fn try_lock(file: &File, wait: bool) -> io::Result<bool> {
    try_lock_kind(file, libc::F_WRLCK, wait)
}

/// A read lock on the whole of `file`: many holders, and no write lock meanwhile.
pub(crate) fn try_lock_shared(file: &File, wait: bool) -> io::Result<bool> {
    try_lock_kind(file, libc::F_RDLCK, wait)
}

fn try_lock_kind(file: &File, kind: i32, wait: bool) -> io::Result<bool> {
    let lock = whole_file_lock(kind);
    let arg = match wait {
        true => nix::fcntl::FcntlArg::F_OFD_SETLKW(&lock),
        false => nix::fcntl::FcntlArg::F_OFD_SETLK(&lock),
    };
    match nix::fcntl::fcntl(file, arg) {
        Ok(_) => Ok(true),
        Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EACCES) if !wait => Ok(false),
        Err(e) => Err(io::Error::from(e)),
    }
}

/// Opens (creating it) the lock file at `path` and takes its write lock without waiting: the
/// open file holding the lock, or `None` when another holds it.
pub(crate) fn try_lock_path(path: &std::path::Path) -> anyhow::Result<Option<File>> {
    use anyhow::Context;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let held = try_lock(&file, false).with_context(|| format!("cannot lock {}", path.display()))?;
    Ok(held.then_some(file))
}
