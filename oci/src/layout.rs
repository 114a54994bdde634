//! The store's `index.json`, as in an OCI image layout: which manifest each ref name (tag)
//! was last built as. From it, the blobs in use (each tagged manifest, its config and its
//! layers) and the rest, which can go.
//!
//! Locking is the caller's: `tag` rewrites the index atomically (a temporary file renamed
//! over it) but two writers would lose one's record, and a removal must not run while a
//! build is between writing its blobs and tagging them.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use oci_spec::image::{DescriptorBuilder, ImageIndex, ImageIndexBuilder, ImageManifest, MediaType};

use crate::archive::REF_NAME;
use crate::blob::BlobStore;
use crate::error::{IoContext, Result};
use crate::image::{canonical_json, BuiltImage};
use crate::layer::Layer;

/// Something in the store no tag uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unused {
    pub path: PathBuf,
    /// Bytes it takes on disk.
    pub bytes: u64,
    pub kind: UnusedKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnusedKind {
    /// A blob (`sha256:<hex>`) no tagged image names.
    Blob(String),
    /// A temporary file a writer left (it crashed, or was killed).
    Temp,
    /// A layer-cache entry naming a blob no tagged image names.
    LayerCache,
}

fn on_disk(meta: &fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    meta.blocks() * 512
}

impl BlobStore {
    fn index_path(&self) -> PathBuf {
        self.root().join("index.json")
    }

    /// Whether any tag was ever recorded (a store from before tags were recorded has none).
    pub fn has_index(&self) -> bool {
        self.index_path().is_file()
    }

    /// Each tag and the manifest digest it was last built as.
    pub fn tags(&self) -> Result<BTreeMap<String, (String, u64)>> {
        let path = self.index_path();
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(e) => return Err(e).at(&path),
        };
        let index: ImageIndex = serde_json::from_slice(&text)?;
        let mut out = BTreeMap::new();
        for m in index.manifests() {
            if let Some(name) = m.annotations().as_ref().and_then(|a| a.get(REF_NAME)) {
                out.insert(name.clone(), (m.digest().to_string(), m.size()));
            }
        }
        Ok(out)
    }

    /// Records `image` as what `ref_name` names now (replacing its earlier record).
    pub fn tag(&self, ref_name: &str, image: &BuiltImage) -> Result<()> {
        let mut tags = self.tags()?;
        tags.insert(
            ref_name.to_owned(),
            (image.manifest_digest.clone(), image.manifest_size),
        );
        let mut manifests = Vec::with_capacity(tags.len());
        for (name, (digest, size)) in &tags {
            manifests.push(
                DescriptorBuilder::default()
                    .media_type(MediaType::ImageManifest)
                    .digest(digest.parse::<oci_spec::image::Digest>()?)
                    .size(*size)
                    .annotations(
                        [(REF_NAME.to_owned(), name.clone())]
                            .into_iter()
                            .collect::<std::collections::HashMap<_, _>>(),
                    )
                    .build()?,
            );
        }
        let index = ImageIndexBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageIndex)
            .manifests(manifests)
            .build()?;
        let bytes = canonical_json(&index)?;
        let tmp = self.root().join(format!(".tmp-index-{}", std::process::id()));
        let path = self.index_path();
        let mut f = fs::File::create(&tmp).at(&tmp)?;
        f.write_all(&bytes).at(&tmp)?;
        f.sync_all().at(&tmp)?;
        fs::rename(&tmp, &path).at(&path)
    }

    /// Every blob a tagged image names: its manifest, config and layers. A manifest that is
    /// missing or unreadable keeps only its own digest.
    pub fn blobs_in_use(&self) -> Result<BTreeSet<String>> {
        let mut out = BTreeSet::new();
        for (digest, _) in self.tags()?.into_values() {
            if let Ok(bytes) = self.read(&digest) {
                if let Ok(m) = serde_json::from_slice::<ImageManifest>(&bytes) {
                    out.insert(m.config().digest().to_string());
                    out.extend(m.layers().iter().map(|l| l.digest().to_string()));
                }
            }
            out.insert(digest);
        }
        Ok(out)
    }

    /// What no tag uses: blobs, layer-cache entries naming them, and temporary files older
    /// than `temp_age` (a younger one may be a write in progress). Changes nothing.
    pub fn unused(&self, temp_age: Duration, now: SystemTime) -> Result<Vec<Unused>> {
        let in_use = self.blobs_in_use()?;
        let mut out = Vec::new();
        let dir = self.root().join("blobs").join("sha256");
        for e in fs::read_dir(&dir).at(&dir)? {
            let e = e.at(&dir)?;
            let name = e.file_name().to_string_lossy().into_owned();
            let digest = format!("sha256:{name}");
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_file() && !in_use.contains(&digest) {
                out.push(Unused {
                    path: e.path(),
                    bytes: on_disk(&meta),
                    kind: UnusedKind::Blob(digest),
                });
            }
        }
        let cache = self.root().join("layer-cache");
        if let Ok(rd) = fs::read_dir(&cache) {
            for e in rd.flatten() {
                let Ok(meta) = e.metadata() else { continue };
                let layer = fs::read(e.path())
                    .ok()
                    .and_then(|t| serde_json::from_slice::<Layer>(&t).ok());
                if meta.is_file() && layer.is_none_or(|l| !in_use.contains(&l.digest)) {
                    out.push(Unused {
                        path: e.path(),
                        bytes: on_disk(&meta),
                        kind: UnusedKind::LayerCache,
                    });
                }
            }
        }
        for e in fs::read_dir(self.root()).at(self.root())?.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            let old = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .is_some_and(|age| age >= temp_age);
            if meta.is_file() && old && e.file_name().to_string_lossy().starts_with(".tmp-") {
                out.push(Unused {
                    path: e.path(),
                    bytes: on_disk(&meta),
                    kind: UnusedKind::Temp,
                });
            }
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    /// Removes what [`unused`](Self::unused) listed; one already gone counts as removed.
    pub fn remove_unused(&self, unused: &[Unused]) -> Result<u64> {
        let mut freed = 0;
        for u in unused {
            match fs::remove_file(&u.path) {
                Ok(()) => freed += u.bytes,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).at(&u.path),
            }
        }
        Ok(freed)
    }
}
