//! FirewallPolicy health as GitOps tools read it: Flux's kstatus and the
//! Argo CD health check we ship (deploy/argocd), by their real
//! implementations, on Argo CD-style test cases and on real objects whose
//! status went through the apiserver's status subresource.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams, PostParams};
use palisade::api::Condition;
use palisade::api::{FirewallPolicy, FirewallPolicyStatus, conditions};
use palisade::testenv::TestEnv;
use palisade::testenv::gitops::{argocd_health, kstatus};

const CRDS: &str = include_str!("../crds/palisade.dev.yaml");

fn health_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/argocd/palisade.dev/FirewallPolicy")
}

#[test]
fn argocd_health_test_cases_hold() {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Case {
        health_status: palisade::testenv::gitops::Verdict,
        input_path: String,
    }
    #[derive(serde::Deserialize)]
    struct Cases {
        tests: Vec<Case>,
    }
    let dir = health_dir();
    let cases: Cases =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("health_test.yaml")).unwrap())
            .unwrap();
    assert!(cases.tests.len() >= 5);
    for case in cases.tests {
        let object: serde_json::Value =
            serde_yaml::from_str(&std::fs::read_to_string(dir.join(&case.input_path)).unwrap())
                .unwrap();
        let got = argocd_health(&dir.join("health.lua"), &object).unwrap();
        assert_eq!(got, case.health_status, "{}", case.input_path);
    }
}

fn condition(type_: &str, status: bool, reason: &str, message: &str) -> Condition {
    Condition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: Some(Time(k8s_openapi::jiff::Timestamp::now())),
        observed_generation: None,
    }
}

/// Sets the status as the controller does and returns the object as the
/// apiserver serves it.
async fn with_status(
    api: &Api<FirewallPolicy>,
    name: &str,
    status: FirewallPolicyStatus,
) -> serde_json::Value {
    let patch = serde_json::json!({ "status": status });
    let obj = api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    serde_json::to_value(obj).unwrap()
}

fn verdicts(object: &serde_json::Value) -> (String, String) {
    let flux = kstatus(object).unwrap().status;
    let argo = argocd_health(&health_dir().join("health.lua"), object)
        .unwrap()
        .status;
    (flux, argo)
}

#[tokio::test]
async fn kstatus_and_argocd_read_real_status_alike() {
    let env = TestEnv::shared().unwrap();
    env.install_crds(CRDS).await.unwrap();
    let api = Api::<FirewallPolicy>::all(env.client().await.unwrap());
    let name = "gitops-health";
    let mut policy: FirewallPolicy =
        serde_yaml::from_str(include_str!("../deploy/examples/web-server.yaml")).unwrap();
    policy.metadata.name = Some(name.into());
    let created = api.create(&PostParams::default(), &policy).await.unwrap();
    let generation = created.metadata.generation.unwrap();
    let created = serde_json::to_value(created).unwrap();
    // Before the controller has written anything, the CRD's defaulted
    // status keeps both tools waiting (kstatus alone would say Current).
    assert_eq!(
        verdicts(&created),
        ("InProgress".into(), "Progressing".into())
    );
    let argo = argocd_health(&health_dir().join("health.lua"), &created).unwrap();
    assert_eq!(argo.message, palisade::api::PENDING_MESSAGE);
    // No made-up 1970 transition: the default conditions carry no time,
    // and `kubectl get fwp` reads Ready False, reason Pending.
    let defaulted = created["status"]["conditions"].as_array().unwrap();
    assert_eq!(defaulted.len(), 2, "{defaulted:?}");
    assert!(
        defaulted
            .iter()
            .all(|c| c.get("lastTransitionTime").is_none()),
        "{defaulted:?}"
    );
    let out = env
        .kubectl()
        .unwrap()
        .args(["get", "fwp", name])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    let row: Vec<&str> = table
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(row.get(1..3), Some(&["False", "Pending"][..]), "{table}");

    let reconciling = FirewallPolicyStatus {
        observed_generation: Some(generation),
        conditions: vec![
            condition(
                conditions::READY,
                false,
                conditions::reason::NODES_PENDING,
                "1 of 2 nodes applied",
            ),
            condition(
                conditions::RECONCILING,
                true,
                conditions::reason::NODES_PENDING,
                "1 of 2 nodes applied",
            ),
            condition(
                conditions::STALLED,
                false,
                conditions::reason::PROGRESSING,
                "",
            ),
        ],
        ..Default::default()
    };
    let obj = with_status(&api, name, reconciling).await;
    assert_eq!(verdicts(&obj), ("InProgress".into(), "Progressing".into()));

    let ready = FirewallPolicyStatus {
        observed_generation: Some(generation),
        conditions: vec![
            condition(
                conditions::READY,
                true,
                conditions::reason::SYNCED,
                "applied on both layers",
            ),
            condition(
                conditions::RECONCILING,
                false,
                conditions::reason::SYNCED,
                "",
            ),
            condition(conditions::STALLED, false, conditions::reason::SYNCED, ""),
        ],
        ..Default::default()
    };
    let obj = with_status(&api, name, ready.clone()).await;
    assert_eq!(verdicts(&obj), ("Current".into(), "Healthy".into()));

    // A spec change bumps the generation: both wait for the controller.
    let bump = serde_json::json!({"spec": {"mode": "Audit"}});
    let obj = api
        .patch(name, &PatchParams::default(), &Patch::Merge(&bump))
        .await
        .unwrap();
    assert_eq!(obj.metadata.generation, Some(generation + 1));
    assert_eq!(
        verdicts(&serde_json::to_value(obj).unwrap()),
        ("InProgress".into(), "Progressing".into())
    );

    let stalled = FirewallPolicyStatus {
        observed_generation: Some(generation + 1),
        conditions: vec![
            condition(
                conditions::READY,
                false,
                conditions::reason::QUOTA_EXCEEDED,
                "quota",
            ),
            condition(
                conditions::RECONCILING,
                false,
                conditions::reason::QUOTA_EXCEEDED,
                "",
            ),
            condition(
                conditions::STALLED,
                true,
                conditions::reason::QUOTA_EXCEEDED,
                "ingress needs 72 rules, 60 allowed",
            ),
        ],
        ..Default::default()
    };
    let obj = with_status(&api, name, stalled).await;
    assert_eq!(verdicts(&obj), ("Failed".into(), "Degraded".into()));
    api.delete(name, &Default::default()).await.unwrap();
}
