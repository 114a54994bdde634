//! A content-addressed blob directory laid out like an OCI image layout
//! (`blobs/sha256/<hex>`), so it can be archived as-is and reused across builds.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest as _, Sha256};

use crate::error::{Error, IoContext, Result};

/// A `Write` adaptor that hashes and counts what passes through it.
pub(crate) struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> HashingWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// `("sha256:<hex>", byte count, inner writer)`.
    pub(crate) fn finish(self) -> (String, u64, W) {
        let digest = format!("sha256:{}", hex::encode(self.hasher.finalize()));
        (digest, self.count, self.inner)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// The blob directory. Writes go to a temporary file first and are renamed into place
/// under their digest, so a crashed build never leaves a blob with the wrong content.
#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl BlobStore {
    /// Open (creating if needed) a store rooted at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        let blobs = root.join("blobs").join("sha256");
        fs::create_dir_all(&blobs).at(&blobs)?;
        Ok(BlobStore { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob with `digest` (`sha256:<hex>`) lives.
    pub fn path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.root.join("blobs").join("sha256").join(hex)
    }

    pub fn contains(&self, digest: &str) -> bool {
        self.path(digest).is_file()
    }

    pub fn read(&self, digest: &str) -> Result<Vec<u8>> {
        let p = self.path(digest);
        fs::read(&p).at(p)
    }

    /// Store bytes; returns `(digest, size)`.
    pub fn put(&self, data: &[u8]) -> Result<(String, u64)> {
        let mut w = self.writer()?;
        w.write_all(data).at(&w.tmp)?;
        w.commit(None)
    }

    /// Stream a blob from `reader`. When `expected` is given the content must hash to it.
    pub fn put_reader(&self, reader: &mut dyn Read, expected: Option<&str>) -> Result<(String, u64)> {
        let mut w = self.writer()?;
        io::copy(reader, &mut w).at(&w.tmp)?;
        w.commit(expected)
    }

    pub(crate) fn writer(&self) -> Result<BlobWriter> {
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = self.root.join(format!(".tmp-{}-{}", std::process::id(), n));
        let file = File::create(&tmp).at(&tmp)?;
        Ok(BlobWriter {
            store: self.clone(),
            inner: HashingWriter::new(io::BufWriter::with_capacity(1 << 20, file)),
            tmp,
        })
    }
}

/// An in-progress blob; `commit` moves it into place under its digest.
pub(crate) struct BlobWriter {
    store: BlobStore,
    inner: HashingWriter<io::BufWriter<File>>,
    pub(crate) tmp: PathBuf,
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl BlobWriter {
    pub(crate) fn commit(self, expected: Option<&str>) -> Result<(String, u64)> {
        let (digest, size, buf) = self.inner.finish();
        let file = buf.into_inner().map_err(|e| e.into_error()).at(&self.tmp)?;
        drop(file);
        if let Some(expected) = expected {
            if expected != digest {
                let _ = fs::remove_file(&self.tmp);
                return Err(Error::DigestMismatch {
                    expected: expected.to_owned(),
                    actual: digest,
                });
            }
        }
        let dest = self.store.path(&digest);
        fs::rename(&self.tmp, &dest).at(&dest)?;
        Ok((digest, size))
    }
}
