//! Issue #4 §5: the agent image and per-task containers, cohort against the podman/buildah
//! CLIs doing the same work. Not a timed test: it prints figures for the README.
//!
//!   cargo bench --bench image -- [--runs 20] [--no-buildah]
//!
//! Needs root, podman + runc (`bash fixtures/podman-service.sh install`), buildah and
//! mmdebstrap (apt-get install buildah mmdebstrap), and the pinned codex
//! (`sh fixtures/install-codex.sh`, run here). Everything happens against one disposable podman
//! service with its own storage; the baseline (and only the baseline, and the measuring) uses
//! the podman and buildah CLIs.
//!
//! 1. cold `cohort image build` (empty blob cache) of a clone of this repository, against
//!    benches/buildah-minbase.sh (Debian minbase + git + CA certificates + codex, from scratch),
//!    which commits into the same storage;
//! 2. sizes: each image, and each without its codex layer (or codex file, for buildah's single
//!    layer);
//! 3. a rebuild after changing one included repository file (and one with no change);
//! 4. start-to-exit of `true`, N times: cohort's podman runtime (create, start, exec, wait,
//!    remove, as for every task) against `podman --url … run --rm IMAGE true`.
//!
//! Both sides run in the same process run, so the ratios hold on a noisy host.

#[path = "../tests/support/podman.rs"]
mod podman_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use cohort::agent::Invocation;
use cohort::runtime::podman::{NetworkMode, Podman, PodmanRuntime, PodmanSettings};
use cohort::runtime::{Bind, Exit, Runtime, Spawn};
use podman_support::PodmanService;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const TAG: &str = "localhost/cohort-bench:1";
const BUILDAH_TAG: &str = "localhost/minbase-bench:1";
/// A repository file in `[image] include` that the rebuild changes.
const CHANGED_FILE: &str = "src/lib.rs";

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn run(cmd: &mut Command, what: &str) -> String {
    ok(cmd.output().unwrap_or_else(|e| panic!("{what}: {e}")), what)
}

/// Wall time of a command that must succeed, and its stderr (cohort's progress lines).
fn timed(cmd: &mut Command, what: &str) -> (Duration, String) {
    let start = Instant::now();
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let t = start.elapsed();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out, what);
    (t, err)
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

struct Bench {
    service: PodmanService,
    tmp: tempfile::TempDir,
    repo: PathBuf,
    codex: PathBuf,
}

impl Bench {
    /// `cohort image build` in the clone, with the blob cache under the bench's temp dir.
    fn cohort_build(&self) -> (Duration, String) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cohort"));
        cmd.args(["image", "build"])
            .current_dir(&self.repo)
            .env("XDG_CACHE_HOME", self.tmp.path().join("cache"))
            .env("XDG_CONFIG_HOME", self.tmp.path().join("config"))
            .env("XDG_STATE_HOME", self.tmp.path().join("state"))
            .env("CONTAINER_HOST", self.service.container_host())
            .env_remove("SOURCE_DATE_EPOCH");
        timed(&mut cmd, "cohort image build")
    }

    /// The podman CLI on the service's storage (measuring only).
    fn podman(&self, args: &[&str]) -> String {
        run(self.service.cli().args(args), &format!("podman {args:?}"))
    }

    fn image_size(&self, image: &str) -> u64 {
        self.podman(&["image", "inspect", "--format", "{{.Size}}", image])
            .parse()
            .expect("image size")
    }

    fn layers(&self, image: &str) -> Vec<String> {
        let s = self.podman(&["image", "inspect", "--format", "{{json .RootFS.Layers}}", image]);
        serde_json::from_str(&s).expect("layer list")
    }

    /// Uncompressed sizes of the image's layers, oldest first (`podman history` lists newest
    /// first; cohort-oci writes no empty layers, so every entry is one).
    fn layer_sizes(&self, image: &str) -> Vec<u64> {
        let s = self.podman(&["history", "--format", "json", image]);
        let v: Vec<serde_json::Value> = serde_json::from_str(&s).expect("history json");
        let mut sizes: Vec<u64> = v.iter().map(|h| h["size"].as_u64().unwrap_or(0)).collect();
        sizes.reverse();
        sizes
    }
}

