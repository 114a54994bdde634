//! Kubernetes manifests for a run's workers (`cohort k8s manifests`): a Secret with the run's
//! worker token, a Job of N worker pods, and a NetworkPolicy that lets them reach only the
//! controller (and DNS). Built from k8s-openapi's typed objects, written as YAML documents.
//!
//! The Job follows the work-queue pattern: `parallelism` workers, no `completions`; each
//! worker takes tasks from the controller until the queue is empty, then exits 0, and the Job
//! is complete once one pod has succeeded and all have ended.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use anyhow::{Context, Result};
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, EnvVarSource, PodSecurityContext, PodSpec, PodTemplateSpec,
    ResourceRequirements, SeccompProfile, Secret, SecretKeySelector, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;

/// A request the user can fix (a missing run, a bad image reference or address): exit 2 at
/// the CLI edge. The library's own error type, not the CLI's.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct K8sError(pub String);

fn usage(msg: impl Into<String>) -> anyhow::Error {
    K8sError(msg.into()).into()
}

/// `app.kubernetes.io/name` of every object.
pub const APP_NAME: &str = "cohort-worker";
/// The label carrying the run id.
pub const RUN_LABEL: &str = "cohort.run";
/// The Secret's key holding the token.
pub const TOKEN_KEY: &str = "token";
/// The image's user (cohort-oci's `ImageSettings` default).
pub const IMAGE_UID: i64 = 1000;
/// Where the image's user's home is: writable scratch on a read-only root.
const WRITABLE: &[(&str, &str)] = &[("home", "/home/cohort"), ("workspace", "/workspace"), ("tmp", "/tmp")];

/// What the controller of a run wrote for its workers (`<run dir>/controller.json`).
#[derive(Debug, Clone, Deserialize)]
pub struct ControllerFile {
    pub url: String,
    /// SHA-256 of the controller's certificate, hex.
    pub fingerprint: String,
}

/// A run's controller address and worker token, from its run directory.
pub struct RunWorkers {
    pub controller: ControllerFile,
    pub token: String,
}

impl std::fmt::Debug for RunWorkers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunWorkers")
            .field("controller", &self.controller)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// Reads `controller.json` and `worker-token` from `run_dir`. Missing: a usage error saying to
/// start the run with workers.
pub fn read_run_workers(run_dir: &Path, run: &str) -> Result<RunWorkers> {
    let cfile = run_dir.join("controller.json");
    let tfile = run_dir.join("worker-token");
    if !cfile.is_file() || !tfile.is_file() {
        return Err(usage(format!(
            "run {run} has no controller for workers ({} or {} is missing): start the run with \
             workers first (`cohort run --listen IP:PORT …` or `--host URL`)",
            cfile.display(),
            tfile.display()
        )));
    }
    let text = std::fs::read(&cfile).with_context(|| format!("cannot read {}", cfile.display()))?;
    let controller: ControllerFile = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not {{\"url\",\"fingerprint\"}}", cfile.display()))?;
    let token = std::fs::read_to_string(&tfile).with_context(|| format!("cannot read {}", tfile.display()))?;
    let token = token.trim().to_owned();
    if token.is_empty() {
        return Err(usage(format!("{} is empty: start the run again", tfile.display())));
    }
    Ok(RunWorkers { controller, token })
}

/// Everything the manifests are made of.
#[derive(Clone)]
pub struct WorkerJob {
    pub run: String,
    pub parallelism: i32,
    /// The image reference the cluster pulls (what `cohort image push` pushed).
    pub image: String,
    /// `https://IP:PORT`.
    pub controller_url: String,
    pub token: String,
    /// `[container] memory`, bytes: the limit and the request.
    pub memory_bytes: Option<i64>,
    /// CPUs per worker (a Kubernetes quantity: `2`, `500m`): the limit and the request.
    pub cpus: Option<String>,
}

/// The three objects, in the order they must be applied (the Job needs the Secret).
pub struct Manifests {
    pub secret: Secret,
    pub job: Job,
    pub network_policy: NetworkPolicy,
}

/// `cohort-worker-<run>`, a DNS label (lowercase, digits, `-`, at most 63).
pub fn object_name(run: &str) -> String {
    let mut s: String = format!("{APP_NAME}-{run}")
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    s.truncate(63);
    s.trim_end_matches('-').to_owned()
}

