//! Admission against a real kube-apiserver: the CRDs install and become
//! Established, every example is accepted, and every manifest of the invalid
//! corpus is refused with the message its `# expect:` line names.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use kube::api::{Api, DeleteParams, DynamicObject, PostParams};
use kube::core::ApiResource;
use palisade::api::FirewallPolicy;
use palisade::testenv::TestEnv;

const CRDS: &str = include_str!("../crds/palisade.dev.yaml");

fn yaml_files(dir: &str) -> Vec<PathBuf> {
    palisade::cli::expand_paths(&[Path::new(env!("CARGO_MANIFEST_DIR")).join(dir)]).unwrap()
}

async fn policies() -> Api<DynamicObject> {
    let env = TestEnv::shared().unwrap();
    let client = env.client().await.unwrap();
    env.install_crds(CRDS).await.unwrap();
    Api::all_with(client, &ApiResource::erase::<FirewallPolicy>(&()))
}

fn object(value: &serde_json::Value) -> DynamicObject {
    serde_json::from_value(value.clone()).unwrap()
}

#[tokio::test]
async fn every_example_is_accepted() {
    let api = policies().await;
    for file in yaml_files("deploy/examples") {
        for doc in palisade::cli::read_documents(&file).unwrap() {
            let created = api
                .create(&PostParams::default(), &object(&doc.value))
                .await
                .unwrap_or_else(|e| panic!("{} refused: {e}", doc.origin));
            let name = created.metadata.name.unwrap();
            api.delete(&name, &DeleteParams::default()).await.unwrap();
        }
    }
}

#[tokio::test]
async fn every_invalid_manifest_is_refused_with_its_message() {
    let api = policies().await;
    let files = yaml_files("tests/fixtures/invalid");
    assert!(
        files.len() >= 30,
        "the corpus must hold at least 30 manifests"
    );
    let mut wrong = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let expect = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{}: no `# expect:` line", file.display()));
        let doc = &palisade::cli::read_documents(file).unwrap()[0];
        match api
            .create(&PostParams::default(), &object(&doc.value))
            .await
        {
            Ok(_) => wrong.push(format!("{}: accepted", file.display())),
            Err(kube::Error::Api(status))
                if status.code == 422 && status.message.contains(expect) => {}
            Err(e) => wrong.push(format!("{}: want {expect:?}, got {e}", file.display())),
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} wrong:\n{}",
        wrong.len(),
        files.len(),
        wrong.join("\n")
    );
}

/// `kubectl <args> -f -` with `yaml` on stdin: (success, stdout + stderr).
fn kubectl(args: &[&str], yaml: &str) -> (bool, String) {
    use std::io::Write as _;
    let env = TestEnv::shared().unwrap();
    let mut child = env
        .kubectl()
        .unwrap()
        .args(args)
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn manifest(name: &str, types: &str, rules: &str) -> String {
    format!(
        "apiVersion: palisade.dev/v1alpha1\nkind: FirewallPolicy\nmetadata:\n  name: {name}\nspec:\n  policyTypes: [{types}]\n{rules}"
    )
}

async fn egress_rules(name: &str) -> Option<Vec<String>> {
    let env = TestEnv::shared().unwrap();
    let api: Api<FirewallPolicy> = Api::all(env.client().await.unwrap());
    let p = api.get(name).await.unwrap();
    let valid = palisade::policy::validate(&p).unwrap();
    valid
        .rules(palisade::policy::Direction::Egress)
        .map(|r| r.iter().map(|r| r.name.clone()).collect())
}

#[tokio::test]
async fn deny_all_survives_server_side_apply_and_a_second_field_manager() {
    policies().await;
    let name = "ssa-egress";
    let ssa = |manager: &str| {
        vec![
            "apply".to_string(),
            "--server-side".into(),
            "--force-conflicts".into(),
            format!("--field-manager={manager}"),
        ]
    };
    let run = |manager: &str, yaml: &str| {
        let args = ssa(manager);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, out) = kubectl(&args, yaml);
        assert!(ok, "{manager}: {out}\n{yaml}");
    };
    let rule = |r: &str| {
        format!(
            "  egress:\n    - {{name: {r}, protocol: TCP, ports: [{{port: 443}}], peers: [{{cidr: 192.0.2.0/24}}]}}\n"
        )
    };
    // The GitOps manager opens egress, then moves it to deny-all by
    // dropping its rules: server-side apply removes the list it owned, and
    // policyTypes keeps the direction governed.
    run("gitops", &manifest(name, "Egress", &rule("mirror")));
    assert_eq!(egress_rules(name).await, Some(vec!["mirror".to_string()]));
    run("gitops", &manifest(name, "Egress", ""));
    assert_eq!(egress_rules(name).await, Some(vec![]), "deny-all");
    // A second manager opens it again with its own rule, and back.
    run("hotfix", &manifest(name, "Egress", &rule("hotfix")));
    assert_eq!(egress_rules(name).await, Some(vec!["hotfix".to_string()]));
    run("hotfix", &manifest(name, "Egress", ""));
    assert_eq!(egress_rules(name).await, Some(vec![]), "deny-all again");
    // The first manager still owns Egress in policyTypes: still governed.
    run("hotfix", &manifest(name, "Ingress", ""));
    assert_eq!(egress_rules(name).await, Some(vec![]), "both own Egress");
    let (ok, out) = kubectl(&["delete"], &manifest(name, "Egress", ""));
    assert!(ok, "{out}");
}

#[tokio::test]
async fn null_or_empty_label_values_are_refused_on_every_write_path() {
    policies().await;
    for (i, selector) in [
        "  nodeSelector:\n    matchLabels:\n      role:\n",
        "  nodeSelector:\n    matchLabels:\n      role: \"\"\n",
        "  nodeSelector:\n    matchLabels: {}\n",
        "  nodeSelector:\n    matchExpressions:\n      - {key: role, operator: In, values: [\"\"]}\n",
    ]
    .iter()
    .enumerate()
    {
        let yaml = manifest(&format!("null-label-{i}"), "Ingress", selector);
        for args in [
            vec!["create"],
            vec!["apply"],
            vec!["apply", "--server-side", "--field-manager=gitops"],
        ] {
            let (ok, out) = kubectl(&args, &yaml);
            assert!(!ok, "kubectl {args:?} accepted:\n{yaml}\n{out}");
            assert!(
                out.contains("at least 1 chars long")
                    || out.contains("at least 1 properties")
                    // Server-side apply keeps the null and refuses its type.
                    || out.contains("must be of type string: \"null\""),
                "kubectl {args:?}: {out}"
            );
        }
        // `palisade validate` refuses it too.
        let value: serde_json::Value = serde_yaml::from_str(&yaml).unwrap();
        assert!(
            !palisade::cli::check_policy(&value).is_empty(),
            "validate accepted {yaml}"
        );
    }
}