fn setup() -> Bench {
    for (tool, hint) in [
        ("podman", "bash fixtures/podman-service.sh install"),
        ("buildah", "apt-get install buildah"),
        ("mmdebstrap", "apt-get install mmdebstrap"),
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(found, "{tool} is needed: {hint}");
    }
    let codex = PathBuf::from(run(
        Command::new("sh").arg(Path::new(ROOT).join("fixtures/install-codex.sh")),
        "fixtures/install-codex.sh",
    ));
    let tmp = tempfile::Builder::new()
        .prefix("cohort-image-bench-")
        .tempdir()
        .unwrap();
    let repo = tmp.path().join("repo");
    run(Command::new("git").args(["clone", "-q", ROOT]).arg(&repo), "git clone");
    // The repository files an agent's image carries: sources and manifests (~150 files).
    std::fs::write(
        repo.join("cohort.toml"),
        format!(
            "[image]\ntag = \"{TAG}\"\n\
             include = [\"src/**\", \"oci/**\", \"Cargo.toml\", \"Cargo.lock\", \"README.md\"]\n"
        ),
    )
    .unwrap();
    // Which codex to run is a sensitive setting: it goes in the (bench's own) user settings,
    // which need no trust, rather than the repository's file.
    let user_config = tmp.path().join("config/cohort");
    std::fs::create_dir_all(&user_config).unwrap();
    std::fs::write(
        user_config.join("config.toml"),
        format!("[agent]\ncodex_path = \"{}\"\n", codex.display()),
    )
    .unwrap();
    let service = PodmanService::start();
    Bench {
        service,
        tmp,
        repo,
        codex,
    }
}

/// The pre-downloaded .debs for the buildah side (see benches/buildah-minbase.sh); kept
/// between bench runs under ~/.cache, filled once, untimed.
fn deb_cache() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/root".into());
    let cache = home.join(".cache/cohort-bench/debs");
    let has_debs = std::fs::read_dir(&cache)
        .map(|rd| rd.flatten().any(|e| e.path().extension().is_some_and(|x| x == "deb")))
        .unwrap_or(false);
    if !has_debs {
        eprintln!(
            "bench: downloading the minbase .debs into {} (once, untimed)",
            cache.display()
        );
        run(
            Command::new("sh")
                .arg(Path::new(ROOT).join("benches/buildah-minbase.sh"))
                .arg("fetch")
                .arg(&cache),
            "buildah-minbase.sh fetch",
        );
    }
    cache
}

/// Median and mean of `times`.
fn stats(times: &mut [Duration]) -> (Duration, Duration) {
    times.sort();
    let median = times[times.len() / 2];
    let mean = times.iter().sum::<Duration>() / times.len() as u32;
    (median, mean)
}

/// `runs` tasks of `true` through cohort's podman runtime: what `cohort run --runtime podman`
/// does per task attempt (container from the image with no network, the checkout at
/// /workspace, a private git dir and an attempt directory read-write, the object store
/// read-only and the run's gateway socket; `cohort __bridge` as its main process running
/// `true`; attach, start, its exit code; removal in the background).
/// Returns each task's start-to-exit and the whole block's time including every removal.
fn cohort_tasks(b: &Bench, runs: usize) -> (Vec<Duration>, Duration) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let podman = Podman::connect_to(b.service.socket()).await.expect("connect");
        let settings = PodmanSettings {
            image: TAG.into(),
            // What a task container gets by default: no network, the gateway through its socket.
            network: NetworkMode::None,
            memory_bytes: None,
            pids_limit: None,
            mounts: Vec::new(),
        };
        let runtime = PodmanRuntime::new(podman, settings).await.expect("podman runtime");
        eprintln!(
            "bench: cohort runtime: rootful, {}",
            if runtime.uses_idmap() {
                "userns=auto with idmapped mounts"
            } else {
                "host user namespace"
            }
        );
        // The run's model gateway, bridged into every container as for a task.
        let socket = b.tmp.path().join("gateway.sock");
        let gateway = cohort::gateway::Gateway::start(cohort::gateway::GatewayConfig {
            socket: Some(socket.clone()),
            ..cohort::gateway::GatewayConfig::new("http://127.0.0.1:9/v1", cohort::secret::Secret::new("bench-key"))
        })
        .expect("the gateway");
        // What a task's container gets besides its checkout (see `run::task::agent`).
        let (git_dir, attempt) = (b.tmp.path().join("gitdir"), b.tmp.path().join("attempt"));
        for d in [&git_dir, &attempt] {
            std::fs::create_dir_all(d).expect("bench dirs");
        }
        let binds = vec![
            Bind {
                path: git_dir,
                writable: true,
            },
            Bind {
                path: attempt,
                writable: true,
            },
            Bind {
                path: b.repo.join(".git/objects"),
                writable: false,
            },
        ];
        let mut times = Vec::new();
        let block = Instant::now();
        for _ in 0..runs {
            let spawn = Spawn {
                invocation: Invocation {
                    program: "true".into(),
                    ..Default::default()
                },
                workdir: b.repo.clone(),
                timeout: None,
                binds: binds.clone(),
                run_id: "bench".into(),
                task: 1,
                gateway_socket: Some(socket.clone()),
                role: Default::default(),
                caches: Vec::new(),
                tree: None,
                scratch: None,
            };
            let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
            let start = Instant::now();
            let exit = runtime
                .run(spawn, tx, tokio_util::sync::CancellationToken::new())
                .await
                .expect("task container");
            times.push(start.elapsed());
            assert_eq!(exit, Exit::Code(0), "true in a task container");
        }
        runtime.removals_done().await;
        let elapsed = block.elapsed();
        gateway.shutdown().await;
        (times, elapsed)
    })
}

