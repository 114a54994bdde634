//! Idmapped bind mounts (Linux ≥ 5.12, `mount_setattr(MOUNT_ATTR_IDMAP)`), made by cohort itself.
//!
//! Why not podman's `idmap` mount option: podman 4.3 hands that option to the OCI runtime, and
//! runc before 1.2 (Debian 12 ships 1.1.5; crun refuses hosts with hybrid cgroups) ignores it,
//! so the checkout shows up as `nobody` and is read-only to the container user. Podman 4.3's
//! option also maps disk ids 1:1 onto container ids, so the container user would have to be
//! the checkout's owner. A mount made here works with every runtime: the runtime only
//! bind-mounts a path, and a bind of an idmapped mount keeps its idmapping. And it maps exactly
//! one owner: files owned on disk by the checkout's owner appear as the container's image user
//! (whose host id is unprivileged under `userns=auto`), and what that user writes is stored as
//! the checkout's owner. Nothing is chowned.
//!
//! Needs CAP_SYS_ADMIN (cohort running as root next to a rootful engine, in the same mount
//! namespace). [`supported`] probes for it once.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

// uapi/linux/mount.h (defined here so an older libc crate does not matter).
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// One id mapped by a mount: on-disk `disk` is seen and written as host id `host`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdMap {
    pub uid: (u32, u32),
    pub gid: (u32, u32),
}

/// An idmapped view of a host directory at a staging path; unmounted (and the staging
/// directory removed) on drop.
#[derive(Debug)]
pub struct IdmappedMount {
    target: PathBuf,
}

impl IdmappedMount {
    /// Mount each `(source, target)` (recursively, submounts included) at `target`, created if
    /// missing, all with the same mapping. All or nothing: on an error, those made are undone.
    pub fn create_all(pairs: &[(PathBuf, PathBuf)], map: IdMap) -> io::Result<Vec<IdmappedMount>> {
        let userns = userns_with(map)?;
        let mut made = Vec::new();
        for (source, target) in pairs {
            made.push(Self::create_with(source, target, &userns)?);
        }
        Ok(made)
    }

    fn create_with(source: &Path, target: &Path, userns: &OwnedFd) -> io::Result<IdmappedMount> {
        std::fs::create_dir_all(target)?;
        let src = cstr(source)?;
        let dst = cstr(target)?;
        let flags = OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | libc::AT_RECURSIVE as libc::c_uint;
        // SAFETY: plain syscalls with valid NUL-terminated paths; the returned fd is owned below.
        let tree = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, src.as_ptr(), flags) };
        if tree < 0 {
            return Err(io::Error::last_os_error());
        }
        let tree = unsafe { OwnedFd::from_raw_fd(tree as i32) };
        let attr = MountAttr {
            attr_set: MOUNT_ATTR_IDMAP,
            attr_clr: 0,
            propagation: 0,
            userns_fd: userns.as_raw_fd() as u64,
        };
        let empty = c"";
        // SAFETY: `attr` outlives the call and its size is passed.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                tree.as_raw_fd(),
                empty.as_ptr(),
                libc::AT_EMPTY_PATH | libc::AT_RECURSIVE,
                &attr as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above; on success the detached tree is attached at `target`.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_move_mount,
                tree.as_raw_fd(),
                empty.as_ptr(),
                libc::AT_FDCWD,
                dst.as_ptr(),
                MOVE_MOUNT_F_EMPTY_PATH,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(IdmappedMount {
            target: target.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.target
    }
}

impl Drop for IdmappedMount {
    fn drop(&mut self) {
        unmount(&self.target);
    }
}

/// Detach the mount at `target` (if any) and remove the directory. Also used for staging
/// directories a killed cohort left behind.
pub fn unmount(target: &Path) {
    if let Ok(p) = cstr(target) {
        // MNT_DETACH: a container that still holds a bind of it keeps its own copy.
        unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) };
    }
    let _ = std::fs::remove_dir(target);
}

/// Can this process make idmapped mounts here? Tries one on a scratch directory under `dir`.
pub fn supported(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let probe = tempfile::Builder::new().prefix("probe-").tempdir_in(dir)?;
    let target = probe.path().join("mnt");
    let source = probe.path().join("src");
    std::fs::create_dir(&source)?;
    let identity = IdMap {
        uid: (0, 0),
        gid: (0, 0),
    };
    drop(IdmappedMount::create_all(&[(source, target)], identity)?);
    Ok(())
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// A user namespace whose only mapping is `map` (disk id inside, host id outside), as an fd.
/// It is made by a forked child: `unshare(CLONE_NEWUSER)` is refused in a multi-threaded
/// process. The namespace outlives the child because the fd keeps it.
fn userns_with(map: IdMap) -> io::Result<OwnedFd> {
    let (ready_r, ready_w) = pipe()?;
    let (done_r, done_w) = pipe()?;
    // SAFETY: the child runs only async-signal-safe syscalls (unshare, write, read, _exit).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        unsafe {
            let ok: u8 = (libc::unshare(libc::CLONE_NEWUSER) == 0) as u8;
            libc::write(ready_w.as_raw_fd(), &ok as *const u8 as *const libc::c_void, 1);
            let mut b = 0u8;
            libc::read(done_r.as_raw_fd(), &mut b as *mut u8 as *mut libc::c_void, 1);
            libc::_exit(0);
        }
    }
    drop(ready_w);
    drop(done_r);
    let result = (|| {
        let mut ok = [0u8; 1];
        let n = unsafe { libc::read(ready_r.as_raw_fd(), ok.as_mut_ptr() as *mut libc::c_void, 1) };
        if n != 1 || ok[0] != 1 {
            return Err(io::Error::other("cannot create a user namespace"));
        }
        let proc = PathBuf::from(format!("/proc/{pid}"));
        std::fs::write(proc.join("uid_map"), format!("{} {} 1\n", map.uid.0, map.uid.1))?;
        std::fs::write(proc.join("gid_map"), format!("{} {} 1\n", map.gid.0, map.gid.1))?;
        let f = std::fs::File::open(proc.join("ns/user"))?;
        Ok(OwnedFd::from(f))
    })();
    // A byte rather than EOF: another thread's fork may hold a copy of `done_w`.
    unsafe { libc::write(done_w.as_raw_fd(), b"x".as_ptr() as *const libc::c_void, 1) };
    drop(done_w);
    let mut status = 0;
    unsafe { libc::waitpid(pid, &mut status, 0) };
    result
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// Needs root (as the podman tests do): a file owned by 0 on disk is seen as 4242:4343
    /// through the mount, and unmounting removes the staging directory.
    #[test]
    fn maps_one_owner() {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("f"), "x").unwrap();
        let target = tmp.path().join("view");
        let map = IdMap {
            uid: (0, 4242),
            gid: (0, 4343),
        };
        let m = IdmappedMount::create_all(&[(src.clone(), target.clone())], map).unwrap();
        let meta = std::fs::metadata(m[0].path().join("f")).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (4242, 4343));
        drop(m);
        assert!(!target.exists(), "staging directory removed");
        assert_eq!(std::fs::metadata(src.join("f")).unwrap().uid(), 0);
    }
}
