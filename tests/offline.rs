//! Offline checks that need no cluster: the committed CRDs match the Rust
//! types, every shipped example is valid, every manifest of the invalid
//! corpus is refused by `palisade validate` as it is by admission.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use palisade::cli;

fn yaml_files(dir: &str) -> Vec<PathBuf> {
    palisade::cli::expand_paths(&[Path::new(env!("CARGO_MANIFEST_DIR")).join(dir)]).unwrap()
}

#[test]
fn committed_crds_match_the_rust_types() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds/palisade.dev.yaml");
    let committed = std::fs::read_to_string(path).unwrap();
    let generated = palisade::api::crds_yaml().unwrap();
    assert!(
        committed == generated,
        "crds/palisade.dev.yaml is stale: run `make crds` and commit the result"
    );
}

#[test]
fn every_example_is_valid_offline() {
    let files = yaml_files("deploy/examples");
    assert!(files.len() >= 6, "examples missing: {files:?}");
    for file in files {
        for doc in cli::read_documents(&file).unwrap() {
            let problems = cli::check_policy(&doc.value);
            assert!(problems.is_empty(), "{}: {problems:?}", doc.origin);
        }
    }
}

#[test]
fn every_invalid_manifest_is_refused_offline() {
    let files = yaml_files("tests/fixtures/invalid");
    assert!(
        files.len() >= 30,
        "the invalid corpus must hold at least 30 manifests"
    );
    let mut accepted = Vec::new();
    for file in files {
        let docs = cli::read_documents(&file).unwrap();
        assert_eq!(docs.len(), 1, "{}: one manifest per file", file.display());
        if cli::check_policy(&docs[0].value).is_empty() {
            accepted.push(file.display().to_string());
        }
    }
    assert!(
        accepted.is_empty(),
        "accepted offline but invalid: {accepted:#?}"
    );
}

#[test]
fn unknown_fields_are_reported_with_their_path() {
    let doc: serde_json::Value = serde_yaml::from_str(
        "apiVersion: palisade.dev/v1alpha1\nkind: FirewallPolicy\nmetadata: {name: typo}\nspec:\n  policyTypes: [Ingress]\n  ingress:\n    - name: ssh\n      protocol: TCP\n      prots: [{port: 22}]\n      peers: [{cidr: 10.0.0.0/8}]\n",
    )
    .unwrap();
    let problems = cli::check_policy(&doc);
    assert_eq!(
        problems,
        vec!["spec.ingress[0].prots: unknown field".to_string()]
    );
}

#[test]
fn the_iam_policy_allows_every_ec2_action_the_controller_calls() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let source = std::fs::read_to_string(root.join("src/cloud/aws.rs")).unwrap();
    // Every EC2 call in the SDK glue is named by a `const ...: &str = "Action"`.
    let called: std::collections::BTreeSet<String> = source
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("const ")?
                .split_once(": &str = \"")?
                .1
                .strip_suffix("\";")
                .map(str::to_owned)
        })
        .collect();
    assert!(called.len() >= 10, "found only {called:?}");
    let policy: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/iam/controller-policy.json")).unwrap(),
    )
    .unwrap();
    let allowed: std::collections::BTreeSet<String> = policy["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| match &s["Action"] {
            serde_json::Value::String(a) => vec![a.clone()],
            serde_json::Value::Array(a) => {
                a.iter().map(|v| v.as_str().unwrap().to_owned()).collect()
            }
            _ => vec![],
        })
        .filter_map(|a| a.strip_prefix("ec2:").map(str::to_owned))
        .collect();
    let missing: Vec<_> = called.difference(&allowed).collect();
    assert!(
        missing.is_empty(),
        "deploy/iam/controller-policy.json lacks {missing:?}"
    );
    let unused: Vec<_> = allowed
        .difference(&called)
        .filter(|a| *a != "CreateTags")
        .collect();
    assert!(
        unused.is_empty(),
        "deploy/iam/controller-policy.json grants unused {unused:?}"
    );
}

