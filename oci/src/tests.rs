//! Crate tests against real host files (no fixtures needed on Debian).

use super::*;
use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest, OciLayout};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;

fn small_spec(dir: &Path) -> BuildSpec {
    let file = dir.join("hello.txt");
    fs::write(&file, "hello\n").unwrap();
    BuildSpec {
        programs: vec![PathBuf::from("/bin/sh"), PathBuf::from("/usr/bin/env")],
        files: vec![(file, "/opt/app/hello.txt".into())],
        settings: ImageSettings {
            source_commit: Some("0123456789abcdef".into()),
            ..Default::default()
        },
        source_date_epoch: 1_700_000_000,
        ..Default::default()
    }
}

#[test]
fn layer_is_deterministic_across_stores() {
    let tmp = tempfile::tempdir().unwrap();
    let layer = programs_layer(&[PathBuf::from("/bin/bash")], &LibraryResolver::system()).unwrap();
    let opts = LayerOptions {
        mtime: 1_700_000_000,
        compression: 6,
    };
    let a = layer
        .write(&BlobStore::open(tmp.path().join("a")).unwrap(), &opts)
        .unwrap();
    let b = layer
        .write(&BlobStore::open(tmp.path().join("b")).unwrap(), &opts)
        .unwrap();
    assert_eq!(a, b);
    let other = LayerOptions { mtime: 1, ..opts };
    let c = layer
        .write(&BlobStore::open(tmp.path().join("c")).unwrap(), &other)
        .unwrap();
    assert_ne!(a.digest, c.digest, "mtime must be part of the content");
}

#[test]
fn programs_layer_mirrors_symlinks_and_libraries() {
    let layer = programs_layer(&[PathBuf::from("/bin/bash")], &LibraryResolver::system()).unwrap();
    let paths: Vec<String> = layer.paths().collect();
    assert!(paths.iter().any(|p| p.ends_with("/bash")), "{paths:?}");
    assert!(paths.iter().any(|p| p.contains("/libc.so")), "{paths:?}");
    assert!(paths.iter().any(|p| p.contains("ld-linux")), "{paths:?}");
    // On merged-/usr hosts /bin is a symlink; it must be kept as one, not turned into a directory.
    if fs::symlink_metadata("/bin").unwrap().file_type().is_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let store = BlobStore::open(tmp.path()).unwrap();
        let l = layer
            .write(
                &store,
                &LayerOptions {
                    mtime: 0,
                    compression: 1,
                },
            )
            .unwrap();
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(
            fs::File::open(store.path(&l.digest)).unwrap(),
        ));
        let mut kinds = BTreeMap::new();
        for e in ar.entries().unwrap() {
            let e = e.unwrap();
            let h = e.header();
            assert_eq!(h.mtime().unwrap(), 0);
            assert_eq!(h.uid().unwrap(), 0);
            kinds.insert(e.path().unwrap().to_string_lossy().into_owned(), h.entry_type());
        }
        assert_eq!(kinds.get("bin"), Some(&tar::EntryType::Symlink), "{kinds:?}");
        assert_eq!(kinds.get("usr/bin/bash"), Some(&tar::EntryType::Regular));
    }
}

#[test]
fn two_builds_same_digest_and_valid_archive() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = small_spec(tmp.path());
    let a = build(&spec, &BlobStore::open(tmp.path().join("s1")).unwrap()).unwrap();
    let store = BlobStore::open(tmp.path().join("s2")).unwrap();
    let b = build(&spec, &store).unwrap();
    assert_eq!(a, b);

    let out = tmp.path().join("image.tar");
    write_oci_archive(&store, &b, "localhost/test:latest", &out, spec.source_date_epoch).unwrap();
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut ar = tar::Archive::new(fs::File::open(&out).unwrap());
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        files.insert(name, data);
    }
    let _: OciLayout = serde_json::from_slice(&files["oci-layout"]).unwrap();
    let index: ImageIndex = serde_json::from_slice(&files["index.json"]).unwrap();
    let m = &index.manifests()[0];
    assert_eq!(m.digest().to_string(), b.manifest_digest);
    assert_eq!(
        m.annotations().as_ref().unwrap().get(REF_NAME).map(String::as_str),
        Some("localhost/test:latest")
    );
    let blob = |d: &str| &files[&format!("blobs/sha256/{}", d.trim_start_matches("sha256:"))];
    // Every blob's name is its content's digest.
    for (name, data) in files
        .iter()
        .filter(|(n, _)| n.starts_with("blobs/sha256/") && n.len() > 13)
    {
        assert_eq!(sha256_digest(data), format!("sha256:{}", &name[13..]));
    }
    let manifest: ImageManifest = serde_json::from_slice(blob(&b.manifest_digest)).unwrap();
    let config: ImageConfiguration = serde_json::from_slice(blob(manifest.config().digest().as_ref())).unwrap();
    assert_eq!(manifest.layers().len(), config.rootfs().diff_ids().len());
    let c = config.config().as_ref().unwrap();
    assert_eq!(c.working_dir().as_deref(), Some("/workspace"));
    assert_eq!(c.user().as_deref(), Some("1000:1000"));
    assert!(c.volumes().as_ref().unwrap().contains(&"/workspace".to_string()));
    assert_eq!(c.labels().as_ref().unwrap()[LABEL_REVISION], "0123456789abcdef");
    // diff_ids really are the digests of the uncompressed layers.
    for (l, diff_id) in manifest.layers().iter().zip(config.rootfs().diff_ids()) {
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(&blob(l.digest().as_ref())[..])
            .read_to_end(&mut raw)
            .unwrap();
        assert_eq!(&sha256_digest(&raw), diff_id);
    }

    // Writing the archive twice gives the same bytes.
    let out2 = tmp.path().join("image2.tar");
    write_oci_archive(&store, &b, "localhost/test:latest", &out2, spec.source_date_epoch).unwrap();
    assert_eq!(fs::read(&out).unwrap(), fs::read(&out2).unwrap());
}

