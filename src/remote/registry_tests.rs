use super::*;
use cohort_oci::BuiltImage;
use http_body_util::BodyExt;

/// A store with one image (`localhost/cohort:latest`: a layer, a config, a manifest) and a
/// stray blob no image names. Returns `(store, manifest, config, layer, stray)`.
fn store(dir: &std::path::Path) -> (BlobStore, String, String, String, String) {
    let store = BlobStore::open(dir).unwrap();
    let (layer, layer_size) = store.put(b"not really a tar").unwrap();
    let (config, config_size) = store.put(br#"{"architecture":"amd64","os":"linux"}"#).unwrap();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer, "size": layer_size}],
    });
    let (manifest, manifest_size) = store.put(manifest.to_string().as_bytes()).unwrap();
    let image = BuiltImage {
        manifest_digest: manifest.clone(),
        manifest_size,
        config_digest: config.clone(),
        layers: Vec::new(),
    };
    store.tag("localhost/cohort:latest", &image).unwrap();
    let (stray, _) = store.put(b"someone else's image").unwrap();
    (store, manifest, config, layer, stray)
}

async fn body(r: Response<Full<Bytes>>) -> Vec<u8> {
    r.into_body().collect().await.unwrap().to_bytes().to_vec()
}

fn header<'a>(r: &'a Response<Full<Bytes>>, name: &str) -> &'a str {
    r.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

#[tokio::test]
async fn serves_base_manifests_and_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let (store, manifest, config, layer, _) = store(dir.path());
    let reg = Registry::new(store.clone());

    let r = reg.respond(&Method::GET, "/v2/");
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, API_VERSION_HEADER), "registry/2.0");

    for reference in [manifest.as_str(), "latest"] {
        let r = reg.respond(&Method::GET, &format!("/v2/cohort/manifests/{reference}"));
        assert_eq!(r.status(), 200, "{reference}");
        assert_eq!(header(&r, "content-type"), OCI_MANIFEST);
        assert_eq!(header(&r, DIGEST_HEADER), manifest);
        let len: usize = header(&r, "content-length").parse().unwrap();
        assert_eq!(body(r).await, store.read(&manifest).unwrap());
        assert_eq!(len, store.read(&manifest).unwrap().len());
    }
    let r = reg.respond(&Method::HEAD, &format!("/v2/cohort/manifests/{manifest}"));
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "content-length"),
        store.read(&manifest).unwrap().len().to_string()
    );
    assert!(body(r).await.is_empty());

    let r = reg.respond(&Method::HEAD, &format!("/v2/cohort/blobs/{layer}"));
    assert_eq!(header(&r, "content-length"), "16");
    assert_eq!(reg.served(), Served::default(), "a HEAD is not a blob sent");
    let r = reg.respond(&Method::GET, &format!("/v2/cohort/blobs/{layer}"));
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, DIGEST_HEADER), layer);
    assert_eq!(body(r).await, b"not really a tar");
    let served = reg.served();
    assert_eq!((served.blob_gets, served.blob_bytes), (1, 16));
    assert_eq!(served.digests, vec![layer.clone()]);

    // The free function answers the same.
    let r = respond(store.root(), &Method::GET, &format!("/v2/cohort/blobs/{config}"));
    assert_eq!(r.status(), 200);
    let none = tempfile::tempdir().unwrap();
    assert_eq!(respond(none.path(), &Method::GET, "/v2/").status(), 404);
    assert!(!none.path().join("blobs").exists(), "nothing created");
}

#[tokio::test]
async fn refuses_writes_bad_digests_and_non_manifests() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _, config, layer, _) = store(dir.path());
    let reg = Registry::new(store);
    for m in [Method::PUT, Method::POST, Method::DELETE, Method::PATCH] {
        let r = reg.respond(&m, &format!("/v2/cohort/blobs/{layer}"));
        assert_eq!(r.status(), 405, "{m}");
    }
    std::fs::write(dir.path().join("secret"), "x").unwrap();
    for bad in [
        "sha256:../secret",
        "sha256:../../etc/passwd",
        "sha512:00",
        layer.to_uppercase().as_str(),
        format!("{layer}0").as_str(),
    ] {
        let r = reg.respond(&Method::GET, &format!("/v2/cohort/blobs/{bad}"));
        assert_eq!(r.status(), 400, "{bad}");
        let e: serde_json::Value = serde_json::from_slice(&body(r).await).unwrap();
        assert_eq!(e["errors"][0]["code"], "DIGEST_INVALID");
    }
    let missing = format!("sha256:{}", "0".repeat(64));
    let r = reg.respond(&Method::GET, &format!("/v2/cohort/blobs/{missing}"));
    assert_eq!(r.status(), 404);
    let e: serde_json::Value = serde_json::from_slice(&body(r).await).unwrap();
    assert_eq!(e["errors"][0]["code"], "BLOB_UNKNOWN");
    // A config is JSON but no manifest; a layer is neither.
    for d in [&config, &layer] {
        let r = reg.respond(&Method::GET, &format!("/v2/cohort/manifests/{d}"));
        assert_eq!(r.status(), 404, "{d}");
    }
    for p in [
        "/v2/cohort/tags/list",
        "/v2/Cohort/blobs/x",
        "/v3/",
        "/v2x/cohort/blobs/x",
        "/v2/cohort/manifests/nosuchtag",
    ] {
        assert_eq!(reg.respond(&Method::GET, p).status(), 404, "{p}");
    }
    assert_eq!(reg.served().blob_gets, 0);
}

#[tokio::test]
async fn limited_to_one_run_s_images() {
    let dir = tempfile::tempdir().unwrap();
    let (store, manifest, config, layer, stray) = store(dir.path());
    let reg = Registry::only(store.clone(), std::slice::from_ref(&manifest)).unwrap();
    for d in [&config, &layer] {
        assert_eq!(
            reg.respond(&Method::GET, &format!("/v2/cohort/blobs/{d}")).status(),
            200
        );
    }
    assert_eq!(
        reg.respond(&Method::GET, &format!("/v2/cohort/blobs/{stray}")).status(),
        404
    );
    assert_eq!(reg.respond(&Method::GET, "/v2/cohort/manifests/latest").status(), 200);
    let none = Registry::only(store.clone(), &[]).unwrap();
    assert_eq!(none.respond(&Method::GET, "/v2/cohort/manifests/latest").status(), 404);
    assert!(Registry::only(store, &[stray]).is_err(), "a blob that is no manifest");
}

#[test]
fn image_id_is_the_config_digest() {
    let dir = tempfile::tempdir().unwrap();
    let (store, manifest, config, layer, _) = store(dir.path());
    assert_eq!(
        image_id_of(&store, &manifest).unwrap(),
        config.trim_start_matches("sha256:")
    );
    assert!(image_id_of(&store, &layer).is_err());
    assert!(image_id_of(&store, "sha256:../x").is_err());
}
