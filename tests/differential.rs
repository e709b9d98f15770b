//! One verdict everywhere: every case is judged by the real apiserver
//! (`kubectl apply --dry-run=server`, client-side and server-side apply),
//! by `palisade validate`, and — for what the apiserver admits, as it
//! would store it — by the compiler. Any disagreement fails the test and
//! prints the case.
//!
//! Cases: the shipped examples, the invalid corpus (tests/fixtures/invalid),
//! the differential corpus (tests/fixtures/differential, valid and invalid
//! files of every class the three judges used to disagree on), and a seeded
//! mutation fuzz of the valid ones (`PALISADE_FUZZ_CASES`, default 1200;
//! `PALISADE_FUZZ_SEED`, default fixed so a failure reproduces).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use palisade::api::FirewallPolicy;
use palisade::cli;
use palisade::testenv::TestEnv;
use serde_json::{Value, json};

const CRDS: &str = include_str!("../crds/palisade.dev.yaml");
/// Files per kubectl call: large enough to keep the run short, small
/// enough that one call's output stays readable.
const BATCH: usize = 250;

/// One input file.
#[derive(Clone)]
struct Case {
    /// Unique file name (`<source>-<n>.yaml` or `.json`).
    file: String,
    /// The file's text, exactly as every judge reads it.
    text: String,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn corpus(dir: &str, prefix: &str) -> Vec<Case> {
    cli::expand_paths(&[root().join(dir)])
        .unwrap()
        .into_iter()
        .map(|p| {
            let ext = p.extension().unwrap().to_string_lossy().to_string();
            let stem = p.file_stem().unwrap().to_string_lossy().to_string();
            Case {
                file: format!("{prefix}-{stem}.{ext}"),
                text: std::fs::read_to_string(&p).unwrap(),
            }
        })
        .collect()
}

/// `palisade validate`'s verdict on a file: valid when it parses, holds
/// at least one document, and every document passes.
fn validate_verdict(case: &Case) -> (bool, String) {
    match cli::parse_documents(&case.text, Path::new(&case.file)) {
        Err(e) => (false, e.to_string()),
        Ok(docs) if docs.is_empty() => (false, "no document".into()),
        Ok(docs) => {
            let problems: Vec<String> = docs
                .iter()
                .flat_map(|d| {
                    cli::check_policy(&d.value)
                        .into_iter()
                        .map(|p| format!("{}: {p}", d.origin))
                })
                .collect();
            (problems.is_empty(), problems.join("\n"))
        }
    }
}

/// The metadata.name of every document of the case, as far as they parse.
fn names(case: &Case) -> Vec<String> {
    cli::parse_documents(&case.text, Path::new(&case.file))
        .map(|docs| {
            docs.iter()
                .filter_map(|d| {
                    d.value
                        .pointer("/metadata/name")?
                        .as_str()
                        .map(String::from)
                })
                .collect()
        })
        .unwrap_or_default()
}

fn kubectl(args: &[&str]) -> (String, String) {
    let out = TestEnv::shared()
        .unwrap()
        .kubectl()
        .unwrap()
        .args(args)
        .output()
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The apiserver's verdict on every case of one batch directory, through
/// `kubectl apply` (client-side, or server-side with `ssa`): a case is
/// refused when an error names its file or one of its objects, admitted
/// when every object it holds is reported applied.
fn server_verdicts(dir: &Path, cases: &[Case], ssa: bool) -> BTreeMap<String, (bool, String)> {
    let d = dir.display().to_string();
    let mut args = vec!["apply", "--dry-run=server", "-o", "name", "-f", &d];
    if ssa {
        args.insert(1, "--server-side");
    }
    let (stdout, stderr) = kubectl(&args);
    // One error per line; kubectl prints client-side errors as one
    // bracketed, comma-joined line, and server-side apply continues an
    // error on indented lines.
    let mut errors: Vec<String> = Vec::new();
    for line in stderr.lines() {
        match errors.last_mut() {
            Some(last)
                if !line.starts_with(['E', 'e', '['])
                    || line.starts_with("error validating data") =>
            {
                last.push('\n');
                last.push_str(line);
            }
            _ => errors.push(line.to_string()),
        }
    }
    let applied: BTreeSet<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("firewallpolicy.palisade.dev/"))
        .collect();
    let mut verdicts = BTreeMap::new();
    let mut attributed = vec![false; errors.len()];
    for case in cases {
        let path = dir.join(&case.file).display().to_string();
        let names = names(case);
        let mut mine = Vec::new();
        for (i, line) in errors.iter().enumerate() {
            let by_file =
                line.contains(&format!("\"{path}\"")) || line.contains(&format!("{path}:"));
            let by_name = names.iter().any(|n| {
                line.contains(&format!("FirewallPolicy.palisade.dev \"{n}\" is invalid"))
                    || line.contains(&format!("The FirewallPolicy \"{n}\" is invalid"))
                    || line.contains(&format!("(/{n};"))
            });
            if by_file || by_name {
                attributed[i] = true;
                mine.push(line.clone());
            }
        }
        let verdict = if !mine.is_empty() {
            (false, mine.join("\n"))
        } else if !names.is_empty() && names.iter().all(|n| applied.contains(n.as_str())) {
            (true, String::new())
        } else {
            (
                false,
                format!("no verdict found for {path} (names {names:?})\n{stderr}"),
            )
        };
        verdicts.insert(case.file.clone(), verdict);
    }
    let stray: Vec<&str> = errors
        .iter()
        .zip(&attributed)
        // An object with no name has no file in its error; its case (with
        // no name either) is refused below for want of a verdict.
        .filter(|(l, a)| !**a && !l.trim().is_empty() && !l.contains("Name: \"\""))
        .map(|(l, _)| l.as_str())
        .collect();
    if !stray.is_empty() {
        verdicts.insert(
            format!("<stray errors of {}>", dir.display()),
            (false, stray.join("\n")),
        );
    }
    verdicts
}

/// The compiler's verdict on every object the apiserver admitted, as it
/// would store it (defaults applied, `80.0` stored as 80): `Err` names the
/// objects it refuses.
/// Also compares each stored spec with the spec `palisade validate` read
/// from the same file (`read`, by name): the same verdict on a different
/// value (a port `010` read as 10 instead of octal 8) is a disagreement too.
fn compiler_verdicts(
    dir: &Path,
    read: &BTreeMap<String, palisade::api::FirewallPolicySpec>,
) -> BTreeMap<String, String> {
    let d = dir.display().to_string();
    let (stdout, stderr) = kubectl(&["apply", "--dry-run=server", "-o", "json", "-f", &d]);
    let list: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("kubectl -o json: {e}\n{stderr}\n{stdout}"));
    let items = match list.get("items") {
        Some(items) => items.as_array().unwrap().clone(),
        None => vec![list.clone()],
    };
    let mut refused = BTreeMap::new();
    for item in items {
        let name = item["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let policy: FirewallPolicy = match serde_json::from_value(item.clone()) {
            Ok(p) => p,
            Err(e) => {
                refused.insert(name, format!("the controller cannot decode it: {e}"));
                continue;
            }
        };
        if read.get(&name) != Some(&policy.spec) {
            refused.insert(
                name,
                format!(
                    "validate read another spec:\nvalidate: {:?}\napiserver: {:?}",
                    read.get(
                        &item["metadata"]["name"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string()
                    ),
                    policy.spec
                ),
            );
            continue;
        }
        match palisade::policy::compile_policy(&policy, &palisade::policy::Facts::default()) {
            Err(e) if e.reason() == "InvalidPolicy" => {
                refused.insert(name, e.to_string());
            }
            _ => {}
        }
    }
    refused
}

/// Writes `cases` into batch directories under `dir` with no policy name
/// twice in one batch (a dry run cannot tell two objects of one name apart).
fn batches(dir: &Path, cases: &[Case]) -> Vec<(PathBuf, Vec<Case>)> {
    let mut out: Vec<(BTreeSet<String>, Vec<Case>)> = Vec::new();
    for case in cases {
        let names: BTreeSet<String> = names(case).into_iter().collect();
        let slot = out
            .iter()
            .position(|(used, batch)| batch.len() < BATCH && used.is_disjoint(&names));
        let slot = slot.unwrap_or_else(|| {
            out.push((BTreeSet::new(), Vec::new()));
            out.len() - 1
        });
        out[slot].0.extend(names);
        out[slot].1.push(case.clone());
    }
    out.into_iter()
        .enumerate()
        .map(|(i, (_, batch))| {
            let d = dir.join(format!("batch-{i}"));
            std::fs::create_dir_all(&d).unwrap();
            for case in &batch {
                std::fs::write(d.join(&case.file), &case.text).unwrap();
            }
            (d, batch)
        })
        .collect()
}

/// Runs every case through the three judges; returns the disagreements.
/// `verdicts` holds `palisade validate`'s verdict on each case, by file.
fn judge(cases: &[Case], verdicts: &BTreeMap<String, (bool, String)>) -> Vec<String> {
    let tmp = tempfile::tempdir().unwrap();
    let mut disagreements = Vec::new();
    for (dir, batch) in batches(tmp.path(), cases) {
        let csa = server_verdicts(&dir, &batch, false);
        let ssa = server_verdicts(&dir, &batch, true);
        for verdicts in [&csa, &ssa] {
            for (key, (_, why)) in verdicts.range("<".to_string()..) {
                if key.starts_with("<stray") {
                    disagreements.push(format!("--- kubectl errors matching no case: {why}"));
                }
            }
        }
        let admitted = dir.join("admitted");
        std::fs::create_dir_all(&admitted).unwrap();
        let mut any = false;
        for case in &batch {
            let (ok, why) = verdicts[&case.file].clone();
            let (c_ok, c_why) = &csa[&case.file];
            let (s_ok, s_why) = &ssa[&case.file];
            if ok != *c_ok || ok != *s_ok {
                disagreements.push(format!(
                    "--- {}: validate {}, kubectl apply {}, kubectl apply --server-side {}\nvalidate: {why}\napply: {c_why}\napply --server-side: {s_why}\n{}",
                    case.file,
                    verdict(ok),
                    verdict(*c_ok),
                    verdict(*s_ok),
                    case.text
                ));
            }
            if *c_ok {
                std::fs::write(admitted.join(&case.file), &case.text).unwrap();
                any = true;
            }
        }
        if any {
            let read: BTreeMap<String, palisade::api::FirewallPolicySpec> = batch
                .iter()
                .filter(|c| verdicts[&c.file].0)
                .flat_map(|c| cli::parse_documents(&c.text, Path::new(&c.file)).unwrap())
                .filter_map(|d| palisade::policy::admission::admit(&d.value).ok())
                .map(|p| (p.metadata.name.clone().unwrap_or_default(), p.spec))
                .collect();
            for (name, why) in compiler_verdicts(&admitted, &read) {
                let case = batch.iter().find(|c| names(c).contains(&name));
                disagreements.push(format!(
                    "--- {}: admitted, but the compiler refuses {name}, or validate read it otherwise: {why}\n{}",
                    case.map_or("?", |c| c.file.as_str()),
                    case.map_or("", |c| c.text.as_str())
                ));
            }
        }
    }
    disagreements
}

fn verdict(ok: bool) -> &'static str {
    if ok { "accepts" } else { "refuses" }
}

