//! OCI image layout as a tar (oci-archive): writing ours, importing a base image's.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::Path;

use flate2::read::GzDecoder;
use oci_spec::image::{DescriptorBuilder, ImageConfiguration, ImageIndex, ImageIndexBuilder, ImageManifest, MediaType};
use serde_json::Value;

use crate::blob::BlobStore;
use crate::error::{Error, IoContext, Result};
use crate::image::{canonical_json, BuiltImage};
use crate::layer::Layer;

/// The annotation podman's `images/load` reads the image name from.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// The `index.json` for one image named `ref_name`.
pub fn index_json(image: &BuiltImage, ref_name: &str) -> Result<Vec<u8>> {
    let desc = DescriptorBuilder::default()
        .media_type(MediaType::ImageManifest)
        .digest(image.manifest_digest.parse::<oci_spec::image::Digest>()?)
        .size(image.manifest_size)
        .annotations(
            [(REF_NAME.to_owned(), ref_name.to_owned())]
                .into_iter()
                .collect::<std::collections::HashMap<_, _>>(),
        )
        .build()?;
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![desc])
        .build()?;
    canonical_json(&index)
}

/// Write `image` (all its blobs must be in `store`) as an oci-archive at `out`.
/// Deterministic: fixed entry order, mtimes and owners, so equal images give equal archives.
pub fn write_oci_archive(store: &BlobStore, image: &BuiltImage, ref_name: &str, out: &Path, mtime: u64) -> Result<()> {
    write_oci_archive_without(store, image, ref_name, out, mtime, &[])
}

