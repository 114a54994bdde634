//! Directories an agent could write, read and changed without following what it left there.
//!
//! A task's checkout and its private git dir are the agent's: any name in them may be a
//! symlink to a file elsewhere, a FIFO that blocks whoever opens it, or a device. cohort works
//! in them through a directory descriptor opened without following symlinks and names
//! relative to it (`openat` with `O_NOFOLLOW`, `O_NONBLOCK`), so a path is never resolved
//! through something the agent placed. The agent has ended by the time cohort looks (its
//! container is gone, or the host guard killed everything it started), so nothing moves
//! underneath.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, ResolveFlags};

/// An open directory; every name given to its methods is one path component, or (for
/// [`Dir::open_beneath`]) a relative path resolved without symlinks and without leaving it.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
}

/// What a name in a directory is, without following it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// A FIFO, socket or device: nothing git tracks, and nothing cohort opens.
    Other,
}

impl Kind {
    fn of(t: FileType) -> Kind {
        match t {
            FileType::RegularFile => Kind::File,
            FileType::Directory => Kind::Dir,
            FileType::Symlink => Kind::Symlink,
            _ => Kind::Other,
        }
    }
}

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);
const FILE_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::NOFOLLOW)
    .union(OFlags::NONBLOCK)
    .union(OFlags::NOCTTY)
    .union(OFlags::CLOEXEC);
/// No symlinks (nor /proc magic links) anywhere in the path, and never above the directory.
const BENEATH: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

/// Whether `openat2` may be used: a kernel before 5.6 lacks it, and a seccomp filter (the
/// hardened system service's, a container engine's default profile) may answer ENOSYS or
/// EPERM for it. Then paths are walked a component at a time instead.
static OPENAT2: AtomicBool = AtomicBool::new(true);

fn no_openat2(e: rustix::io::Errno) -> bool {
    use rustix::io::Errno;
    let missing = matches!(e, Errno::NOSYS | Errno::PERM);
    if missing {
        OPENAT2.store(false, Ordering::Relaxed);
    }
    missing
}

fn absent(e: &rustix::io::Errno) -> bool {
    use rustix::io::Errno;
    matches!(*e, Errno::NOENT | Errno::NOTDIR | Errno::LOOP)
}

impl Dir {
    /// Opens `path` as a directory; fails if its last component is a symlink or not a
    /// directory (the components before it are cohort's own).
    pub fn open(path: &Path) -> io::Result<Dir> {
        let fd = rfs::open(path, DIR_FLAGS, Mode::empty()).map_err(|e| annotate(e.into(), path))?;
        Ok(Dir { fd })
    }

