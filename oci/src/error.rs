//! Typed errors of the image builder.

use std::path::PathBuf;

/// Everything that can go wrong while building or reading an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a readable ELF file: {reason}")]
    Elf { path: PathBuf, reason: String },
    #[error("shared library {name} needed by {needed_by} not found (searched {searched})")]
    LibraryNotFound {
        name: String,
        needed_by: PathBuf,
        searched: String,
    },
    #[error("{0}: no such file on this host")]
    Missing(PathBuf),
    #[error("image path {0:?} is not absolute and normal (no `..`)")]
    BadImagePath(String),
    #[error("{0}: too many levels of symbolic links")]
    SymlinkLoop(PathBuf),
    #[error("{path}: unsupported file type for an image layer")]
    Unsupported { path: PathBuf },
    #[error("base image: {0}")]
    Base(String),
    #[error("blob {expected}: content hashes to {actual}")]
    DigestMismatch { expected: String, actual: String },
    #[error("OCI spec: {0}")]
    Spec(#[from] oci_spec::OciSpecError),
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attach the path to an io::Error: a bare "No such file" is useless in a build of hundreds of files.
pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| Error::Io {
            path: path.into(),
            source,
        })
    }
}
