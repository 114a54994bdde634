//! cohort-oci: build a reproducible OCI image from host files, in-process.
//!
//! Knows OCI, tar, ELF and the distribution API (push to a registry), and nothing of git, agents or container engines. The caller
//! chooses what goes in (programs, binaries, files) and gets back an oci-archive that any
//! engine can load.
//!
//! Layers, in order (least to most frequently changed, so rebuilds reuse the early ones):
//! base image layers (optional) · host programs with their shared-library closure ·
//! skeleton (passwd/group, home, /tmp, workdir) · codex · cohort · caller files.

mod archive;
pub mod auth;
mod blob;
mod elf;
mod error;
mod image;
mod layer;
mod layout;
mod pipe;
pub mod push;
mod reference;
mod strip;

use std::fs;
use std::path::{Path, PathBuf};

pub use archive::{import_base, index_json, write_oci_archive, write_oci_archive_without, BaseImage, REF_NAME};
pub use blob::{sha256_digest, BlobStore};
pub use elf::{read_deps, ElfDeps, LibraryResolver};
pub use error::{Error, Result};
pub use image::{write_config_and_manifest, BuiltImage, ImageSettings, ManifestInput, DEFAULT_PATH, LABEL_REVISION};
pub use layer::{Layer, LayerBuilder, LayerOptions};
pub use layout::{Unused, UnusedKind};
pub use oci_spec::image::MediaType;
pub use push::{push, PushError, PushEvent, PushOptions, PushReport};
pub use reference::Reference;
pub use strip::{strip_debug, stripped_copy};

/// git helpers left out of the default set: servers, mail/push transports, and the http(s)/ftp
/// transports, which an agent working in a mounted checkout never runs (it has the object store;
/// fetching is cohort's job, on the host). The transports alone pull in libcurl and its TLS,
/// LDAP, SSH and Kerberos closure: ~21 MB of the image. `[image] programs` can add them back.
pub const GIT_CORE_EXCLUDED: &[&str] = &[
    "git-daemon",
    "git-http-backend",
    "git-http-fetch",
    "git-http-push",
    "git-imap-send",
    "git-remote-ftp",
    "git-remote-ftps",
    "git-remote-http",
    "git-remote-https",
    "git-shell",
    "git-instaweb",
    "scalar",
];

/// The programs an agent needs by default: a shell, coreutils basics, git with its `git-core`
/// helpers (minus [`GIT_CORE_EXCLUDED`]) and templates, and CA certificates.
/// Only those present on this host are returned.
pub fn default_programs() -> Vec<PathBuf> {
    const BIN: &[&str] = &[
        "sh", "bash", "cat", "ls", "cp", "mv", "rm", "mkdir", "rmdir", "ln", "chmod", "touch", "echo", "env", "head",
        "tail", "wc", "sort", "uniq", "tr", "cut", "date", "dirname", "basename", "pwd", "sleep", "test", "true",
        "false", "mktemp", "readlink", "realpath", "tee", "id", "uname", "stat", "printf", "expr", "seq", "grep",
        "sed", "find", "xargs", "diff", "stty", "tty", "git",
    ];
    let mut out: Vec<PathBuf> = BIN
        .iter()
        .filter_map(|b| {
            ["/usr/bin", "/bin"]
                .iter()
                .map(|d| Path::new(d).join(b))
                .find(|p| p.exists())
        })
        .collect();
    let mut git_core: Vec<PathBuf> = fs::read_dir("/usr/lib/git-core")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| !GIT_CORE_EXCLUDED.contains(&e.file_name().to_string_lossy().as_ref()))
        .map(|e| e.path())
        .collect();
    git_core.sort();
    out.extend(git_core);
    for p in ["/usr/share/git-core/templates", "/etc/ssl/certs"] {
        if Path::new(p).exists() {
            out.push(PathBuf::from(p));
        }
    }
    out
}