    /// A subdirectory, or `None` when `name` is missing, a symlink or not a directory.
    pub fn sub(&self, name: &OsStr) -> io::Result<Option<Dir>> {
        match rfs::openat(&self.fd, name, DIR_FLAGS, Mode::empty()) {
            Ok(fd) => Ok(Some(Dir { fd })),
            Err(e) if absent(&e) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// What `name` is, without following it; `None` if it does not exist.
    pub fn stat(&self, name: &OsStr) -> io::Result<Option<rfs::Stat>> {
        match rfs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st)),
            Err(e) if absent(&e) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The directory's own status.
    pub fn fstat(&self) -> io::Result<rfs::Stat> {
        Ok(rfs::fstat(&self.fd)?)
    }

    /// Every name in the directory with its kind, sorted by name.
    pub fn entries(&self) -> io::Result<Vec<(OsString, Kind)>> {
        let mut out = Vec::new();
        for entry in rfs::Dir::read_from(&self.fd)? {
            let entry = entry?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let name = OsStr::from_bytes(name).to_os_string();
            let kind = match entry.file_type() {
                FileType::Unknown => match self.stat(&name)? {
                    Some(st) => Kind::of(FileType::from_raw_mode(st.st_mode)),
                    None => continue,
                },
                t => Kind::of(t),
            };
            out.push((name, kind));
        }
        out.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        Ok(out)
    }

    /// Opens a regular file for reading; `None` when `name` is missing or anything else (a
    /// symlink, a FIFO, a device, a directory). The kind is checked before the open, so a
    /// device is never opened, and again on the open file.
    pub fn open_file(&self, name: &OsStr) -> io::Result<Option<(File, rfs::Stat)>> {
        match self.stat(name)? {
            Some(st) if FileType::from_raw_mode(st.st_mode) == FileType::RegularFile => {}
            _ => return Ok(None),
        }
        let fd = match rfs::openat(&self.fd, name, FILE_FLAGS, Mode::empty()) {
            Ok(fd) => fd,
            Err(e) if absent(&e) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        regular(fd)
    }

    /// Opens the regular file at the relative `path` (several components), refusing a
    /// symlink anywhere in it and never leaving this directory.
    pub fn open_beneath(&self, path: &Path) -> io::Result<Option<(File, rfs::Stat)>> {
        let (parent, name) = match (path.parent(), path.file_name()) {
            (Some(p), Some(n)) => (p, n),
            _ => return Ok(None),
        };
        if OPENAT2.load(Ordering::Relaxed) {
            match rfs::openat2(&self.fd, path, FILE_FLAGS, Mode::empty(), BENEATH) {
                Ok(fd) => return regular(fd),
                Err(e) if absent(&e) || e == rustix::io::Errno::XDEV => return Ok(None),
                Err(e) if !no_openat2(e) => return Err(e.into()),
                Err(_) => {}
            }
        }
        match self.sub_beneath(parent)? {
            Some(dir) => dir.open_file(name),
            None => Ok(None),
        }
    }

    /// Opens the directory at the relative `path`, like [`Dir::open_beneath`].
    pub fn sub_beneath(&self, path: &Path) -> io::Result<Option<Dir>> {
        if path.as_os_str().is_empty() {
            return Ok(Some(Dir {
                fd: self.fd.try_clone()?,
            }));
        }
        if OPENAT2.load(Ordering::Relaxed) {
            match rfs::openat2(&self.fd, path, DIR_FLAGS, Mode::empty(), BENEATH) {
                Ok(fd) => return Ok(Some(Dir { fd })),
                Err(e) if absent(&e) || e == rustix::io::Errno::XDEV => return Ok(None),
                Err(e) if !no_openat2(e) => return Err(e.into()),
                Err(_) => {}
            }
        }
        // Component by component, each opened without following a symlink.
        let mut dir: Option<Dir> = None;
        for comp in path.components() {
            let std::path::Component::Normal(name) = comp else {
                return Ok(None); // `..`, `/`: never leave this directory
            };
            let next = match &dir {
                None => self.sub(name)?,
                Some(d) => d.sub(name)?,
            };
            match next {
                Some(d) => dir = Some(d),
                None => return Ok(None),
            }
        }
        Ok(dir)
    }

    /// The whole content of a regular file of at most `cap` bytes; `None` when it is missing,
    /// not a regular file, or larger.
    pub fn read_small(&self, name: &OsStr, cap: u64) -> io::Result<Option<Vec<u8>>> {
        let Some((file, st)) = self.open_file(name)? else {
            return Ok(None);
        };
        if st.st_size as u64 > cap {
            return Ok(None);
        }
        let mut buf = Vec::with_capacity(st.st_size as usize);
        file.take(cap + 1).read_to_end(&mut buf)?;
        Ok((buf.len() as u64 <= cap).then_some(buf))
    }

    /// A symlink's target, as bytes.
    pub fn read_link(&self, name: &OsStr) -> io::Result<Vec<u8>> {
        Ok(rfs::readlinkat(&self.fd, name, Vec::new())?.into_bytes())
    }

    /// Makes `name` a regular file holding exactly `bytes`. An existing regular file with
    /// one link is rewritten in place (no new inode: creating files is what is slow on the
    /// machines this runs on); anything else there (a symlink, a hard link, a FIFO, a
    /// directory) is removed first, never written through.
    pub fn write_file(&self, name: &OsStr, bytes: &[u8], mode: u32) -> io::Result<()> {
        if let Some(st) = self.stat(name)? {
            let plain = FileType::from_raw_mode(st.st_mode) == FileType::RegularFile && st.st_nlink == 1;
            if plain {
                let flags = OFlags::RDWR | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
                if let Ok(fd) = rfs::openat(&self.fd, name, flags, Mode::empty()) {
                    let f = File::from(fd);
                    let mut old = Vec::new();
                    if (&f).take(bytes.len() as u64 + 1).read_to_end(&mut old).is_ok() && old == bytes {
                        return Ok(());
                    }
                    f.set_len(0)?;
                    std::os::unix::fs::FileExt::write_all_at(&f, bytes, 0)?;
                    return Ok(());
                }
            }
            self.remove(name)?;
        }
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rfs::openat(&self.fd, name, flags, Mode::from_raw_mode(mode))?;
        File::from(fd).write_all(bytes)
    }

    /// Makes `name` a directory (removing whatever else is there) and opens it.
    pub fn make_dir(&self, name: &OsStr) -> io::Result<Dir> {
        if let Some(d) = self.sub(name)? {
            return Ok(d);
        }
        if self.stat(name)?.is_some() {
            self.remove(name)?;
        }
        rfs::mkdirat(&self.fd, name, Mode::from_raw_mode(0o755))?;
        self.sub(name)?
            .ok_or_else(|| io::Error::other(format!("{} vanished after it was made", name.to_string_lossy())))
    }

    /// Removes `name` whatever it is (a directory with everything below it); a symlink is
    /// removed itself, never followed. Missing is fine.
    pub fn remove(&self, name: &OsStr) -> io::Result<()> {
        match self.stat(name)? {
            None => Ok(()),
            Some(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                // std's remove_dir_all works with openat/unlinkat and does not follow symlinks;
                // the path reaches the directory through this descriptor, not by name.
                std::fs::remove_dir_all(self.proc_path(name))
            }
            Some(_) => match rfs::unlinkat(&self.fd, name, AtFlags::empty()) {
                Err(e) if absent(&e) => Ok(()),
                r => Ok(r?),
            },
        }
    }

    /// `/proc/self/fd/N/name`: reaches `name` through this descriptor (for std APIs that take
    /// paths). Only for names, and only while `self` lives.
    fn proc_path(&self, name: &OsStr) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd())).join(name)
    }

    /// The identity of the directory: device and inode.
    pub fn id(&self) -> io::Result<(u64, u64)> {
        let st = self.fstat()?;
        Ok((st.st_dev, st.st_ino))
    }

    /// Another descriptor of the same directory.
    pub fn try_clone(&self) -> io::Result<Dir> {
        Ok(Dir {
            fd: self.fd.try_clone()?,
        })
    }

    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn regular(fd: OwnedFd) -> io::Result<Option<(File, rfs::Stat)>> {
    let st = rfs::fstat(&fd)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Ok(None);
    }
    Ok(Some((File::from(fd), st)))
}