/// [`write_oci_archive`] leaving out the blobs of the layers in `omit` (by blob digest): an
/// archive only for an engine that already has those layers. Podman reuses a layer it has
/// stored under the manifest's digest without opening the blob, so a rebuild sends only the
/// layers that changed instead of the whole image (codex alone is ~300 MB). Not a complete
/// OCI layout: anything else loading it fails on the first missing blob.
pub fn write_oci_archive_without(
    store: &BlobStore,
    image: &BuiltImage,
    ref_name: &str,
    out: &Path,
    mtime: u64,
    omit: &[String],
) -> Result<()> {
    let tmp = out.with_extension("partial");
    let file = File::create(&tmp).at(&tmp)?;
    let mut tar = tar::Builder::new(BufWriter::with_capacity(1 << 20, file));
    let header = |size: u64, mode: u32, ty: tar::EntryType| {
        let mut h = tar::Header::new_gnu();
        h.set_size(size);
        h.set_mode(mode);
        h.set_mtime(mtime);
        h.set_uid(0);
        h.set_gid(0);
        h.set_entry_type(ty);
        h
    };
    let put_bytes = |tar: &mut tar::Builder<_>, name: &str, data: &[u8]| -> Result<()> {
        let mut h = header(data.len() as u64, 0o644, tar::EntryType::Regular);
        tar.append_data(&mut h, name, data).at(&tmp)
    };
    put_bytes(&mut tar, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    put_bytes(&mut tar, "index.json", &index_json(image, ref_name)?)?;
    for dir in ["blobs/", "blobs/sha256/"] {
        let mut h = header(0, 0o755, tar::EntryType::Directory);
        tar.append_data(&mut h, dir, io::empty()).at(&tmp)?;
    }
    let mut digests: Vec<&str> = image
        .layers
        .iter()
        .map(|l| l.digest.as_str())
        .filter(|d| !omit.iter().any(|o| o == d))
        .collect();
    digests.push(&image.config_digest);
    digests.push(&image.manifest_digest);
    digests.sort();
    digests.dedup();
    for d in digests {
        let path = store.path(d);
        let f = File::open(&path).at(&path)?;
        let size = f.metadata().at(&path)?.len();
        let mut h = header(size, 0o644, tar::EntryType::Regular);
        let name = format!("blobs/sha256/{}", d.trim_start_matches("sha256:"));
        tar.append_data(&mut h, name, f).at(&path)?;
    }
    let mut w = tar.into_inner().at(&tmp)?;
    w.flush().at(&tmp)?;
    drop(w);
    fs::rename(&tmp, out).at(out)
}

/// A base image's layers and the parts of its config we carry over.
#[derive(Debug, Clone, Default)]
pub struct BaseImage {
    pub layers: Vec<Layer>,
    pub media_types: Vec<MediaType>,
    pub env: Vec<String>,
    pub history: Vec<Value>,
    /// The base's `/etc/passwd` and `/etc/group`, so its accounts survive our skeleton layer.
    pub passwd: Option<String>,
    pub group: Option<String>,
}

/// Import a base image from an OCI layout directory or an oci-archive file (as podman exports
/// with `format=oci-archive`), copying its blobs into `store`.
pub fn import_base(path: &Path, store: &BlobStore) -> Result<BaseImage> {
    let index: Vec<u8> = if path.is_dir() {
        let idx = path.join("index.json");
        let bytes = fs::read(&idx).at(&idx)?;
        for entry in fs::read_dir(path.join("blobs/sha256")).at(path)? {
            let entry = entry.at(path)?;
            let d = format!("sha256:{}", entry.file_name().to_string_lossy());
            if !store.contains(&d) {
                let mut f = File::open(entry.path()).at(entry.path())?;
                store.put_reader(&mut f, Some(&d))?;
            }
        }
        bytes
    } else {
        let f = File::open(path).at(path)?;
        let mut ar = tar::Archive::new(io::BufReader::new(f));
        let mut index = None;
        for entry in ar.entries().at(path)? {
            let mut entry = entry.at(path)?;
            let name = entry
                .path()
                .at(path)?
                .to_string_lossy()
                .trim_start_matches("./")
                .to_owned();
            if name == "index.json" {
                let mut b = Vec::new();
                entry.read_to_end(&mut b).at(path)?;
                index = Some(b);
            } else if let Some(hex) = name.strip_prefix("blobs/sha256/").filter(|h| !h.is_empty()) {
                let d = format!("sha256:{hex}");
                if !store.contains(&d) {
                    store.put_reader(&mut entry, Some(&d))?;
                }
            }
        }
        index.ok_or_else(|| Error::Base(format!("{}: no index.json", path.display())))?
    };
    let index: ImageIndex = serde_json::from_slice(&index)?;
    let manifest = resolve_manifest(store, &index, 0)?;
    let config: ImageConfiguration = serde_json::from_slice(&store.read(manifest.config().digest().as_ref())?)?;
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != manifest.layers().len() {
        return Err(Error::Base(
            "config diff_ids and manifest layers differ in number".into(),
        ));
    }
    let mut base = BaseImage::default();
    for (desc, diff_id) in manifest.layers().iter().zip(diff_ids) {
        base.layers.push(Layer {
            digest: desc.digest().to_string(),
            diff_id: diff_id.clone(),
            size: desc.size(),
        });
        base.media_types.push(desc.media_type().clone());
    }
    base.env = config
        .config()
        .as_ref()
        .and_then(|c| c.env().clone())
        .unwrap_or_default();
    let raw: Value = serde_json::from_slice(&store.read(manifest.config().digest().as_ref())?)?;
    base.history = raw["history"].as_array().cloned().unwrap_or_default();
    read_accounts(store, &mut base)?;
    Ok(base)
}

fn resolve_manifest(store: &BlobStore, index: &ImageIndex, depth: u32) -> Result<ImageManifest> {
    if depth > 3 {
        return Err(Error::Base("nested indexes too deep".into()));
    }
    // Prefer linux/amd64 when the index lists several platforms; otherwise the first.
    let pick = index
        .manifests()
        .iter()
        .find(|m| {
            m.platform().as_ref().is_some_and(|p| {
                *p.architecture() == oci_spec::image::Arch::Amd64 && *p.os() == oci_spec::image::Os::Linux
            })
        })
        .or_else(|| index.manifests().first())
        .ok_or_else(|| Error::Base("index lists no manifest".into()))?;
    let bytes = store.read(pick.digest().as_ref())?;
    if *pick.media_type() == MediaType::ImageIndex {
        let nested: ImageIndex = serde_json::from_slice(&bytes)?;
        return resolve_manifest(store, &nested, depth + 1);
    }
    Ok(serde_json::from_slice(&bytes)?)
}

/// Find the top-most `/etc/passwd` and `/etc/group` in the base layers.
fn read_accounts(store: &BlobStore, base: &mut BaseImage) -> Result<()> {
    for layer in &base.layers {
        let path = store.path(&layer.digest);
        let f = io::BufReader::new(File::open(&path).at(&path)?);
        let mut magic = [0u8; 2];
        let gz = {
            let mut probe = File::open(&path).at(&path)?;
            probe.read_exact(&mut magic).is_ok() && magic == [0x1f, 0x8b]
        };
        let reader: Box<dyn Read> = if gz { Box::new(GzDecoder::new(f)) } else { Box::new(f) };
        let mut ar = tar::Archive::new(reader);
        for entry in ar.entries().at(&path)? {
            let mut entry = entry.at(&path)?;
            let name = entry
                .path()
                .at(&path)?
                .to_string_lossy()
                .trim_start_matches("./")
                .to_owned();
            let slot = match name.as_str() {
                "etc/passwd" => &mut base.passwd,
                "etc/group" => &mut base.group,
                _ => continue,
            };
            let mut s = String::new();
            entry.read_to_string(&mut s).at(&path)?;
            *slot = Some(s);
        }
    }
    Ok(())
}