/// Everything one build needs.
#[derive(Debug, Clone)]
pub struct BuildSpec {
    /// Layer (a): host paths (files or directories) mirrored at the same place, plus the
    /// shared-library closure of every ELF file among them.
    pub programs: Vec<PathBuf>,
    /// Layer (b): the static codex binary, `(host path, image path)`.
    pub codex: Option<(PathBuf, String)>,
    /// Layer (c): the cohort binary, `(host path, image path)`.
    pub cohort: Option<(PathBuf, String)>,
    /// Layer (d): caller-chosen files, `(host path, image path)`.
    pub files: Vec<(PathBuf, String)>,
    pub settings: ImageSettings,
    /// A base image as an OCI layout directory or oci-archive; `None` builds from scratch.
    pub base: Option<PathBuf>,
    /// SOURCE_DATE_EPOCH: every mtime and the `created` time.
    pub source_date_epoch: u64,
    /// gzip level for new layers (default 1).
    pub compression: u32,
    /// Library search path; `LibraryResolver::system()` by default.
    pub resolver: LibraryResolver,
}

impl Default for BuildSpec {
    fn default() -> Self {
        BuildSpec {
            programs: default_programs(),
            codex: None,
            cohort: None,
            files: Vec::new(),
            settings: ImageSettings::default(),
            base: None,
            source_date_epoch: source_date_epoch_from_env().unwrap_or(0),
            // Fast gzip: images go to a local engine that unpacks them at once, so build time
            // matters more than archive size (codex: 7 s at level 1 against 38 s at 6, +20% size).
            compression: 1,
            resolver: LibraryResolver::system(),
        }
    }
}

/// `SOURCE_DATE_EPOCH` from the environment, if set and numeric.
pub fn source_date_epoch_from_env() -> Option<u64> {
    std::env::var("SOURCE_DATE_EPOCH").ok()?.trim().parse().ok()
}

/// The programs layer: each program mirrored plus its library closure.
pub fn programs_layer(programs: &[PathBuf], resolver: &LibraryResolver) -> Result<LayerBuilder> {
    let mut layer = LayerBuilder::new();
    let mut roots = Vec::new();
    for p in programs {
        layer.host_path(p)?;
        collect_files(p, &mut roots)?;
    }
    for lib in resolver.closure(&roots)? {
        layer.host_path(&lib)?;
    }
    Ok(layer)
}

/// The host's top-level links into `/usr` (merged /usr: `/bin -> usr/bin`, `/sbin`, `/lib`,
/// `/lib64`), reproduced in `layer`. Programs are taken from `/usr/bin`, so without these a
/// `#!/bin/sh` script (a git hook, anything an agent writes) finds no interpreter. Only for
/// images built from scratch: over a base image the link would hide a base's real `/bin`.
pub fn merged_usr_links(layer: &mut LayerBuilder) -> Result<()> {
    for top in ["/bin", "/sbin", "/lib", "/lib64"] {
        let Ok(meta) = fs::symlink_metadata(top) else { continue };
        if !meta.file_type().is_symlink() {
            continue;
        }
        let target = fs::read_link(top).map_err(|source| Error::Io {
            path: top.into(),
            source,
        })?;
        if target.starts_with("usr/") || target.starts_with("/usr/") {
            layer.symlink(top, &target.to_string_lossy())?;
        }
    }
    Ok(())
}

/// Regular files under `p` (or `p` itself), the candidates for ELF closure.
fn collect_files(p: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let meta = fs::symlink_metadata(p).map_err(|_| Error::Missing(p.to_owned()))?;
    if meta.is_dir() {
        let mut children: Vec<_> = fs::read_dir(p)
            .and_then(|rd| rd.collect::<Result<Vec<_>, _>>())
            .map_err(|source| Error::Io {
                path: p.to_owned(),
                source,
            })?;
        children.sort_by_key(|c| c.file_name());
        for c in children {
            collect_files(&c.path(), out)?;
        }
    } else if meta.is_file() || (meta.file_type().is_symlink() && p.is_file()) {
        out.push(p.to_owned());
    }
    Ok(())
}