#[test]
fn validate_walks_a_gitops_repository() {
    let repo = tempfile::tempdir().unwrap();
    let nested = repo.path().join("clusters/prod/palisade");
    std::fs::create_dir_all(&nested).unwrap();
    std::fs::create_dir_all(repo.path().join(".git")).unwrap();
    let web = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples/web-server.yaml"),
    )
    .unwrap();
    // A policy in a subdirectory, with a Deployment beside it in the same
    // file; a JSON policy with a duplicate rule; a file in .git (ignored).
    std::fs::write(
        nested.join("web.yaml"),
        format!("{web}---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: app}}\n"),
    )
    .unwrap();
    std::fs::write(
        repo.path().join("dup.json"),
        r#"{"apiVersion":"palisade.dev/v1alpha1","kind":"FirewallPolicy","metadata":{"name":"dup"},
            "spec":{"policyTypes":["Ingress"],"ingress":[
              {"name":"a","protocol":"TCP","ports":[{"port":80}],"peers":[{"cidr":"10.0.0.0/8"}]},
              {"name":"b","protocol":"TCP","ports":[{"port":80}],"peers":[{"cidr":"10.1.0.0/16"}]}]}}"#,
    )
    .unwrap();
    std::fs::write(repo.path().join(".git/broken.yaml"), "{{{").unwrap();
    let mut out = Vec::new();
    cli::validate_files(&[repo.path().to_path_buf()], &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("web.yaml#1 (web-server): OK"), "{text}");
    assert!(text.contains("dup.json#1 (dup): OK"), "{text}");
    assert!(text.contains("dup.json#1 (dup): warning:"), "{text}");
    assert!(
        text.contains(
            "2 valid, 0 invalid FirewallPolicy manifest(s); 0 file(s) unreadable or empty; 1 document(s) of other kinds skipped"
        ),
        "{text}"
    );
    // Nothing to check is an error, not a silent pass.
    let empty = tempfile::tempdir().unwrap();
    assert!(cli::validate_files(&[empty.path().to_path_buf()], &mut Vec::new()).is_err());
}

#[test]
fn render_summarises_flags_risks_and_refuses_an_unselected_node() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let node = dir.join("tests/fixtures/node-web-1.yaml");
    let settings = cli::AgentSettings::default();
    let mut out = Vec::new();
    cli::render_files(
        &node,
        &[dir.join("deploy/examples/web-server.yaml")],
        &settings,
        cli::OutputFormat::Summary,
        &mut out,
    )
    .unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.contains("Inbound (web-server): default deny"),
        "{text}"
    );
    assert!(text.contains("tcp/443"), "{text}");
    assert!(!text.contains("iptables-restore"), "summary only: {text}");
    let mut out = Vec::new();
    cli::render_files(
        &node,
        &[dir.join("deploy/examples/web-server.yaml")],
        &settings,
        cli::OutputFormat::Json,
        &mut out,
    )
    .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert!(json["openings"].as_array().unwrap().len() >= 3, "{json}");
    assert!(json["nodeLayer"]["ipv4"]["chains"].is_array(), "{json}");
    // egress-lockdown selects nodes labelled palisade.dev/egress only.
    let err = cli::render_files(
        &node,
        &[dir.join("deploy/examples/egress-lockdown.yaml")],
        &settings,
        cli::OutputFormat::Rules,
        &mut Vec::new(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("no policy given selects node"), "{err}");
}

/// `palisade validate` on a directory with a broken file, an empty one, a
/// comment-only one, a policy given twice, JSON (valid, with a port
/// written 5432.0, and invalid) and a Deployment, against golden output.
/// `UPDATE_GOLDEN=1` rewrites tests/golden/validate-dir.txt.
#[test]
fn validate_output_for_a_mixed_directory_matches_golden() {
    let mut out = Vec::new();
    let result = cli::validate_files(&[PathBuf::from("tests/fixtures/validate-dir")], &mut out);
    let text = String::from_utf8(out).unwrap() + &format!("error: {}\n", result.unwrap_err());
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/validate-dir.txt");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden, &text).unwrap();
    }
    let want = std::fs::read_to_string(&golden).unwrap();
    pretty_assertions::assert_eq!(want, text);
}