fn annotate(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Removes `path` (a directory tree, a file or a symlink) without following a symlink at any
/// level, the last component included. Missing is fine.
pub fn remove_path(path: &Path) -> io::Result<()> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(io::Error::other(format!("cannot remove {}", path.display())));
    };
    match Dir::open(parent) {
        Ok(dir) => dir.remove(name),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_beneath_without_openat2() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("a/b")).unwrap();
        std::fs::write(tmp.path().join("a/b/f"), "x").unwrap();
        std::os::unix::fs::symlink(tmp.path().join("a"), tmp.path().join("link")).unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        for openat2 in [true, false] {
            OPENAT2.store(openat2, Ordering::Relaxed);
            assert!(dir.open_beneath(Path::new("a/b/f")).unwrap().is_some());
            assert!(dir.sub_beneath(Path::new("a/b")).unwrap().is_some());
            assert!(dir.open_beneath(Path::new("link/b/f")).unwrap().is_none());
            assert!(dir.sub_beneath(Path::new("link/b")).unwrap().is_none());
            assert!(dir.sub_beneath(Path::new("a/../..")).unwrap().is_none());
        }
        OPENAT2.store(true, Ordering::Relaxed);
    }

    #[test]
    fn never_follows_what_it_finds() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside.txt");
        std::fs::write(&outside, "keep").unwrap();
        let d = tmp.path().join("d");
        std::fs::create_dir(&d).unwrap();
        std::os::unix::fs::symlink(&outside, d.join("link")).unwrap();
        std::os::unix::fs::symlink(tmp.path(), d.join("dirlink")).unwrap();
        nix::unistd::mkfifo(&d.join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        std::fs::write(d.join("plain"), "x").unwrap();
        let dir = Dir::open(&d).unwrap();
        let kinds: Vec<_> = dir
            .entries()
            .unwrap()
            .into_iter()
            .map(|(n, k)| (n.into_string().unwrap(), k))
            .collect();
        assert_eq!(
            kinds,
            [
                ("dirlink".into(), Kind::Symlink),
                ("fifo".into(), Kind::Other),
                ("link".into(), Kind::Symlink),
                ("plain".into(), Kind::File)
            ]
        );
        // Reading: a symlink or a FIFO is "not a file" (and the FIFO does not block).
        assert!(dir.open_file("link".as_ref()).unwrap().is_none());
        assert!(dir.open_file("fifo".as_ref()).unwrap().is_none());
        assert!(dir.sub("dirlink".as_ref()).unwrap().is_none());
        assert!(dir.open_beneath(Path::new("dirlink/outside.txt")).unwrap().is_none());
        assert_eq!(dir.read_small("plain".as_ref(), 10).unwrap().unwrap(), b"x");
        assert!(dir.read_small("plain".as_ref(), 0).unwrap().is_none());
        // Writing over a symlink replaces the link; the file it pointed to is untouched.
        dir.write_file("link".as_ref(), b"new", 0o644).unwrap();
        assert_eq!(std::fs::read_to_string(&outside).unwrap(), "keep");
        assert_eq!(std::fs::read_to_string(d.join("link")).unwrap(), "new");
        // Writing over a hard link does not write through it either.
        std::fs::hard_link(&outside, d.join("hard")).unwrap();
        dir.write_file("hard".as_ref(), b"other", 0o644).unwrap();
        assert_eq!(std::fs::read_to_string(&outside).unwrap(), "keep");
        // Removing a symlink to a directory removes the link only.
        dir.remove("dirlink".as_ref()).unwrap();
        assert!(outside.exists());
        // A directory is made where a FIFO stood.
        dir.make_dir("fifo".as_ref()).unwrap();
        assert!(d.join("fifo").is_dir());
        // A whole tree under a symlinked path component is not reached.
        remove_path(&d.join("link")).unwrap();
        assert!(outside.exists());
        // Opening a directory that is a symlink fails.
        assert!(Dir::open(&tmp.path().join("d/../d")).is_ok());
        std::os::unix::fs::symlink(&d, tmp.path().join("alias")).unwrap();
        assert!(Dir::open(&tmp.path().join("alias")).is_err());
    }
}
