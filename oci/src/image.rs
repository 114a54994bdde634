//! Image configuration, the user/filesystem-skeleton layer, and the manifest.

use std::collections::BTreeMap;

use oci_spec::image::{
    ConfigBuilder, DescriptorBuilder, HistoryBuilder, ImageConfigurationBuilder, ImageManifestBuilder, MediaType,
    RootFsBuilder,
};
use serde_json::Value;

use crate::blob::BlobStore;
use crate::error::Result;
use crate::layer::{Layer, LayerBuilder};

/// Label carrying the caller's source commit (the standard OCI annotation key).
pub const LABEL_REVISION: &str = "org.opencontainers.image.revision";

/// The runtime settings baked into the image config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSettings {
    /// Name of the non-root user (gets `/etc/passwd` and `/etc/group` entries and a home).
    pub user: String,
    pub uid: u32,
    pub gid: u32,
    /// `WORKDIR`, also declared as a volume.
    pub workdir: String,
    /// `KEY=VALUE` pairs; `PATH`, `HOME`, `USER` are filled in when missing.
    pub env: Vec<String>,
    pub labels: BTreeMap<String, String>,
    /// Stored as the `org.opencontainers.image.revision` label.
    pub source_commit: Option<String>,
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
}

impl Default for ImageSettings {
    fn default() -> Self {
        ImageSettings {
            user: "cohort".into(),
            uid: 1000,
            gid: 1000,
            workdir: "/workspace".into(),
            env: Vec::new(),
            labels: BTreeMap::new(),
            source_commit: None,
            entrypoint: None,
            cmd: Some(vec!["/bin/sh".into()]),
        }
    }
}

pub const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin";

impl ImageSettings {
    pub fn home(&self) -> String {
        format!("/home/{}", self.user)
    }

    /// The environment with defaults for PATH, HOME, USER; the caller's entries win,
    /// then the base image's (if any) for keys neither sets.
    pub fn full_env(&self, base_env: &[String]) -> Vec<String> {
        let mut map: BTreeMap<String, String> = BTreeMap::new();
        let key = |s: &str| s.split_once('=').map(|(k, _)| k.to_owned()).unwrap_or(s.to_owned());
        map.insert("PATH".into(), format!("PATH={DEFAULT_PATH}"));
        for e in base_env {
            map.insert(key(e), e.clone());
        }
        map.insert("HOME".into(), format!("HOME={}", self.home()));
        map.insert("USER".into(), format!("USER={}", self.user));
        for e in &self.env {
            map.insert(key(e), e.clone());
        }
        map.into_values().collect()
    }

    /// The skeleton layer: passwd/group with root and the user, its home, `/tmp`, the workdir.
    /// `base_passwd`/`base_group` are the base image's files when building on top of one, so
    /// its accounts are kept.
    pub fn skeleton_layer(&self, base_passwd: Option<&str>, base_group: Option<&str>) -> Result<LayerBuilder> {
        let (u, uid, gid, home) = (&self.user, self.uid, self.gid, self.home());
        let mut passwd = base_passwd
            .map(str::to_owned)
            .unwrap_or_else(|| "root:x:0:0:root:/root:/bin/sh\n".into());
        let mut group = base_group.map(str::to_owned).unwrap_or_else(|| "root:x:0:\n".into());
        if !passwd.lines().any(|l| l.starts_with(&format!("{u}:"))) {
            push_line(&mut passwd, &format!("{u}:x:{uid}:{gid}:{u}:{home}:/bin/sh"));
        }
        if !group.lines().any(|l| l.starts_with(&format!("{u}:"))) {
            push_line(&mut group, &format!("{u}:x:{gid}:"));
        }
        let mut l = LayerBuilder::new();
        l.bytes("/etc/passwd", passwd, 0o644)?;
        l.bytes("/etc/group", group, 0o644)?;
        l.dir("/root", 0o700, 0, 0)?;
        l.dir("/tmp", 0o1777, 0, 0)?;
        l.dir(&home, 0o755, uid, gid)?;
        l.dir(&self.workdir, 0o755, uid, gid)?;
        Ok(l)
    }
}

fn push_line(text: &mut String, line: &str) {
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(line);
    text.push('\n');
}

/// What a finished image is: its manifest's descriptor data, all blobs in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltImage {
    /// Digest of the manifest: the image digest a registry would show.
    pub manifest_digest: String,
    pub manifest_size: u64,
    /// Digest of the config: podman's image ID (without `sha256:`).
    pub config_digest: String,
    /// Every layer in order, base layers first.
    pub layers: Vec<Layer>,
}

