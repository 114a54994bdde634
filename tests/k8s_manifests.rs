//! `cohort k8s manifests`: the YAML for a run's workers, read back into k8s-openapi's types.
//! The run's controller files are written by hand (what `cohort run` with workers writes).

mod support;

use std::os::unix::fs::PermissionsExt;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;
use support::*;

const RUN: &str = "20261207-120000-ab12";
const TOKEN: &str = "cwt1.f00dfeed.secret-part-of-the-worker-token";
const API_KEY: &str = "sk-test-the-api-key-must-not-leak-0123456789";
const IMAGE: &str = "127.0.0.1:5000/cohort@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// A scratch repository with a run whose controller listens at 10.1.2.3:8443, and a config
/// with a memory limit.
fn scratch_with_run() -> (Scratch, std::path::PathBuf) {
    let s = Scratch::new();
    let run_dir = s.work.join(".git/cohort/runs").join(RUN);
    std::fs::create_dir_all(&run_dir).unwrap();
    std::fs::write(
        run_dir.join("controller.json"),
        r#"{"url": "https://10.1.2.3:8443", "fingerprint": "ab12cd34"}"#,
    )
    .unwrap();
    std::fs::write(run_dir.join("worker-token"), format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(run_dir.join("worker-token"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = s.tmp.path().join("config.toml");
    std::fs::write(&config, "[container]\nmemory = \"2g\"\n").unwrap();
    (s, config)
}

fn manifests(s: &Scratch, config: &std::path::Path, extra: &[&str]) -> std::process::Output {
    s.cohort()
        .env("OPENAI_API_KEY", API_KEY)
        .arg("--config")
        .arg(config)
        .args(["k8s", "manifests", "--run", RUN])
        .args(extra)
        .output()
        .unwrap()
}

/// The three documents, by kind.
fn parse(yaml: &str) -> (Secret, Job, NetworkPolicy) {
    let mut secret = None;
    let mut job = None;
    let mut policy = None;
    for doc in serde_norway::Deserializer::from_str(yaml) {
        let v = serde_norway::Value::deserialize(doc).unwrap();
        let kind = v["kind"].as_str().unwrap().to_owned();
        match kind.as_str() {
            "Secret" => secret = Some(serde_norway::from_value::<Secret>(v).unwrap()),
            "Job" => job = Some(serde_norway::from_value::<Job>(v).unwrap()),
            "NetworkPolicy" => policy = Some(serde_norway::from_value::<NetworkPolicy>(v).unwrap()),
            other => panic!("unexpected kind {other}"),
        }
    }
    (secret.unwrap(), job.unwrap(), policy.unwrap())
}

#[test]
fn manifests_for_a_run_read_back_as_typed_objects() {
    let (s, config) = scratch_with_run();
    let out = manifests(&s, &config, &["--parallelism", "4", "--image", IMAGE, "--cpus", "2"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let yaml = String::from_utf8(out.stdout.clone()).unwrap();
    assert!(!yaml.contains(API_KEY), "the API key is in the manifests");
    assert!(!text(&out).contains(API_KEY));
    assert_eq!(
        yaml.matches(TOKEN).count(),
        1,
        "the token, once, in the Secret only:\n{yaml}"
    );
    let (secret, job, policy) = parse(&yaml);

    let labels = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| m.labels.clone().unwrap();
    for l in [
        labels(&secret.metadata),
        labels(&job.metadata),
        labels(&policy.metadata),
    ] {
        assert_eq!(l["app.kubernetes.io/name"], "cohort-worker");
        assert_eq!(l["cohort.run"], RUN);
    }
    let name = format!("cohort-worker-{RUN}");
    assert_eq!(secret.metadata.name.as_deref(), Some(name.as_str()));
    assert_eq!(secret.string_data.as_ref().unwrap()["token"], TOKEN);

    let spec = job.spec.unwrap();
    assert_eq!(spec.parallelism, Some(4));
    assert_eq!(spec.completions, None, "work queue: no completions");
    assert!(spec.backoff_limit.unwrap() >= 4);
    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
    assert_eq!(pod.automount_service_account_token, Some(false));
    assert_eq!(
        labels(spec.template.metadata.as_ref().unwrap()),
        policy
            .spec
            .as_ref()
            .unwrap()
            .pod_selector
            .as_ref()
            .unwrap()
            .match_labels
            .clone()
            .unwrap(),
        "the policy selects the Job's pods"
    );
    assert_eq!(pod.containers.len(), 1);
    let c = &pod.containers[0];
    assert_eq!(c.image.as_deref(), Some(IMAGE));
    assert_eq!(
        c.command.clone().unwrap(),
        ["cohort", "worker", "--controller", "https://10.1.2.3:8443"]
    );
    assert!(c.args.is_none());
    let env = c.env.as_ref().unwrap();
    assert_eq!(env.len(), 1);
    assert_eq!(env[0].name, "COHORT_WORKER_TOKEN");
    assert!(env[0].value.is_none(), "the token comes from the Secret, not a literal");
    let key_ref = env[0].value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap();
    assert_eq!((key_ref.name.as_str(), key_ref.key.as_str()), (name.as_str(), "token"));
    let res = c.resources.as_ref().unwrap();
    for q in [res.limits.as_ref().unwrap(), res.requests.as_ref().unwrap()] {
        assert_eq!(q["memory"].0, "2Gi");
        assert_eq!(q["cpu"].0, "2");
    }
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.run_as_user, Some(1000));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.capabilities.as_ref().unwrap().drop.clone().unwrap(), ["ALL"]);
    // The read-only root leaves the home, workspace and /tmp writable, as scratch volumes.
    let mounts: Vec<&str> = c
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .map(|m| m.mount_path.as_str())
        .collect();
    assert!(
        mounts.contains(&"/home/cohort") && mounts.contains(&"/tmp"),
        "{mounts:?}"
    );

    let p = policy.spec.unwrap();
    assert_eq!(p.policy_types.clone().unwrap(), ["Ingress", "Egress"]);
    assert_eq!(p.ingress.clone().unwrap().len(), 0, "no ingress");
    let egress = p.egress.unwrap();
    assert_eq!(egress.len(), 2, "the controller, and DNS");
    let to_controller = &egress[0];
    let peers = to_controller.to.as_ref().unwrap();
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].ip_block.as_ref().unwrap().cidr, "10.1.2.3/32");
    let ports = to_controller.ports.as_ref().unwrap();
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0].port, Some(IntOrString::Int(8443)));
    assert_eq!(ports[0].protocol.as_deref(), Some("TCP"));
    let dns = &egress[1];
    assert!(dns.to.as_ref().unwrap()[0].ip_block.is_none());
    assert!(dns
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .all(|p| p.port == Some(IntOrString::Int(53))));
}