// ---------------------------------------------------------------- fuzz --

/// Values a mutation writes, by the name of the field it lands on.
fn pool(field: &str) -> Vec<Value> {
    let long = |c: &str, n: usize| Value::String(c.repeat(n));
    let mut strings: Vec<Value> = match field {
        "cidr" => [
            "10.0.0.0/8",
            "10.0.0.1/8",
            "10.0.0.0/0",
            "0.0.0.0/0",
            "::/0",
            "2001:db8::/32",
            "2001:DB8::/32",
            "2001:0db8::/32",
            "2001:db8:0:0:0:0:0:0/32",
            "2001:db8::1/32",
            "::ffff:10.0.0.0/104",
            "::ffff:0:0/96",
            "::1.2.3.4/128",
            "::102:304/128",
            "010.0.0.0/8",
            "10.0.0.0/08",
            "10.0.0.0",
            "10.0.0.0/33",
            "fe80::/10",
            "fe80::%eth0/64",
            "2001:db8:0:0:1:0:0:0/80",
            "2001:db8::1:0:0:0/80",
            "1:0:0:1:0:0:0:0/128",
            "1::1:0:0:0/128",
            " 10.0.0.0/8",
            "10.0.0.0/8 ",
        ]
        .map(Value::from)
        .to_vec(),
        "key" | "matchLabels" => [
            "role",
            "node-role.kubernetes.io/worker",
            "example.com/a_b.c",
            "a b",
            "a/b/c",
            "/a",
            "a/",
            "Example.com/a",
            "-a",
            "a-",
            "a..b/c",
            "",
            "_a",
            "a_",
            "kubernetes.io/",
        ]
        .map(Value::from)
        .into_iter()
        .chain([
            long("a", 63),
            long("a", 64),
            Value::String(format!("{}/a", "b".repeat(253))),
            Value::String(format!("{}/a", "b".repeat(254))),
        ])
        .collect(),
        "description" => [
            "ssh from bastion",
            "café",
            "<script>",
            "a\tb",
            "[ok] {x} $*",
            "",
        ]
        .map(Value::from)
        .into_iter()
        .chain([long("d", 200), long("d", 201), long("é", 200)])
        .collect(),
        "tags" | "tagValue" => [
            "owner",
            "aws:x",
            "AWS:x",
            "palisade.dev/x",
            "",
            "é",
            "a b <c>",
        ]
        .map(Value::from)
        .into_iter()
        .chain([
            long("é", 128),
            long("é", 129),
            long("v", 256),
            long("é", 256),
            long("v", 257),
        ])
        .collect(),
        "name" => [
            "web",
            "Web",
            "w_b",
            "-web",
            "web-",
            "sg-web",
            "café",
            "a b",
            "my group (prod)",
            "",
        ]
        .map(Value::from)
        .into_iter()
        .chain([long("n", 63), long("n", 64), long("n", 255), long("n", 256)])
        .collect(),
        "securityGroupId" | "id" | "prefixListId" | "vpcId" => [
            "sg-0123456789abcdef0",
            "sg-01234567",
            "sg-0123456789ABCDEF0",
            "pl-12345678",
            "vpc-0123456789abcdef0",
            "sg-xyz",
            "",
        ]
        .map(Value::from)
        .to_vec(),
        _ => [
            "TCP",
            "UDP",
            "ICMP",
            "ICMPv6",
            "All",
            "tcp",
            "Ingress",
            "Egress",
            "Cloud",
            "Node",
            "Audit",
            "Enforce",
            "Keep",
            "Cut",
            "Second",
            "Minute",
            "Hour",
            "In",
            "NotIn",
            "Exists",
            "DoesNotExist",
            "Delete",
            "Retain",
            "80",
            "yes",
            "",
        ]
        .map(Value::from)
        .to_vec(),
    };
    strings.extend([
        json!(0),
        json!(1),
        json!(22),
        json!(80),
        json!(80.0),
        json!(80.5),
        json!(254),
        json!(255),
        json!(256),
        json!(65535),
        json!(65536),
        json!(-1),
        json!(10000),
        json!(10001),
        json!(1e3),
        json!(true),
        json!(false),
        json!([]),
        json!({}),
        json!(["Ingress"]),
        json!([{"port": 80}]),
        json!({"matchLabels": {"role": "web"}}),
    ]);
    strings
}