#[test]
fn render_shows_the_node_layer_and_the_numbers_when_the_cloud_plan_fails() {
    let dir = tempfile::tempdir().unwrap();
    let peers = |base: u8| {
        (0..40)
            .map(|i| format!("{{cidr: 10.{base}.{i}.0/24}}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let policy = dir.path().join("big.yaml");
    std::fs::write(
        &policy,
        format!(
            "apiVersion: palisade.dev/v1alpha1\nkind: FirewallPolicy\nmetadata: {{name: big}}\nspec:\n  policyTypes: [Ingress]\n  ingress:\n    - {{name: a, protocol: TCP, ports: [{{port: 443}}], peers: [{}]}}\n    - {{name: b, protocol: TCP, ports: [{{port: 443}}], peers: [{}]}}\n",
            peers(1),
            peers(2)
        ),
    )
    .unwrap();
    let node = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/node-web-1.yaml");
    for format in [
        cli::OutputFormat::Rules,
        cli::OutputFormat::Summary,
        cli::OutputFormat::Json,
    ] {
        let mut out = Vec::new();
        let err = cli::render_files(
            &node,
            std::slice::from_ref(&policy),
            &cli::AgentSettings::default(),
            format,
            &mut out,
        )
        .unwrap_err()
        .to_string();
        let text = String::from_utf8(out).unwrap();
        assert!(
            err.contains("needs 80 IPv4 Security Group rules, over the quota of 60"),
            "{err}"
        );
        if format == cli::OutputFormat::Rules {
            assert!(
                text.contains("# policy big: the cloud plan cannot be applied"),
                "{text}"
            );
            assert!(text.contains("## Node layer:"), "{text}");
            assert!(
                text.contains("10.2.39.0/24"),
                "the node layer lists every peer: {text}"
            );
        } else if format == cli::OutputFormat::Json {
            // The whole document all the same, the failure in it.
            let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
            let failure = doc["cloud"][0]["Err"].as_str().unwrap_or_default();
            assert!(failure.contains("over the quota of 60"), "{text}");
            assert!(doc["nodeLayer"].is_object(), "{text}");
        } else {
            assert!(text.contains("CLOUD PLAN FAILS"), "{text}");
        }
    }
}

/// Documents are read as kubectl reads them: YAML 1.1 booleans (a plain
/// `yes`; a quoted one stays a string), merge keys, the last of duplicate
/// keys, a `v1` List's items with their own origins.
#[test]
fn documents_are_read_as_kubectl_reads_them() {
    let text = "base: &b {x: 1, y: 2}\nm:\n  <<: *b\n  y: 3\nplain: yes\nquoted: \"yes\"\nk: 1\nk: 2\n---\n---\napiVersion: v1\nkind: List\nitems: [{a: 1}, {b: 2}]\n";
    let docs = cli::parse_documents(text, Path::new("f.yaml")).unwrap();
    assert_eq!(docs.len(), 3);
    let first = &docs[0].value;
    assert_eq!(first["m"], serde_json::json!({"x": 1, "y": 3}));
    assert_eq!(first["plain"], serde_json::json!(true));
    assert_eq!(first["quoted"], serde_json::json!("yes"));
    assert_eq!(first["k"], serde_json::json!(2));
    assert_eq!(docs[1].origin, "f.yaml#3 items[0]");
    assert_eq!(docs[2].value, serde_json::json!({"b": 2}));
    let err = cli::parse_documents("a: [", Path::new("g.yaml"))
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("g.yaml: not YAML or JSON:"), "{err}");
}

/// No message of `validate` over the invalid and differential corpora
/// suggests wider access than what was written: no "anywhere" network,
/// no "omit ports" or "leave icmp out" as a fix.
#[test]
fn suggestions_never_widen_access() {
    let widening =
        regex::Regex::new(r"(^|[^0-9.:a-f])(0\.0\.0\.0/0|::/0)|every port|every type|with Exists")
            .unwrap();
    let mut wide = Vec::new();
    for dir in ["tests/fixtures/invalid", "tests/fixtures/differential"] {
        for file in yaml_files(dir) {
            let text = std::fs::read_to_string(&file).unwrap();
            let Ok(docs) = cli::parse_documents(&text, &file) else {
                continue;
            };
            for doc in docs {
                for p in cli::check_policy(&doc.value) {
                    // Only the advice: what follows the value as written.
                    let advice = p.split_once("; ").map_or("", |(_, fix)| fix);
                    if widening.is_match(advice) {
                        wide.push(format!("{}: {p}", doc.origin));
                    }
                }
            }
        }
    }
    assert!(wide.is_empty(), "{wide:#?}");
}