/// What `podman run --rm` does, through cohort's REST client: `true` as the main process,
/// create, start, wait, remove; no exec, no mounts, the host user namespace. Not cohort's
/// per-task path: it separates the client's cost from the per-task design's (exec, userns=auto,
/// idmapped mounts) when the two differ from the CLI.
fn rest_runs(b: &Bench, runs: usize) -> Vec<Duration> {
    use cohort::runtime::podman::{ContainerSpec, UsernsMode};
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let podman = Podman::connect_to(b.service.socket()).await.expect("connect");
        let mut times = Vec::new();
        for _ in 0..runs {
            let spec = ContainerSpec {
                image: TAG.into(),
                command: Some(vec!["true".into()]),
                userns: Some(UsernsMode::Host),
                ..Default::default()
            };
            let start = Instant::now();
            let id = podman.create_container(&spec).await.expect("create");
            podman.start_container(&id).await.expect("start");
            let code = podman.wait_container(&id).await.expect("wait");
            podman.remove_container(&id, false).await.expect("remove");
            times.push(start.elapsed());
            assert_eq!(code, 0, "true as a container's main process");
        }
        times
    })
}

/// `runs` times `podman --url unix://SOCK run --rm IMAGE true` on the same service.
fn cli_runs(b: &Bench, runs: usize) -> Vec<Duration> {
    let url = b.service.container_host();
    (0..runs)
        .map(|_| {
            let mut cmd = Command::new("podman");
            cmd.args(["--url", &url, "run", "--rm", TAG, "true"]);
            timed(&mut cmd, "podman run --rm").0
        })
        .collect()
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() {
    let mut runs = 20usize;
    let mut buildah = true;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => runs = args.next().and_then(|v| v.parse().ok()).expect("--runs N"),
            "--no-buildah" => buildah = false,
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(runs > 0, "--runs must be at least 1");
    let cache = if buildah { Some(deb_cache()) } else { None };
    let b = setup();
    let date = run(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]), "date");
    println!(
        "# cohort image benchmark, {date}, load average at start {}",
        load_average()
    );
    println!(
        "codex: {} ({:.1} MB)",
        b.codex.display(),
        mb(std::fs::metadata(&b.codex).unwrap().len())
    );

    // 1. Cold builds. cohort first: the codex binary is then as warm in the page cache for
    // buildah as for cohort (install-codex.sh has just read it anyway).
    let (cohort_cold, progress) = b.cohort_build();
    eprint!("{progress}");
    let buildah_time = cache.as_ref().map(|cache| {
        let dir = b.service.dir();
        let mut cmd = Command::new("sh");
        cmd.arg(Path::new(ROOT).join("benches/buildah-minbase.sh"))
            .arg("build")
            .arg(dir) // root/ and runroot/: the service's own storage
            .arg(&b.codex)
            .arg(BUILDAH_TAG)
            .arg(cache)
            .env("CONTAINERS_CONF", podman_support::containers_conf())
            .env("TMPDIR", dir.join("tmp"));
        timed(&mut cmd, "buildah-minbase.sh build").0
    });

    // 2. Sizes (uncompressed, as podman stores them).
    let size = b.image_size(TAG);
    let sizes = b.layer_sizes(TAG);
    let codex_len = std::fs::metadata(&b.codex).unwrap().len();
    // The codex layer: the file plus tar headers and padding.
    let codex_layer = sizes
        .iter()
        .copied()
        .find(|s| *s >= codex_len && *s < codex_len + (1 << 16))
        .expect("a codex layer");
    let without_codex = size - codex_layer;
    // cohort-oci's fixed order puts the cohort binary's layer right after codex's.
    let codex_at = sizes.iter().position(|s| *s == codex_layer).unwrap();
    let cohort_layer = sizes.get(codex_at + 1).copied().unwrap_or(0);
    println!(
        "cohort layers (uncompressed MB, oldest first): {}",
        sizes
            .iter()
            .map(|s| format!("{:.1}", mb(*s)))
            .collect::<Vec<_>>()
            .join(", ")
    );

    // 3. Rebuilds: one included file changed, then nothing changed.
    let before = b.layers(TAG);
    let path = b.repo.join(CHANGED_FILE);
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("// changed by benches/image.rs\n");
    std::fs::write(&path, text).unwrap();
    let (rebuild, progress) = b.cohort_build();
    eprint!("{progress}");
    let after = b.layers(TAG);
    let reused = before.iter().zip(&after).take_while(|(a, b)| a == b).count();
    let (noop, _) = b.cohort_build();

    // 4. Start-to-exit, alternating sides in blocks so drift in the host's load hits both.
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    let mut rest = Vec::new();
    let mut ours_total = Duration::ZERO;
    let block = runs.div_ceil(4).max(1);
    while ours.len() < runs {
        let n = block.min(runs - ours.len());
        let (times, total) = cohort_tasks(&b, n);
        ours.extend(times);
        ours_total += total;
        theirs.extend(cli_runs(&b, n));
        rest.extend(rest_runs(&b, n));
    }
    let (ours_med, ours_mean) = stats(&mut ours);
    let (theirs_med, theirs_mean) = stats(&mut theirs);
    let (rest_med, rest_mean) = stats(&mut rest);

    println!();
    println!("| figure | cohort | baseline | ratio / target |");
    println!("|---|---|---|---|");
    match (buildah_time, cache.is_some()) {
        (Some(t), true) => {
            let r = secs(cohort_cold) / secs(t);
            println!(
                "| cold image build | {:.1} s | buildah script {:.1} s | {r:.2}× (target ≤ 0.5×: {}) |",
                secs(cohort_cold),
                secs(t),
                verdict(r <= 0.5)
            );
        }
        _ => println!("| cold image build | {:.1} s | (--no-buildah) | |", secs(cohort_cold)),
    }
    let buildah_sizes = buildah_time.map(|_| b.image_size(BUILDAH_TAG));
    println!(
        "| image size | {:.1} MB ({} layers) | {} | |",
        mb(size),
        sizes.len(),
        buildah_sizes.map_or("-".into(), |s| format!("{:.1} MB", mb(s)))
    );
    println!(
        "| image without codex | {:.1} MB | {} | target ≤ 40 MB: {} |",
        mb(without_codex),
        buildah_sizes.map_or("-".into(), |s| format!("{:.1} MB", mb(s.saturating_sub(codex_len)))),
        verdict(without_codex <= 40_000_000)
    );
    println!(
        "| image without codex and the cohort binary | {:.1} MB | | (the buildah image's content) |",
        mb(without_codex - cohort_layer)
    );
    println!(
        "| rebuild, one file changed | {:.2} s ({reused} of {} layers reused) | | target ≤ 2 s: {} |",
        secs(rebuild),
        after.len(),
        verdict(rebuild <= Duration::from_secs(2))
    );
    println!("| rebuild, nothing changed | {:.2} s | | |", secs(noop));
    let r = secs(ours_med) / secs(theirs_med);
    println!(
        "| start-to-exit of `true`, median of {runs} (mean) | {:.0} ms ({:.0}) | podman run --rm {:.0} ms ({:.0}) | {r:.2}× (target ≤ 0.8×: {}) |",
        ours_med.as_secs_f64() * 1e3,
        ours_mean.as_secs_f64() * 1e3,
        theirs_med.as_secs_f64() * 1e3,
        theirs_mean.as_secs_f64() * 1e3,
        verdict(r <= 0.8)
    );
    let per_task = ours_total / runs as u32;
    println!(
        "| tasks one after another, per task with removal (wall time / {runs}) | {:.0} ms | podman run --rm mean {:.0} ms | {:.2}× |",
        per_task.as_secs_f64() * 1e3,
        theirs_mean.as_secs_f64() * 1e3,
        secs(per_task) / secs(theirs_mean)
    );
    println!(
        "| start-to-exit, REST client doing what `podman run --rm` does (mean) | {:.0} ms ({:.0}) | podman run --rm {:.0} ms | {:.2}× |",
        rest_med.as_secs_f64() * 1e3,
        rest_mean.as_secs_f64() * 1e3,
        theirs_med.as_secs_f64() * 1e3,
        secs(rest_med) / secs(theirs_med)
    );
    println!();
    println!("load average at end {}", load_average());
}