/// Every path (as JSON pointer tokens) inside `value`.
fn paths(value: &Value, at: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                at.push(k.clone());
                out.push(at.clone());
                paths(v, at, out);
                at.pop();
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                at.push(i.to_string());
                out.push(at.clone());
                paths(v, at, out);
                at.pop();
            }
        }
        _ => {}
    }
}

fn pointer(path: &[String]) -> String {
    path.iter()
        .map(|t| format!("/{}", t.replace('~', "~0").replace('/', "~1")))
        .collect()
}

/// One mutation of `base`, decided by `rng`.
fn mutate(base: &Value, rng: &mut fastrand::Rng) -> Value {
    let mut doc = base.clone();
    let mut all = Vec::new();
    paths(&doc["spec"], &mut vec!["spec".to_string()], &mut all);
    all.push(vec!["metadata".into(), "name".into()]);
    all.push(vec!["metadata".into(), "labels".into()]);
    for _ in 0..rng.usize(1..=2) {
        let path = &all[rng.usize(..all.len())];
        let (parent, last) = path.split_at(path.len() - 1);
        let field = parent
            .iter()
            .rev()
            .chain(last)
            .rev()
            .find(|t| t.parse::<usize>().is_err())
            .cloned()
            .unwrap_or_default();
        let Some(target) = doc.pointer_mut(&pointer(parent)) else {
            continue;
        };
        let values = pool(&field);
        match (rng.u8(..10), target) {
            // Replace the value.
            (0..=5, Value::Object(map)) => {
                map.insert(last[0].clone(), values[rng.usize(..values.len())].clone());
            }
            (0..=5, Value::Array(items)) => {
                if let Ok(i) = last[0].parse::<usize>()
                    && i < items.len()
                {
                    items[i] = values[rng.usize(..values.len())].clone();
                }
            }
            // Drop the field.
            (6, Value::Object(map)) => {
                map.remove(&last[0]);
            }
            // An unknown field beside it, or a new map key.
            (7, Value::Object(map)) => {
                let key = pool(if field == "matchLabels" || field == "tags" {
                    "key"
                } else {
                    "x"
                });
                if let Some(Value::String(k)) = key.get(rng.usize(..key.len())) {
                    map.insert(k.clone(), Value::from("v"));
                }
                map.insert(format!("{}x", last[0]), Value::from(1));
            }
            // A list entry twice.
            (8, Value::Array(items)) => {
                if let Some(first) = items.first().cloned() {
                    items.push(first);
                }
            }
            // A map key of the same object replaced by a tricky one.
            (9, Value::Object(map)) if field == "matchLabels" || field == "tags" => {
                let keys = pool("key");
                if let Some(v) = map.remove(&last[0])
                    && let Some(Value::String(k)) = keys.get(rng.usize(..keys.len()))
                {
                    map.insert(k.clone(), v);
                }
            }
            _ => {}
        }
    }
    doc
}

