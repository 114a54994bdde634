//! One `cohort serve` per state directory: `STATE/serve.lock`, held with an exclusive
//! open-file-description lock for the service's whole life.
//!
//! Two services on one inbox would each take the other's request in `processing/` for an
//! interrupted one and file it, so a request could end with two outcomes. The lock is an
//! OFD lock (whole file, write), as `run::lock_run` takes: it goes with the process, even
//! on `kill -9`, so there is never a stale lock to clear by hand. OFD locks carry no owner
//! (`F_OFD_GETLK` reports a PID of -1), so the holder writes its PID into the file once it
//! has the lock, and whoever is refused reads it from there for the message.

use crate::lockfile::whole_file_lock;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use super::ServiceError;

/// How long a lock whose taker is gone may stay held before it counts as another's.
const STALE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The held lock; dropping it (or the process ending) releases it.
#[derive(Debug)]
pub struct ServeLock {
    _file: std::fs::File,
}

pub fn path(state: &Path) -> PathBuf {
    state.join("serve.lock")
}

impl ServeLock {
    /// Takes the state directory's lock, or says which process holds it.
    pub fn acquire(state: &Path) -> Result<ServeLock, ServiceError> {
        let io = |e: std::io::Error| ServiceError::Io {
            path: state.to_path_buf(),
            source: e,
        };
        std::fs::create_dir_all(state).map_err(io)?;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path(state))
            .map_err(io)?;
        let lock = whole_file_lock(libc::F_WRLCK);
        // A service killed a moment ago can leave its lock held for a while by a process it
        // was forking (an agent's start, between fork and exec, holds copies of all its
        // descriptors). Refusing then would stop a restart for good (exit 2 is not
        // restarted), so while the PID in the file is not a live process, keep trying.
        let t0 = std::time::Instant::now();
        while nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_OFD_SETLK(&lock)).is_err() {
            let pid = read_pid(&mut file);
            if pid.is_some_and(alive) || t0.elapsed() > STALE_WAIT {
                return Err(ServiceError::AlreadyServing {
                    state: state.to_path_buf(),
                    pid: pid.filter(|p| alive(*p)),
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        // Truncated only now, under the lock: a refused second instance never erases the
        // PID of the one that runs.
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        file.write_all(format!("{}\n", std::process::id()).as_bytes())
            .map_err(io)?;
        Ok(ServeLock { _file: file })
    }
}

/// The PID of the `cohort serve` that holds `state`'s lock now, if one does.
pub fn holder(state: &Path) -> Option<Option<u32>> {
    let mut file = std::fs::File::open(path(state)).ok()?;
    let mut lock = whole_file_lock(libc::F_WRLCK);
    nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_OFD_GETLK(&mut lock)).ok()?;
    (lock.l_type != libc::F_UNLCK as i16).then(|| read_pid(&mut file))
}

/// The PID the holder wrote. It writes it right after taking the lock, so a reader that
/// came in between sees an empty file: it waits a moment for the number.
fn read_pid(file: &mut std::fs::File) -> Option<u32> {
    for _ in 0..20 {
        let mut text = String::new();
        if file.rewind().is_ok() && file.read_to_string(&mut text).is_ok() {
            if let Ok(pid) = text.trim().parse() {
                return Some(pid);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    None
}

/// Whether `pid` is a running process (a zombie has closed its files already).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which ends with the last ')'.
        Ok(stat) => !stat.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(holder(dir.path()), None, "no lock file, no holder");
        let first = ServeLock::acquire(dir.path()).unwrap();
        // OFD locks conflict between open file descriptions, also within one process.
        match ServeLock::acquire(dir.path()) {
            Err(ServiceError::AlreadyServing { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("a second lock was not refused: {other:?}"),
        }
        assert_eq!(holder(dir.path()), Some(Some(std::process::id())));
        drop(first);
        assert_eq!(holder(dir.path()), None, "released with the file");
        let _again = ServeLock::acquire(dir.path()).unwrap();
    }

    #[test]
    fn a_lock_left_held_by_a_dead_takers_descendant_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let held = ServeLock::acquire(dir.path()).unwrap();
        // The file names a process that has ended, as after a kill -9 of the taker while a
        // forked child of its still holds the descriptor.
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        gone.wait().unwrap();
        std::fs::write(path(dir.path()), format!("{}\n", gone.id())).unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(held);
        });
        let t0 = std::time::Instant::now();
        let _lock = ServeLock::acquire(dir.path()).expect("taken once released");
        assert!(t0.elapsed() >= std::time::Duration::from_millis(250));
        release.join().unwrap();
        assert_eq!(holder(dir.path()), Some(Some(std::process::id())));
    }
}