/// The controller's IP and port, for the policy's ipBlock. A host name is refused: a policy
/// can only name addresses, and a name could resolve elsewhere later.
pub fn controller_endpoint(url: &str) -> Result<(IpAddr, u16)> {
    let parsed = reqwest::Url::parse(url).map_err(|e| usage(format!("--controller {url:?}: {e}")))?;
    if parsed.scheme() != "https" {
        return Err(usage(format!("--controller {url:?}: workers speak https://IP:PORT")));
    }
    // An IPv6 host comes bracketed (`[fd00::1]`).
    let host = parsed
        .host_str()
        .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
        .and_then(|h| h.parse::<IpAddr>().ok())
        .ok_or_else(|| {
            usage(format!(
                "--controller {url:?}: name the controller by IP address (https://IP:PORT); the \
                 NetworkPolicy allows one address"
            ))
        })?;
    let port = parsed.port_or_known_default().unwrap_or(443);
    Ok((host, port))
}

/// Bytes as a quantity: `2Gi`, `512Mi`, … when exact, else the plain number.
pub fn bytes_quantity(bytes: i64) -> Quantity {
    for (unit, shift) in [("Gi", 30), ("Mi", 20), ("Ki", 10)] {
        if bytes % (1 << shift) == 0 {
            return Quantity(format!("{}{unit}", bytes >> shift));
        }
    }
    Quantity(bytes.to_string())
}

fn labels(run: &str) -> BTreeMap<String, String> {
    // A label value: at most 63 of [A-Za-z0-9._-], starting and ending alphanumeric.
    let mut value: String = run
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    value.truncate(63);
    let value = value.trim_matches(|c: char| !c.is_ascii_alphanumeric()).to_owned();
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), APP_NAME.to_owned()),
        (RUN_LABEL.to_owned(), value),
    ])
}