/// A dynamically linked binary given as `cohort` brings its libraries into the programs layer
/// (the test binary, like cohort, needs libgcc_s; `/bin/sh` does not).
#[test]
fn binaries_bring_their_libraries() {
    let tmp = tempfile::tempdir().unwrap();
    let store = BlobStore::open(tmp.path().join("s")).unwrap();
    let me = std::env::current_exe().unwrap();
    let needs: Vec<String> = read_deps(&me).unwrap().expect("an ELF file").needed;
    let spec = BuildSpec {
        programs: vec![PathBuf::from("/bin/sh")],
        cohort: Some((me, "/usr/local/bin/cohort".into())),
        ..small_spec(tmp.path())
    };
    let image = build(&spec, &store).unwrap();
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(&fs::read(store.path(&image.layers[0].digest)).unwrap()[..])
        .read_to_end(&mut raw)
        .unwrap();
    let names: Vec<String> = tar::Archive::new(&raw[..])
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect();
    for lib in needs {
        assert!(
            names.iter().any(|n| n.ends_with(lib.as_str())),
            "{lib} not in the programs layer"
        );
    }
}

#[test]
fn changed_input_changes_digest_and_reuses_other_layers() {
    let tmp = tempfile::tempdir().unwrap();
    let store = BlobStore::open(tmp.path().join("s")).unwrap();
    let mut spec = small_spec(tmp.path());
    let a = build(&spec, &store).unwrap();
    spec.settings.source_commit = Some("fedcba".into());
    let b = build(&spec, &store).unwrap();
    assert_ne!(a.manifest_digest, b.manifest_digest);
    assert_eq!(a.layers, b.layers, "only the config changed");
    fs::write(&spec.files[0].0, "changed\n").unwrap();
    let c = build(&spec, &store).unwrap();
    assert_eq!(a.layers[..a.layers.len() - 1], c.layers[..c.layers.len() - 1]);
    assert_ne!(a.layers.last(), c.layers.last());
}

#[test]
fn builds_on_top_of_a_base_archive() {
    let tmp = tempfile::tempdir().unwrap();
    let store = BlobStore::open(tmp.path().join("s")).unwrap();
    let base_spec = small_spec(tmp.path());
    let base = build(&base_spec, &store).unwrap();
    let archive = tmp.path().join("base.tar");
    write_oci_archive(&store, &base, "localhost/base:1", &archive, 0).unwrap();

    let store2 = BlobStore::open(tmp.path().join("s2")).unwrap();
    let spec = BuildSpec {
        programs: vec![PathBuf::from("/usr/bin/env")],
        base: Some(archive),
        settings: ImageSettings {
            user: "agent".into(),
            uid: 2000,
            gid: 2000,
            ..Default::default()
        },
        ..small_spec(tmp.path())
    };
    let img = build(&spec, &store2).unwrap();
    assert_eq!(img.layers[..base.layers.len()], base.layers[..]);
    let imported = import_base(&tmp.path().join("base.tar"), &store2).unwrap();
    let passwd = imported.passwd.unwrap();
    assert!(passwd.contains("cohort:x:1000"), "{passwd}");
}

#[test]
fn bad_image_paths_are_rejected() {
    let mut l = LayerBuilder::new();
    assert!(matches!(l.bytes("relative", "x", 0o644), Err(Error::BadImagePath(_))));
    assert!(matches!(l.bytes("/a/../b", "x", 0o644), Err(Error::BadImagePath(_))));
}

#[test]
fn identical_files_are_stored_once_as_hard_links() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    fs::write(&a, vec![7u8; 10_000]).unwrap();
    fs::write(&b, vec![7u8; 10_000]).unwrap();
    let mut l = LayerBuilder::new();
    l.host_file(&b, "/z/second").unwrap();
    l.host_file(&a, "/a/first").unwrap();
    let store = BlobStore::open(tmp.path().join("s")).unwrap();
    let layer = l
        .write(
            &store,
            &LayerOptions {
                mtime: 0,
                compression: 1,
            },
        )
        .unwrap();
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(
        fs::File::open(store.path(&layer.digest)).unwrap(),
    ));
    let entries: Vec<(String, tar::EntryType, u64)> = ar
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.path().unwrap().to_string_lossy().into_owned(),
                e.header().entry_type(),
                e.size(),
            )
        })
        .filter(|(_, t, _)| !t.is_dir())
        .collect();
    assert_eq!(
        entries,
        vec![
            ("a/first".into(), tar::EntryType::Regular, 10_000),
            ("z/second".into(), tar::EntryType::Link, 0)
        ]
    );
}