impl BuiltImage {
    /// Podman's image ID: the hex of the config digest.
    pub fn image_id(&self) -> &str {
        self.config_digest.trim_start_matches("sha256:")
    }
}

/// Inputs to [`write_config_and_manifest`].
pub struct ManifestInput<'a> {
    pub settings: &'a ImageSettings,
    pub layers: &'a [Layer],
    /// Layer media types, parallel to `layers` (base layers may be uncompressed).
    pub media_types: &'a [MediaType],
    pub created_epoch: u64,
    pub base_env: &'a [String],
    pub base_history: &'a [Value],
}

/// Serialise JSON with object keys sorted: oci-spec keeps labels and annotations in HashMaps,
/// whose iteration order would change the digest from run to run.
pub(crate) fn canonical_json(v: &impl serde::Serialize) -> Result<Vec<u8>> {
    fn sort(v: Value) -> Value {
        match v {
            Value::Object(m) => {
                let mut pairs: Vec<_> = m.into_iter().collect();
                pairs.sort_by(|a, b| a.0.cmp(&b.0));
                Value::Object(pairs.into_iter().map(|(k, v)| (k, sort(v))).collect())
            }
            Value::Array(a) => Value::Array(a.into_iter().map(sort).collect()),
            other => other,
        }
    }
    Ok(serde_json::to_vec(&sort(serde_json::to_value(v)?))?)
}

pub(crate) fn rfc3339(epoch: u64) -> String {
    // Civil-from-days (Howard Hinnant), to avoid a date crate for one timestamp.
    let days = (epoch / 86_400) as i64;
    let secs = epoch % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Write the config and manifest blobs; returns the image.
pub fn write_config_and_manifest(store: &BlobStore, input: &ManifestInput<'_>) -> Result<BuiltImage> {
    let s = input.settings;
    let created = rfc3339(input.created_epoch);
    let mut labels: BTreeMap<String, String> = s.labels.clone();
    if let Some(c) = &s.source_commit {
        labels.insert(LABEL_REVISION.into(), c.clone());
    }
    let mut cfg = ConfigBuilder::default()
        .user(format!("{}:{}", s.uid, s.gid))
        .working_dir(s.workdir.clone())
        .env(s.full_env(input.base_env))
        .volumes(vec![s.workdir.clone()])
        .labels(labels.into_iter().collect::<std::collections::HashMap<_, _>>());
    if let Some(e) = &s.entrypoint {
        cfg = cfg.entrypoint(e.clone());
    }
    if let Some(c) = &s.cmd {
        cfg = cfg.cmd(c.clone());
    }
    let rootfs = RootFsBuilder::default()
        .typ("layers")
        .diff_ids(input.layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>())
        .build()?;
    let mut history: Vec<Value> = input.base_history.to_vec();
    for _ in input.base_history.len().min(input.layers.len())..input.layers.len() {
        let h = HistoryBuilder::default()
            .created(created.clone())
            .created_by("cohort-oci")
            .build()?;
        history.push(serde_json::to_value(h)?);
    }
    let config = ImageConfigurationBuilder::default()
        .created(created)
        .architecture(oci_spec::image::Arch::Amd64)
        .os(oci_spec::image::Os::Linux)
        .config(cfg.build()?)
        .rootfs(rootfs)
        .build()?;
    let mut config_value = serde_json::to_value(&config)?;
    config_value["history"] = Value::Array(history);
    let (config_digest, config_size) = store.put(&canonical_json(&config_value)?)?;

    let layer_descs = input
        .layers
        .iter()
        .zip(input.media_types)
        .map(|(l, mt)| {
            Ok(DescriptorBuilder::default()
                .media_type(mt.clone())
                .digest(l.digest.parse::<oci_spec::image::Digest>()?)
                .size(l.size)
                .build()?)
        })
        .collect::<Result<Vec<_>>>()?;
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(
            DescriptorBuilder::default()
                .media_type(MediaType::ImageConfig)
                .digest(config_digest.parse::<oci_spec::image::Digest>()?)
                .size(config_size)
                .build()?,
        )
        .layers(layer_descs)
        .build()?;
    let (manifest_digest, manifest_size) = store.put(&canonical_json(&manifest)?)?;
    Ok(BuiltImage {
        manifest_digest,
        manifest_size,
        config_digest,
        layers: input.layers.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn env_defaults_and_overrides() {
        let s = ImageSettings {
            env: vec!["PATH=/x".into(), "A=1".into()],
            ..Default::default()
        };
        let env = s.full_env(&["B=2".into(), "HOME=/base".into()]);
        assert!(env.contains(&"PATH=/x".to_string()));
        assert!(env.contains(&"B=2".to_string()));
        assert!(env.contains(&"HOME=/home/cohort".to_string()));
    }
}