/// Builds the Secret, Job and NetworkPolicy for `spec`.
pub fn build(spec: &WorkerJob) -> Result<Manifests> {
    if spec.parallelism < 1 {
        return Err(usage("--parallelism must be at least 1"));
    }
    if spec.image.trim().is_empty() || spec.image.contains(char::is_whitespace) {
        return Err(usage(format!("--image {:?} is not an image reference", spec.image)));
    }
    let (ip, port) = controller_endpoint(&spec.controller_url)?;
    let name = object_name(&spec.run);
    let labels = labels(&spec.run);
    let meta = || ObjectMeta {
        name: Some(name.clone()),
        labels: Some(labels.clone()),
        ..Default::default()
    };

    let secret = Secret {
        metadata: meta(),
        type_: Some("Opaque".into()),
        string_data: Some(BTreeMap::from([(TOKEN_KEY.to_owned(), spec.token.clone())])),
        ..Default::default()
    };

    let mut resources = BTreeMap::new();
    if let Some(m) = spec.memory_bytes {
        resources.insert("memory".to_owned(), bytes_quantity(m));
    }
    if let Some(c) = &spec.cpus {
        resources.insert("cpu".to_owned(), Quantity(c.clone()));
    }
    let container = Container {
        name: "worker".into(),
        image: Some(spec.image.clone()),
        command: Some(vec![
            "cohort".into(),
            "worker".into(),
            "--controller".into(),
            spec.controller_url.clone(),
        ]),
        // The token only through the environment, from the Secret: never in argv.
        env: Some(vec![EnvVar {
            name: "COHORT_WORKER_TOKEN".into(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: name.clone(),
                    key: TOKEN_KEY.into(),
                    optional: Some(false),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }]),
        // Requests equal to limits: a worker gets what it may use, and is not overcommitted.
        resources: (!resources.is_empty()).then(|| ResourceRequirements {
            limits: Some(resources.clone()),
            requests: Some(resources),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(IMAGE_UID),
            run_as_group: Some(IMAGE_UID),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        // The root is read-only: the worker and its agent write only in these scratch volumes.
        volume_mounts: Some(
            WRITABLE
                .iter()
                .map(|(v, path)| VolumeMount {
                    name: (*v).into(),
                    mount_path: (*path).into(),
                    ..Default::default()
                })
                .collect(),
        ),
        ..Default::default()
    };
    let job = Job {
        metadata: meta(),
        spec: Some(JobSpec {
            parallelism: Some(spec.parallelism),
            // No completions: the work-queue pattern (a worker exits 0 when the queue is empty).
            completions: None,
            // Each worker may fail about twice (a restarted controller, a lost node) before the
            // Job gives up; the controller re-queues whatever a failed worker held.
            backoff_limit: Some((2 * spec.parallelism).max(6)),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels.clone()),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    // Never: a failed worker is replaced by a new pod with clean scratch volumes
                    // (OnFailure would restart it in the old pod, on the leftovers of the crash),
                    // and the failed pod stays for `kubectl logs`.
                    restart_policy: Some("Never".into()),
                    // Workers talk to the controller only, never to the Kubernetes API.
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(IMAGE_UID),
                        run_as_group: Some(IMAGE_UID),
                        fs_group: Some(IMAGE_UID),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    containers: vec![container],
                    volumes: Some(
                        WRITABLE
                            .iter()
                            .map(|(v, _)| Volume {
                                name: (*v).into(),
                                empty_dir: Some(EmptyDirVolumeSource::default()),
                                ..Default::default()
                            })
                            .collect(),
                    ),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    };

    let cidr = match ip {
        IpAddr::V4(_) => format!("{ip}/32"),
        IpAddr::V6(_) => format!("{ip}/128"),
    };
    let dns = ["UDP", "TCP"]
        .iter()
        .map(|proto| NetworkPolicyPort {
            protocol: Some((*proto).into()),
            port: Some(IntOrString::Int(53)),
            ..Default::default()
        })
        .collect();
    let network_policy = NetworkPolicy {
        metadata: meta(),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(labels.clone()),
                ..Default::default()
            }),
            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
            // Listed and empty: no ingress at all.
            ingress: Some(Vec::new()),
            egress: Some(vec![
                NetworkPolicyEgressRule {
                    to: Some(vec![NetworkPolicyPeer {
                        ip_block: Some(IPBlock { cidr, except: None }),
                        ..Default::default()
                    }]),
                    ports: Some(vec![NetworkPolicyPort {
                        protocol: Some("TCP".into()),
                        port: Some(IntOrString::Int(i32::from(port))),
                        ..Default::default()
                    }]),
                },
                // DNS, to the cluster's resolver in kube-system only.
                NetworkPolicyEgressRule {
                    to: Some(vec![NetworkPolicyPeer {
                        namespace_selector: Some(LabelSelector {
                            match_labels: Some(BTreeMap::from([(
                                "kubernetes.io/metadata.name".to_owned(),
                                "kube-system".to_owned(),
                            )])),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }]),
                    ports: Some(dns),
                },
            ]),
        }),
    };
    Ok(Manifests {
        secret,
        job,
        network_policy,
    })
}

/// The manifests as one multi-document YAML stream (`kubectl apply -f`).
pub fn to_yaml(m: &Manifests, run: &str) -> Result<String> {
    let mut out = format!(
        "# cohort workers for run {run}: `kubectl apply -f` this file.\n\
         # It holds the run's worker token (in the Secret): keep it private.\n"
    );
    let docs = [
        serde_norway::to_string(&m.secret)?,
        serde_norway::to_string(&m.job)?,
        serde_norway::to_string(&m.network_policy)?,
    ];
    for d in docs {
        out.push_str("---\n");
        out.push_str(&d);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_quantities_and_endpoints() {
        assert_eq!(
            object_name("20261207-132850-ab12"),
            "cohort-worker-20261207-132850-ab12"
        );
        assert_eq!(object_name("Run_X"), "cohort-worker-run-x");
        assert!(object_name(&"a".repeat(100)).len() <= 63);
        assert_eq!(bytes_quantity(2 << 30).0, "2Gi");
        assert_eq!(bytes_quantity(512 << 20).0, "512Mi");
        assert_eq!(bytes_quantity(1000).0, "1000");
        assert_eq!(
            controller_endpoint("https://10.1.2.3:8443").unwrap(),
            ("10.1.2.3".parse().unwrap(), 8443)
        );
        assert_eq!(
            controller_endpoint("https://[fd00::1]").unwrap(),
            ("fd00::1".parse().unwrap(), 443)
        );
        assert!(controller_endpoint("https://controller.example:8443").is_err());
        assert!(controller_endpoint("http://10.1.2.3:80").is_err());
    }
}