#[test]
fn default_programs_resolve_on_this_host() {
    let programs = default_programs();
    assert!(programs.iter().any(|p| p.ends_with("git")), "{programs:?}");
    let layer = programs_layer(&programs, &LibraryResolver::system()).unwrap();
    let paths: Vec<String> = layer.paths().collect();
    assert!(paths.iter().any(|p| p.starts_with("/usr/share/git-core/templates")));
    assert!(paths.iter().any(|p| p.ends_with("/git-core/git-sh-setup")));
    for left_out in ["/git-daemon", "/git-remote-https", "/git-http-fetch"] {
        assert!(
            !paths.iter().any(|p| p.ends_with(left_out)),
            "{left_out} is in the default set"
        );
    }
    // Without the network transports, nothing needs libcurl...
    assert!(!paths.iter().any(|p| p.contains("libcurl")), "{paths:?}");
    // ...and a transport added back through `[image] programs` brings it: the closure follows
    // every helper, not just git.
    let mut with_https = programs.clone();
    with_https.push(PathBuf::from("/usr/lib/git-core/git-remote-https"));
    let layer = programs_layer(&with_https, &LibraryResolver::system()).unwrap();
    assert!(layer.paths().any(|p| p.contains("libcurl")));
}

#[test]
fn from_scratch_keeps_merged_usr_links() {
    let mut layer = programs_layer(&[PathBuf::from("/usr/bin/env")], &LibraryResolver::system()).unwrap();
    merged_usr_links(&mut layer).unwrap();
    let paths: Vec<String> = layer.paths().collect();
    for top in ["/bin", "/sbin", "/lib", "/lib64"] {
        let host_link = fs::symlink_metadata(top).is_ok_and(|m| m.file_type().is_symlink());
        assert_eq!(paths.contains(&top.to_string()), host_link, "{top}: {paths:?}");
    }
}

/// A rebuild under the same tag leaves the old manifest, config and changed layer unused; the
/// other tag's image, the reused layers and a young temporary file stay.
#[test]
fn unused_blobs_are_those_no_tag_names() {
    let tmp = tempfile::tempdir().unwrap();
    let store = BlobStore::open(tmp.path().join("s")).unwrap();
    let spec = small_spec(tmp.path());
    let a = build(&spec, &store).unwrap();
    store.tag("localhost/a:1", &a).unwrap();
    store.tag("localhost/keep:1", &a).unwrap();
    fs::write(&spec.files[0].0, "changed\n").unwrap();
    let b = build(&spec, &store).unwrap();
    store.tag("localhost/a:1", &b).unwrap();
    let now = std::time::SystemTime::now();
    let hour = std::time::Duration::from_secs(3600);
    assert!(store.unused(hour, now).unwrap().is_empty(), "every blob is some tag's");

    // Retag `keep` to b: a's manifest, config and last layer (and its cache entry) go.
    store.tag("localhost/keep:1", &b).unwrap();
    fs::write(store.root().join(".tmp-123-0"), "half a blob").unwrap();
    let unused = store.unused(hour, now).unwrap();
    let blobs: BTreeSet<String> = unused
        .iter()
        .filter_map(|u| match &u.kind {
            UnusedKind::Blob(d) => Some(d.clone()),
            _ => None,
        })
        .collect();
    let expected: BTreeSet<String> = [
        a.manifest_digest.clone(),
        a.config_digest.clone(),
        a.layers.last().unwrap().digest.clone(),
    ]
    .into_iter()
    .collect();
    assert_eq!(blobs, expected);
    assert_eq!(unused.iter().filter(|u| u.kind == UnusedKind::LayerCache).count(), 1);
    assert!(
        !unused.iter().any(|u| u.kind == UnusedKind::Temp),
        "a young temp file stays"
    );
    let later = now + 2 * hour;
    let unused = store.unused(hour, later).unwrap();
    assert_eq!(unused.iter().filter(|u| u.kind == UnusedKind::Temp).count(), 1);
    assert!(store.remove_unused(&unused).unwrap() > 0);
    for d in &expected {
        assert!(!store.contains(d), "{d} removed");
    }
    for l in &b.layers {
        assert!(store.contains(&l.digest), "b's layer {} stays", l.digest);
    }
    assert!(store.contains(&b.manifest_digest) && store.contains(&b.config_digest));
    assert!(store.unused(hour, later).unwrap().is_empty());
    // What stays is still a whole image: an archive of it writes.
    write_oci_archive(&store, &b, "localhost/keep:1", &tmp.path().join("b.tar"), 0).unwrap();
    // A rebuild of a's content takes nothing stale from the layer cache.
    fs::write(&spec.files[0].0, "hello\n").unwrap();
    let again = build(&spec, &store).unwrap();
    assert_eq!(again, a);
    assert!(store.contains(&a.layers.last().unwrap().digest));
}
