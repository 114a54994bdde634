//! One reproducible layer: a sorted set of entries written as a gzipped tar.
//!
//! Reproducibility rules (so the same inputs give the same digest):
//! entries are sorted by path; every mtime is the caller's `SOURCE_DATE_EPOCH`; owners are
//! numeric and fixed (0 unless the caller says otherwise) with no user/group names; headers are
//! plain GNU headers (no pax atime/ctime records); the gzip header has mtime 0 and no file name.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use flate2::{Compression, GzBuilder};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::blob::{BlobStore, HashingWriter};
use crate::error::{Error, IoContext, Result};
use crate::pipe::Pipe;

/// How a layer is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerOptions {
    /// mtime of every entry (SOURCE_DATE_EPOCH).
    pub mtime: u64,
    /// gzip level 0..=9.
    pub compression: u32,
}

/// A written layer blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    /// Digest of the compressed blob (what the manifest names).
    pub digest: String,
    /// Digest of the uncompressed tar (what the config's rootfs names).
    pub diff_id: String,
    /// Size of the compressed blob.
    pub size: u64,
}

#[derive(Debug, Clone)]
enum Kind {
    Dir,
    File { source: Source, size: u64 },
    Symlink(String),
}

#[derive(Debug, Clone)]
enum Source {
    /// A host file; dev, ino and mtime feed the reuse fingerprint and hard-link detection.
    Host {
        path: PathBuf,
        dev: u64,
        ino: u64,
        mtime_ns: i128,
    },
    Bytes(Vec<u8>),
}

#[derive(Debug, Clone)]
struct Entry {
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
}

/// Collects entries for one layer. Keys are image paths without the leading `/`.
#[derive(Debug, Default, Clone)]
pub struct LayerBuilder {
    entries: BTreeMap<String, Entry>,
    mirrored: HashSet<PathBuf>,
}

/// `/usr/bin/git` → `usr/bin/git`; rejects relative paths and `..`.
pub(crate) fn image_key(path: &str) -> Result<String> {
    let p = Path::new(path);
    let mut parts = Vec::new();
    for c in p.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(s) => parts.push(s.to_string_lossy().into_owned()),
            _ => return Err(Error::BadImagePath(path.to_owned())),
        }
    }
    if !p.is_absolute() {
        return Err(Error::BadImagePath(path.to_owned()));
    }
    Ok(parts.join("/"))
}

/// Lexical normalisation (`a/b/../c` → `a/c`), as the kernel does when following a symlink.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(s) => out.push(s),
            _ => {}
        }
    }
    out
}