/// `n` mutations of the valid `bases`, each written as YAML, JSON, or a
/// `kind: List`.
fn fuzz(bases: &[Value], n: usize, seed: u64) -> Vec<Case> {
    (0..n)
        .map(|i| {
            let mut rng = fastrand::Rng::with_seed(seed.wrapping_add(i as u64));
            let mut doc = bases[rng.usize(..bases.len())].clone();
            doc["metadata"]["name"] = Value::from(format!("fz-{i}"));
            let doc = mutate(&doc, &mut rng);
            match rng.u8(..10) {
                0..=6 => Case {
                    file: format!("fuzz-{i}.yaml"),
                    text: serde_yaml::to_string(&doc).unwrap(),
                },
                7..=8 => Case {
                    file: format!("fuzz-{i}.json"),
                    text: serde_json::to_string_pretty(&doc).unwrap(),
                },
                _ => Case {
                    file: format!("fuzz-{i}.yaml"),
                    text: serde_yaml::to_string(
                        &json!({"apiVersion": "v1", "kind": "List", "items": [doc]}),
                    )
                    .unwrap(),
                },
            }
        })
        .collect()
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test]
async fn apiserver_validate_and_compiler_agree_on_every_case() {
    let env = TestEnv::shared().unwrap();
    env.install_crds(CRDS).await.unwrap();
    let examples = corpus("deploy/examples", "example");
    let invalid = corpus("tests/fixtures/invalid", "invalid");
    let differential = corpus("tests/fixtures/differential", "diff");
    assert!(
        differential.len() >= 100,
        "the differential corpus must hold at least 100 cases"
    );
    // The bases of the fuzz: every valid single-policy document.
    let bases: Vec<Value> = examples
        .iter()
        .chain(&differential)
        .filter(|c| validate_verdict(c).0)
        .flat_map(|c| cli::parse_documents(&c.text, Path::new(&c.file)).unwrap())
        .map(|d| d.value)
        .filter(|v| v["kind"] == "FirewallPolicy")
        .collect();
    assert!(bases.len() >= 20, "too few valid bases: {}", bases.len());
    let n = env_number("PALISADE_FUZZ_CASES", 1200) as usize;
    let seed = env_number("PALISADE_FUZZ_SEED", 0x9a11_5ade);
    let fuzzed = fuzz(&bases, n, seed);
    let mut cases = Vec::new();
    cases.extend(examples.iter().cloned());
    cases.extend(invalid.iter().cloned());
    cases.extend(differential.iter().cloned());
    cases.extend(fuzzed.iter().cloned());
    let started = std::time::Instant::now();
    let verdicts: BTreeMap<String, (bool, String)> = cases
        .iter()
        .map(|c| (c.file.clone(), validate_verdict(c)))
        .collect();
    assert_eq!(
        verdicts.len(),
        cases.len(),
        "case file names must be unique"
    );
    let disagreements = judge(&cases, &verdicts);
    let (valid, refused): (Vec<&Case>, Vec<&Case>) =
        cases.iter().partition(|c| verdicts[&c.file].0);
    eprintln!(
        "differential: {} cases ({} examples, {} invalid corpus, {} differential corpus, {} fuzz, seed {seed:#x}): {} accepted, {} refused; {} disagreement(s) in {:.1}s",
        cases.len(),
        examples.len(),
        invalid.len(),
        differential.len(),
        fuzzed.len(),
        valid.len(),
        refused.len(),
        disagreements.len(),
        started.elapsed().as_secs_f64()
    );
    // The fuzz must exercise both verdicts, or it proves nothing.
    let fuzz_ok = fuzzed.iter().filter(|c| verdicts[&c.file].0).count();
    assert!(
        fuzz_ok > n / 10 && fuzz_ok < n * 9 / 10,
        "fuzz accepted {fuzz_ok} of {n}"
    );
    assert!(
        disagreements.is_empty(),
        "{} disagreement(s):\n{}",
        disagreements.len(),
        disagreements.join("\n")
    );
}
