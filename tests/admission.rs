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