#[test]
fn manifests_to_a_private_file_and_controller_override() {
    let (s, config) = scratch_with_run();
    let file = s.tmp.path().join("workers.yaml");
    let out = manifests(
        &s,
        &config,
        &[
            "--parallelism",
            "1",
            "--image",
            "127.0.0.1:5000/cohort:1",
            "--controller",
            "https://192.0.2.7:9000",
            "-o",
            file.to_str().unwrap(),
        ],
    );
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(out.stdout.is_empty(), "written to the file, not stdout");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let (_, job, policy) = parse(&std::fs::read_to_string(&file).unwrap());
    let pod = job.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.containers[0].command.clone().unwrap()[3], "https://192.0.2.7:9000");
    let egress = policy.spec.unwrap().egress.unwrap();
    assert_eq!(
        egress[0].to.as_ref().unwrap()[0].ip_block.as_ref().unwrap().cidr,
        "192.0.2.7/32"
    );
    assert_eq!(egress[0].ports.as_ref().unwrap()[0].port, Some(IntOrString::Int(9000)));
    // No leftover temporary file next to it.
    let names: Vec<_> = std::fs::read_dir(s.tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".cohort-k8s-"))
        .collect();
    assert!(names.is_empty(), "{names:?}");
}

#[test]
fn manifests_usage_errors() {
    let (s, config) = scratch_with_run();
    // No --image: say to push first.
    let out = manifests(&s, &config, &["--parallelism", "2"]);
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(text(&out).contains("cohort image push"), "{}", text(&out));
    // Parallelism 0.
    let out = manifests(&s, &config, &["--parallelism", "0", "--image", "127.0.0.1:5000/c:1"]);
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(text(&out).contains("--parallelism"), "{}", text(&out));
    // A run that does not exist.
    let out = s
        .cohort()
        .args([
            "k8s",
            "manifests",
            "--run",
            "20000101-000000-0000",
            "--parallelism",
            "1",
        ])
        .args(["--image", "127.0.0.1:5000/c:1"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(text(&out).contains("no run 20000101-000000-0000"), "{}", text(&out));
    // A run started without workers: no controller files.
    let bare = "20261207-120000-0000";
    std::fs::create_dir_all(s.work.join(".git/cohort/runs").join(bare)).unwrap();
    let out = s
        .cohort()
        .args(["k8s", "manifests", "--run", bare, "--parallelism", "1"])
        .args(["--image", "127.0.0.1:5000/c:1"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(text(&out).contains("start the run with workers"), "{}", text(&out));
    // A controller named by host name: the policy needs an address.
    let out = manifests(&s, &config, &["--parallelism", "1", "--image", "127.0.0.1:5000/c:1"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let out = manifests(
        &s,
        &config,
        &[
            "--parallelism",
            "1",
            "--image",
            "127.0.0.1:5000/c:1",
            "--controller",
            "https://controller.example:8443",
        ],
    );
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(text(&out).contains("by IP address"), "{}", text(&out));
}
