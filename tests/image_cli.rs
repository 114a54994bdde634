//! `cohort image build` options through the CLI, against real disposable podman services:
//! `[image] base` (the base's files are in the built image and run) and `--copy-system` into a
//! second ("system") engine named with `--system-socket`. The disposable services run as root
//! here, so they are rootful engines like root's `/run/podman/podman.sock`.
//! Needs podman + runc: `bash fixtures/podman-service.sh install`.

#[path = "support/podman.rs"]
mod podman_support;
mod support;

use std::process::Command;

use podman_support::PodmanService;
use support::*;

fn cli_out(service: &PodmanService, args: &[&str]) -> String {
    let out = service.cli().args(args).output().unwrap();
    assert!(out.status.success(), "podman {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `[image] base` names an image in the engine's storage: cohort exports it over the API and
/// builds on its layers, so the base's files and programs are in the result next to cohort's.
#[test]
fn image_build_on_a_base_image() {
    let service = PodmanService::start();
    let s = Scratch::new();

    // A base image that only the engine has: one layer with a marker file and a script.
    let root = s.tmp.path().join("base-root");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::create_dir_all(root.join("usr/local/bin")).unwrap();
    std::fs::write(root.join("etc/base-release"), "from the base\n").unwrap();
    std::fs::write(
        root.join("usr/local/bin/base-hello"),
        "#!/bin/sh\necho hello from the base\n",
    )
    .unwrap();
    let st = Command::new("chmod")
        .arg("755")
        .arg(root.join("usr/local/bin/base-hello"))
        .status()
        .unwrap();
    assert!(st.success());
    // Merged /usr like a Debian base: `#!/bin/sh` then finds the image's /usr/bin/sh.
    std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
    let tar = s.tmp.path().join("base.tar");
    let st = Command::new("tar")
        .arg("-cf")
        .arg(&tar)
        .arg("-C")
        .arg(&root)
        .args(["bin", "etc", "usr"])
        .status()
        .unwrap();
    assert!(st.success());
    cli_out(&service, &["import", tar.to_str().unwrap(), "localhost/base:1"]);

    s.write(
        "cohort.toml",
        "[image]\nbase = \"localhost/base:1\"\ntag = \"localhost/on-base:1\"\n",
    );
    s.git(&["add", "cohort.toml"]);
    s.git(&["commit", "-q", "-m", "cohort.toml"]);
    // `[image] base` is a sensitive setting: honoured once the file is trusted.
    let out = s.run(&["trust"]);
    assert_eq!(code(&out), 0, "trust: {}", text(&out));
    let out = s
        .cohort()
        .env("CONTAINER_HOST", service.container_host())
        .args(["image", "build"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "image build: {}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("localhost/on-base:1\n"));
    // The build recorded its tag in the blob store (what `gc` keeps): the digest it printed.
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let digest = stdout.lines().find_map(|l| l.strip_prefix("digest ")).unwrap();
    let store = cohort_oci::BlobStore::open(test_cache_home().join("cohort/image/blobs")).unwrap();
    assert_eq!(store.tags().unwrap()["localhost/on-base:1"].0, digest);
    assert!(store.blobs_in_use().unwrap().contains(digest));

    // The base's layer comes first, unchanged.
    let base_layers = cli_out(
        &service,
        &[
            "image",
            "inspect",
            "--format",
            "{{json .RootFS.Layers}}",
            "localhost/base:1",
        ],
    );
    let layers = cli_out(
        &service,
        &[
            "image",
            "inspect",
            "--format",
            "{{json .RootFS.Layers}}",
            "localhost/on-base:1",
        ],
    );
    let first = |json: &str| serde_json::from_str::<Vec<String>>(json.trim()).unwrap()[0].clone();
    assert_eq!(first(&base_layers), first(&layers), "{base_layers} / {layers}");

    // Run in it: the base's file and script next to cohort's programs (git), as the image user.
    let run = cli_out(
        &service,
        &[
            "run",
            "--rm",
            "--network",
            "none",
            "localhost/on-base:1",
            "sh",
            "-c",
            "cat /etc/base-release; base-hello; git --version | cut -d' ' -f1-2; id -u",
        ],
    );
    assert_eq!(run, "from the base\nhello from the base\ngit version\n1000\n");
}

/// `--copy-system` loads the image into a second engine too; `--system-socket` (or
/// `COHORT_SYSTEM_SOCKET`) names it instead of `/run/podman/podman.sock`.
#[test]
fn copy_system_loads_into_the_system_engine() {
    let user = PodmanService::start();
    let system = PodmanService::start();
    let s = Scratch::new();
    let build = |extra: &[&str]| {
        s.cohort()
            .env("CONTAINER_HOST", user.container_host())
            .env("SOURCE_DATE_EPOCH", "1700000000")
            .args(["image", "build", "--copy-system"])
            .args(extra)
            .output()
            .unwrap()
    };

    // No socket there: a usage error naming the flag, and nothing loaded anywhere.
    let out = build(&["--system-socket", "/nonexistent/podman.sock"]);
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(
        text(&out).contains("/nonexistent/podman.sock") && text(&out).contains("--system-socket"),
        "{}",
        text(&out)
    );
    assert!(!user
        .cli()
        .args(["image", "exists", "localhost/cohort:latest"])
        .status()
        .unwrap()
        .success());

    let out = build(&["--system-socket", system.socket().to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(text(&out).contains("also loaded into root's storage"), "{}", text(&out));
    let id = |service: &PodmanService| {
        cli_out(
            service,
            &["image", "inspect", "--format", "{{.Id}}", "localhost/cohort:latest"],
        )
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let built = stdout.lines().find_map(|l| l.strip_prefix("id ")).unwrap().to_string();
    assert_eq!(id(&system).trim(), built, "the system engine has the image");
    assert_eq!(id(&user).trim(), built, "and so has the user's");

    // The environment variable does the same (for a system service's unit file).
    cli_out(&system, &["rmi", "localhost/cohort:latest"]);
    let out = s
        .cohort()
        .env("CONTAINER_HOST", user.container_host())
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .env("COHORT_SYSTEM_SOCKET", system.socket())
        .args(["image", "build", "--copy-system"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_eq!(id(&system).trim(), built);
}