impl LayerBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Image paths in this layer, sorted (with a leading `/`).
    pub fn paths(&self) -> impl Iterator<Item = String> + '_ {
        self.entries.keys().map(|k| format!("/{k}"))
    }

    fn insert(&mut self, key: String, entry: Entry) {
        if key.is_empty() {
            return;
        }
        // Parents default to root-owned 0755 directories, unless already present.
        let mut parent = Path::new(&key).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            let k = p.to_string_lossy().into_owned();
            self.entries.entry(k).or_insert(Entry {
                kind: Kind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
            });
            parent = p.parent();
        }
        self.entries.insert(key, entry);
    }

    /// A directory owned by `uid:gid`.
    pub fn dir(&mut self, image_path: &str, mode: u32, uid: u32, gid: u32) -> Result<()> {
        let key = image_key(image_path)?;
        let kind = Kind::Dir;
        self.insert(key, Entry { kind, mode, uid, gid });
        Ok(())
    }

    /// A root-owned file with the given content.
    pub fn bytes(&mut self, image_path: &str, data: impl Into<Vec<u8>>, mode: u32) -> Result<()> {
        let key = image_key(image_path)?;
        let data = data.into();
        let size = data.len() as u64;
        let kind = Kind::File {
            source: Source::Bytes(data),
            size,
        };
        self.insert(
            key,
            Entry {
                kind,
                mode,
                uid: 0,
                gid: 0,
            },
        );
        Ok(())
    }

    pub fn symlink(&mut self, image_path: &str, target: &str) -> Result<()> {
        let key = image_key(image_path)?;
        let kind = Kind::Symlink(target.to_owned());
        self.insert(
            key,
            Entry {
                kind,
                mode: 0o777,
                uid: 0,
                gid: 0,
            },
        );
        Ok(())
    }

    /// Copy the host file `host` (following symlinks) to `image_path`, keeping its permission bits.
    /// For the codex/cohort binaries and the caller's repository files.
    pub fn host_file(&mut self, host: &Path, image_path: &str) -> Result<()> {
        let key = image_key(image_path)?;
        let meta = fs::metadata(host).map_err(|e| missing_or_io(host, e))?;
        if !meta.is_file() {
            return Err(Error::Unsupported { path: host.to_owned() });
        }
        self.insert(key, file_entry(host, &meta));
        Ok(())
    }

    /// Mirror a host path at the same place in the image: directories recursively, symlinks
    /// kept as symlinks (their targets mirrored too, so they resolve), and symlinked ancestors
    /// such as Debian's `/lib -> usr/lib` reproduced, so the loader finds what it expects.
    pub fn host_path(&mut self, host: &Path) -> Result<()> {
        if !host.is_absolute() {
            return Err(Error::BadImagePath(host.display().to_string()));
        }
        self.mirror(&normalize(host), 0, true).map(|_| ())
    }

    /// Mirror `path`; returns its real (symlink-free) host path. With `whole` false a final
    /// directory gets only its own entry: that is how a symlinked ancestor (`/bin -> usr/bin`)
    /// is made to resolve without copying everything in it.
    fn mirror(&mut self, path: &Path, depth: u32, whole: bool) -> Result<PathBuf> {
        if depth > 40 {
            return Err(Error::SymlinkLoop(path.to_owned()));
        }
        let comps: Vec<_> = path.components().skip(1).collect();
        let mut cur = PathBuf::from("/");
        for (i, c) in comps.iter().enumerate() {
            let next = cur.join(c);
            let meta = fs::symlink_metadata(&next).map_err(|e| missing_or_io(&next, e))?;
            let last = i + 1 == comps.len();
            if meta.file_type().is_symlink() {
                let target = fs::read_link(&next).at(&next)?;
                let key = image_key(&next.to_string_lossy())?;
                let kind = Kind::Symlink(target.to_string_lossy().into_owned());
                self.insert(
                    key,
                    Entry {
                        kind,
                        mode: 0o777,
                        uid: 0,
                        gid: 0,
                    },
                );
                let whole = whole && last;
                cur = self.mirror(&normalize(&cur.join(&target)), depth + 1, whole)?;
            } else if last && (whole || !meta.is_dir()) {
                self.add_existing(&next, &meta)?;
                cur = next;
            } else {
                let key = image_key(&next.to_string_lossy())?;
                if !self.entries.contains_key(&key) {
                    let e = Entry {
                        kind: Kind::Dir,
                        mode: meta.mode() & 0o7777,
                        uid: 0,
                        gid: 0,
                    };
                    self.insert(key, e);
                }
                cur = next;
            }
        }
        Ok(cur)
    }

    /// Add a path whose parent is real (no symlinks), by type.
    fn add_existing(&mut self, path: &Path, meta: &fs::Metadata) -> Result<()> {
        if !self.mirrored.insert(path.to_owned()) {
            return Ok(());
        }
        let key = image_key(&path.to_string_lossy())?;
        let ft = meta.file_type();
        if ft.is_symlink() {
            let target = fs::read_link(path).at(path)?;
            let kind = Kind::Symlink(target.to_string_lossy().into_owned());
            self.insert(
                key,
                Entry {
                    kind,
                    mode: 0o777,
                    uid: 0,
                    gid: 0,
                },
            );
            let resolved = normalize(&path.parent().unwrap_or(Path::new("/")).join(&target));
            // A dangling link is kept as it is on the host; only live targets are mirrored.
            if resolved.exists() {
                self.mirror(&resolved, 1, true)?;
            }
        } else if ft.is_dir() {
            let e = Entry {
                kind: Kind::Dir,
                mode: meta.mode() & 0o7777,
                uid: 0,
                gid: 0,
            };
            self.insert(key, e);
            let mut children: Vec<_> = fs::read_dir(path).at(path)?.collect::<Result<_, _>>().at(path)?;
            children.sort_by_key(|c| c.file_name());
            for child in children {
                let p = child.path();
                let m = fs::symlink_metadata(&p).at(&p)?;
                self.add_existing(&p, &m)?;
            }
        } else if ft.is_file() {
            self.insert(key, file_entry(path, meta));
        } else {
            // Sockets, fifos and devices have no place in an image built from host programs.
            return Err(Error::Unsupported { path: path.to_owned() });
        }
        Ok(())
    }

    /// A digest of everything that determines this layer's bytes, cheap to compute (host files
    /// are identified by inode, size and mtime, not read). Equal fingerprints let a rebuild reuse
    /// the blob instead of re-compressing it.
    pub fn fingerprint(&self, opts: &LayerOptions) -> String {
        let mut h = Sha256::new();
        h.update(format!("v1 {} {}\n", opts.mtime, opts.compression));
        for (k, e) in &self.entries {
            h.update(format!("{k}\0{:o} {} {}\0", e.mode, e.uid, e.gid));
            match &e.kind {
                Kind::Dir => h.update(b"d\n"),
                Kind::Symlink(t) => h.update(format!("l{t}\n")),
                Kind::File {
                    source: Source::Bytes(b),
                    ..
                } => {
                    h.update(b"b");
                    h.update(Sha256::digest(b));
                }
                Kind::File {
                    source:
                        Source::Host {
                            path,
                            dev,
                            ino,
                            mtime_ns,
                            ..
                        },
                    size,
                } => h.update(format!("f{}\0{dev} {ino} {mtime_ns} {size}\n", path.display())),
            }
        }
        hex::encode(h.finalize())
    }

    /// Bytes of file content in this layer (before tar and gzip), for progress reports.
    pub fn content_size(&self) -> u64 {
        self.entries
            .values()
            .map(|e| match &e.kind {
                Kind::File { size, .. } => *size,
                _ => 0,
            })
            .sum()
    }

    /// Write the layer into `store`, reusing a previous identical build when the fingerprint
    /// matches (recorded under `<store>/layer-cache/`).
    pub fn write(&self, store: &BlobStore, opts: &LayerOptions) -> Result<Layer> {
        self.write_or_reuse(store, opts).map(|(layer, _)| layer)
    }

    /// [`write`](Self::write), also saying whether the blob was reused (`true`) rather than
    /// compressed now.
    pub fn write_or_reuse(&self, store: &BlobStore, opts: &LayerOptions) -> Result<(Layer, bool)> {
        let cache_dir = store.root().join("layer-cache");
        let cache_file = cache_dir.join(self.fingerprint(opts));
        if let Ok(text) = fs::read(&cache_file) {
            if let Ok(layer) = serde_json::from_slice::<Layer>(&text) {
                if store.contains(&layer.digest) {
                    return Ok((layer, true));
                }
            }
        }
        let layer = self.write_uncached(store, opts)?;
        fs::create_dir_all(&cache_dir).at(&cache_dir)?;
        fs::write(&cache_file, serde_json::to_vec(&layer)?).at(&cache_file)?;
        Ok((layer, false))
    }

    fn write_uncached(&self, store: &BlobStore, opts: &LayerOptions) -> Result<Layer> {
        let blob = store.writer()?;
        let tmp = blob.tmp.clone();
        let gz = GzBuilder::new()
            .mtime(0)
            .operating_system(255)
            .write(blob, Compression::new(opts.compression));
        // gzip (and the blob's digest) on a second thread; tar and the diff ID on this one.
        let gz = Pipe::spawn(gz, |gz| gz.finish());
        let mut tar = tar::Builder::new(HashingWriter::new(gz));
        let links = self.hardlink_leaders()?;
        for (key, e) in &self.entries {
            let mut h = tar::Header::new_gnu();
            h.set_mtime(opts.mtime);
            h.set_uid(e.uid as u64);
            h.set_gid(e.gid as u64);
            h.set_mode(e.mode);
            h.set_size(0);
            match &e.kind {
                Kind::Dir => {
                    h.set_entry_type(tar::EntryType::Directory);
                    tar.append_data(&mut h, format!("{key}/"), io::empty()).at(&tmp)?;
                }
                Kind::Symlink(t) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    tar.append_link(&mut h, key, t).at(&tmp)?;
                }
                Kind::File { source, size } => {
                    if let Some(leader) = links.get(key.as_str()) {
                        h.set_entry_type(tar::EntryType::Link);
                        tar.append_link(&mut h, key, leader).at(&tmp)?;
                        continue;
                    }
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(*size);
                    match source {
                        Source::Bytes(b) => tar.append_data(&mut h, key, &b[..]).at(&tmp)?,
                        Source::Host { path, .. } => {
                            let f = File::open(path).at(path)?;
                            let r = ExactReader { inner: f, left: *size };
                            tar.append_data(&mut h, key, r).at(path)?
                        }
                    }
                }
            }
        }
        let (diff_id, _, gz) = tar.into_inner().at(&tmp)?.finish();
        let blob = gz.finish().at(&tmp)?;
        let (digest, size) = blob.commit(None)?;
        Ok(Layer { digest, diff_id, size })
    }

    /// Host files stored once: hard links (same dev+inode), and separate files with identical
    /// content (Debian ships `/usr/bin/git` and `/usr/lib/git-core/git` as two 3.7 MB copies),
    /// become tar hard links to the first path in sort order. Returns follower → leader.
    fn hardlink_leaders(&self) -> Result<HashMap<&str, &str>> {
        // Only files sharing a size with another are read and hashed.
        type Candidate<'a> = (&'a str, &'a Path, (u64, u64));
        let mut by_size: HashMap<u64, Vec<Candidate>> = HashMap::new();
        for (k, e) in &self.entries {
            if let Kind::File {
                source: Source::Host { path, dev, ino, .. },
                size,
            } = &e.kind
            {
                if *size > 0 {
                    by_size
                        .entry(*size)
                        .or_default()
                        .push((k.as_str(), path.as_path(), (*dev, *ino)));
                }
            }
        }
        let mut first: HashMap<Vec<u8>, &str> = HashMap::new();
        let mut out = HashMap::new();
        let mut group: Vec<_> = by_size.into_values().filter(|g| g.len() > 1).flatten().collect();
        group.sort_by(|a, b| a.0.cmp(b.0));
        let mut inode_key: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
        for (k, path, inode) in group {
            let key = match inode_key.get(&inode) {
                Some(key) => key.clone(),
                None => {
                    let mut h = Sha256::new();
                    io::copy(&mut File::open(path).at(path)?, &mut h).at(path)?;
                    let key = h.finalize().to_vec();
                    inode_key.insert(inode, key.clone());
                    key
                }
            };
            match first.get(&key) {
                Some(leader) => {
                    out.insert(k, *leader);
                }
                None => {
                    first.insert(key, k);
                }
            }
        }
        Ok(out)
    }
}

fn file_entry(path: &Path, meta: &fs::Metadata) -> Entry {
    // setuid/setgid bits are dropped: nothing in an agent's image should raise privileges.
    let mode = meta.mode() & 0o1777;
    let source = Source::Host {
        path: path.to_owned(),
        dev: meta.dev(),
        ino: meta.ino(),
        mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
    };
    Entry {
        kind: Kind::File {
            source,
            size: meta.len(),
        },
        mode,
        uid: 0,
        gid: 0,
    }
}

fn missing_or_io(path: &Path, e: io::Error) -> Error {
    if e.kind() == io::ErrorKind::NotFound {
        Error::Missing(path.to_owned())
    } else {
        Error::Io {
            path: path.to_owned(),
            source: e,
        }
    }
}

/// Yields exactly `left` bytes or fails: a file that shrank while being archived would
/// otherwise produce a corrupt tar whose header size lies.
struct ExactReader<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for ExactReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let max = buf.len().min(self.left as usize);
        let n = self.inner.read(&mut buf[..max])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shrank while archiving",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}