/// One step of [`build_with_progress`], for a caller that shows progress (a cold build with
/// codex compresses ~300 MB and takes several seconds).
#[derive(Debug, Clone, Copy)]
pub enum Progress<'a> {
    /// About to write layer `index` (0-based, of `count` new layers): `name` is `programs`,
    /// `skeleton`, `codex`, `cohort` or `files`; `bytes` its file content before compression.
    Layer {
        index: usize,
        count: usize,
        name: &'a str,
        entries: usize,
        bytes: u64,
    },
    /// Layer `index` is in the store: `reused` when an identical earlier build's blob was taken.
    LayerDone {
        index: usize,
        layer: &'a Layer,
        reused: bool,
        elapsed: std::time::Duration,
    },
}

/// Build the image into `store` (blobs are content-addressed; unchanged layers are reused).
pub fn build(spec: &BuildSpec, store: &BlobStore) -> Result<BuiltImage> {
    build_with_progress(spec, store, &mut |_| {})
}

/// [`build`], reporting each layer to `progress` before and after it is written.
pub fn build_with_progress(
    spec: &BuildSpec,
    store: &BlobStore,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<BuiltImage> {
    let opts = LayerOptions {
        mtime: spec.source_date_epoch,
        compression: spec.compression,
    };
    let base = match &spec.base {
        Some(p) => import_base(p, store)?,
        None => BaseImage::default(),
    };
    let mut layers = base.layers.clone();
    let mut media_types = base.media_types.clone();
    let mut programs = programs_layer(&spec.programs, &spec.resolver)?;
    // The codex and cohort binaries get their own layers, but their shared libraries belong
    // with the programs': a dynamically linked cohort needs libgcc_s, which no default program
    // pulls in (without it, cohort could not start inside the image).
    let binaries: Vec<PathBuf> = spec
        .codex
        .iter()
        .chain(spec.cohort.iter())
        .map(|(h, _)| h.clone())
        .collect();
    for lib in spec.resolver.closure(&binaries)? {
        programs.host_path(&lib)?;
    }
    if spec.base.is_none() && !programs.is_empty() {
        merged_usr_links(&mut programs)?;
    }
    let mut builders = vec![
        ("programs", programs),
        (
            "skeleton",
            spec.settings
                .skeleton_layer(base.passwd.as_deref(), base.group.as_deref())?,
        ),
    ];
    let binaries = [("codex", &spec.codex), ("cohort", &spec.cohort)];
    for (name, (host, image_path)) in binaries.iter().filter_map(|(n, b)| Some((*n, b.as_ref()?))) {
        let mut l = LayerBuilder::new();
        l.host_file(host, image_path)?;
        builders.push((name, l));
    }
    let mut files = LayerBuilder::new();
    for (host, image_path) in &spec.files {
        files.host_file(host, image_path)?;
    }
    builders.push(("files", files));
    builders.retain(|(_, b)| !b.is_empty());
    let count = builders.len();
    for (index, (name, b)) in builders.iter().enumerate() {
        progress(Progress::Layer {
            index,
            count,
            name,
            entries: b.len(),
            bytes: b.content_size(),
        });
        let started = std::time::Instant::now();
        let (layer, reused) = b.write_or_reuse(store, &opts)?;
        progress(Progress::LayerDone {
            index,
            layer: &layer,
            reused,
            elapsed: started.elapsed(),
        });
        layers.push(layer);
        media_types.push(MediaType::ImageLayerGzip);
    }
    write_config_and_manifest(
        store,
        &ManifestInput {
            settings: &spec.settings,
            layers: &layers,
            media_types: &media_types,
            created_epoch: spec.source_date_epoch,
            base_env: &base.env,
            base_history: &base.history,
        },
    )
}

#[cfg(test)]
mod tests;
