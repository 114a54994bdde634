//! Unit tests of the runtime's pure parts (path translation, labels, id ranges).

use super::*;
use crate::agent::Invocation;

#[test]
fn paths_into_the_checkout_become_workspace() {
    let co = Path::new("/r/.git/cohort/runs/x/checkouts/0");
    assert_eq!(translate("/r/.git/cohort/runs/x/checkouts/0", co), "/workspace");
    assert_eq!(translate("/r/.git/cohort/runs/x/checkouts/0/a/b", co), "/workspace/a/b");
    assert_eq!(
        translate("/r/.git/cohort/runs/x/checkouts/01", co),
        "/r/.git/cohort/runs/x/checkouts/01"
    );
    assert_eq!(translate("-C", co), "-C");
}

#[test]
fn labels_from_the_spawn() {
    let spawn = Spawn {
        invocation: Invocation::default(),
        workdir: PathBuf::from("/w"),
        timeout: None,
        binds: Vec::new(),
        run_id: "r1".into(),
        task: 3,
        gateway_socket: None,
        role: Default::default(),
        caches: Vec::new(),
        tree: None,
        scratch: None,
    };
    let l = task_labels(&spawn);
    assert_eq!((l[LABEL_RUN].as_str(), l[LABEL_TASK].as_str()), ("r1", "003"));
    assert_eq!(l[LABEL_ROLE], "agent");
    let name = container_name(&spawn);
    assert!(
        name.starts_with("cohort-r1-003-") && name.len() == "cohort-r1-003-".len() + 8,
        "{name}"
    );
    let verify = Spawn {
        role: crate::runtime::Role::Verify,
        ..spawn
    };
    assert_eq!(task_labels(&verify)[LABEL_ROLE], "verify");
    let name = container_name(&verify);
    assert!(
        name.starts_with("cohort-r1-003-verify-") && name.len() == "cohort-r1-003-verify-".len() + 8,
        "{name}"
    );
    assert_eq!(parse_image_user("1000:1001"), Some((1000, 1001)));
}

#[test]
fn host_ids_from_podman_ranges() {
    let ranges = ["0:2147483647:1000", "1000:3000000000:24"];
    assert_eq!(host_id(ranges.into_iter(), 0), Some(2147483647));
    assert_eq!(host_id(ranges.into_iter(), 999), Some(2147484646));
    assert_eq!(host_id(ranges.into_iter(), 1000), Some(3000000000));
    assert_eq!(host_id(ranges.into_iter(), 1024), None);
    assert_eq!(host_id(["garbage"].into_iter(), 0), None);
    assert_eq!(parse_image_user("cohort"), None);
}

#[test]
fn home_from_the_image_env() {
    let env = serde_json::json!(["PATH=/usr/bin", "HOME=/home/cohort", "X=HOME=no"]);
    assert_eq!(image_env(&env, "HOME").as_deref(), Some("/home/cohort"));
    assert_eq!(image_env(&env, "USER"), None);
    assert_eq!(image_env(&serde_json::Value::Null, "HOME"), None);
}
