//! The offline CLI's commands, as library functions so they are tested
//! without spawning the binary.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::api::FirewallPolicy;

pub mod explain;
pub mod live;
pub mod plan;
mod render;
mod summary;
pub use live::NodeSettings;
pub use render::{AgentSettings, OutputFormat, render_files};
pub use summary::{Opening, Risk, openings, risks, summary_text};

/// What can go wrong in an offline command.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file that is not YAML (or JSON).
    #[error("{path}: not YAML or JSON: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (with line and column).
        source: serde_yaml::Error,
    },
    /// YAML that could not be written.
    #[error("{0}")]
    Yaml(#[from] serde_yaml::Error),
    /// Writing the output failed.
    #[error("writing output: {0}")]
    Write(#[from] std::io::Error),
    /// Some inputs are invalid; each was reported on the output.
    #[error("{0} invalid input(s)")]
    Invalid(usize),
    /// `render` could not compile what it was given.
    #[error("{0}")]
    Render(String),
    /// Reading the live cluster failed.
    #[error("{0}")]
    Live(String),
    /// An EC2 read failed.
    #[error(transparent)]
    Cloud(#[from] crate::cloud::CloudError),
    /// JSON output failed.
    #[error("writing JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// `palisade plan`: reads `files`, the live state they touch, and writes
/// the plan (as text, or JSON when `json`). Reads only.
pub async fn plan_live<E: crate::cloud::Ec2>(
    client: &kube::Client,
    ec2: &E,
    files: &[PathBuf],
    settings: &plan::PlanSettings,
    json: bool,
    out: &mut impl Write,
) -> Result<plan::PlanOutcome, Error> {
    let manifests = plan::read_manifests(files, out)?;
    let live = plan::read_for(client, ec2, &manifests).await?;
    let p = plan::plan(&live, &manifests, settings)?;
    if json {
        let doc = serde_json::json!({ "plan": p, "outcome": p.outcome() });
        writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
    } else {
        plan::write_text(&p, out)?;
    }
    Ok(p.outcome())
}

/// `palisade explain`: reads the live state of `q.node` and writes the
/// answer (as text, or JSON when `json`). Returns whether the packet
/// reaches. Reads only.
pub async fn explain_live<E: crate::cloud::Ec2>(
    client: &kube::Client,
    ec2: &E,
    q: &explain::Question,
    settings: &NodeSettings,
    json: bool,
    out: &mut impl Write,
) -> Result<bool, Error> {
    let live = explain::read_for(client, ec2, &q.node).await?;
    let e = explain::explain(&live, settings, q)?;
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&e)?)?;
    } else {
        explain::write_text(&e, out)?;
    }
    Ok(e.reaches())
}

/// One document of an input file, with where it came from.
#[derive(Debug, Clone)]
pub struct Document {
    /// `file#N` (N counts the file's YAML documents from 1), with
    /// ` items[i]` for an item of a `kind: List`, for messages.
    pub origin: String,
    /// The document as JSON, as `kubectl` sends it: aliases resolved,
    /// merge keys (`<<: *base`) applied, the last of duplicate keys kept.
    pub value: Value,
}

/// Expands directories among `paths` into their `*.yaml`, `*.yml` and
/// `*.json` files, recursively (hidden directories such as `.git` are
/// skipped), sorted; other paths (files, `-`) are kept as given.
pub fn expand_paths(paths: &[PathBuf]) -> Result<Vec<PathBuf>, Error> {
    let mut out = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut files = Vec::new();
            walk(path, &mut files)?;
            files.sort();
            out.extend(files);
        } else {
            out.push(path.clone());
        }
    }
    Ok(out)
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>) -> Result<(), Error> {
    let read_err = |source| Error::Read {
        path: dir.to_path_buf(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(read_err)? {
        let path = entry.map_err(read_err)?.path();
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if path.is_dir() {
            if !hidden {
                walk(&path, files)?;
            }
        } else if path
            .extension()
            .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
        {
            files.push(path);
        }
    }
    Ok(())
}

/// Reads every non-empty document of `path` (`-` is standard input):
/// YAML (several documents per file) or JSON; a `v1` `List` stands for
/// its items, as `kubectl apply` reads it.
pub fn read_documents(path: &Path) -> Result<Vec<Document>, Error> {
    let text = if path == Path::new("-") {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|source| Error::Read {
                path: path.into(),
                source,
            })?;
        s
    } else {
        std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.into(),
            source,
        })?
    };
    parse_documents(&text, path)
}

/// The documents of `text`, read from `path` (for origins and errors).
pub fn parse_documents(text: &str, path: &Path) -> Result<Vec<Document>, Error> {
    let mut docs = Vec::new();
    // kubectl reads YAML 1.1, where a plain `yes`, `on`, `y` (and their
    // negations) are booleans and `010` (octal 8) or `1_000` are numbers;
    // serde_yaml reads YAML 1.2, where they are strings. A YAML 1.1 reading
    // of the same text supplies those scalars.
    let mut options = serde_saphyr::Options::default();
    options.duplicate_keys = serde_saphyr::DuplicateKeyPolicy::LastWins;
    options.legacy_octal_numbers = true;
    let yaml11: Vec<Value> =
        serde_saphyr::from_multiple_with_options(text, options).unwrap_or_default();
    let mut yaml11 = yaml11.iter().filter(|v| !v.is_null());
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let mut value: Value =
            serde::Deserialize::deserialize(de).map_err(|source| Error::Parse {
                path: path.into(),
                source,
            })?;
        if value.is_null() {
            continue;
        }
        if let Some(reading) = yaml11.next() {
            yaml11_scalars(&mut value, reading);
        }
        apply_merge_keys(&mut value);
        let origin = format!("{}#{}", path.display(), i + 1);
        let is_list = value.get("apiVersion").and_then(Value::as_str) == Some("v1")
            && value.get("kind").and_then(Value::as_str) == Some("List");
        match value.get_mut("items").and_then(Value::as_array_mut) {
            Some(items) if is_list => {
                for (j, item) in std::mem::take(items).into_iter().enumerate() {
                    docs.push(Document {
                        origin: format!("{origin} items[{j}]"),
                        value: item,
                    });
                }
            }
            _ => docs.push(Document { origin, value }),
        }
    }
    Ok(docs)
}

/// Takes the booleans and numbers of a YAML 1.1 `reading` of the same
/// document where `value` (read as YAML 1.2) holds a string.
fn yaml11_scalars(value: &mut Value, reading: &Value) {
    match (value, reading) {
        (v @ Value::String(_), Value::Bool(_) | Value::Number(_)) => *v = reading.clone(),
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a.iter_mut() {
                if let Some(w) = b.get(k) {
                    yaml11_scalars(v, w);
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (v, w) in a.iter_mut().zip(b) {
                yaml11_scalars(v, w);
            }
        }
        _ => {}
    }
}

/// Applies YAML merge keys (`<<: *base` or `<<: [*a, *b]`) as kubectl's
/// YAML reader does: keys written in the mapping win, then the merged
/// mappings in order.
fn apply_merge_keys(value: &mut Value) {
    match value {
        Value::Object(map) => {
            if let Some(merged) = map.remove("<<") {
                let sources = match merged {
                    Value::Array(list) => list,
                    other => vec![other],
                };
                for source in sources {
                    if let Value::Object(source) = source {
                        for (k, v) in source {
                            map.entry(k).or_insert(v);
                        }
                    }
                }
            }
            for v in map.values_mut() {
                apply_merge_keys(v);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(apply_merge_keys),
        _ => {}
    }
}

/// Checks one manifest as `kubectl apply` would have it judged: a
/// palisade.dev/v1alpha1 FirewallPolicy with no unknown field (strict field
/// validation), valid for the CRD's schema and every CEL rule, then for the
/// compiler (which must agree). Returns every problem, one line each, with
/// its field path: the compiler's message where it has one for a field
/// (it says what to write instead), else the apiserver's.
pub fn check_policy(value: &Value) -> Vec<String> {
    let admission = crate::policy::admission::admit(value);
    let typed = match &admission {
        Ok(policy) => Some(policy.clone()),
        // For its messages only: the verdict is already "refused".
        Err(_) => serde_json::from_value::<FirewallPolicy>(value.clone()).ok(),
    };
    let compiler: Vec<crate::policy::PolicyError> =
        match typed.as_ref().map(crate::policy::validate) {
            Some(Err(e)) => e.problems().into_iter().cloned().collect(),
            Some(Ok(_)) => Vec::new(),
            // Not even decodable (a port of 65536, say): the compiler's
            // word on each CIDR still says what to write.
            None => cidr_problems(value),
        };
    let mut out: Vec<String> = compiler.iter().map(ToString::to_string).collect();
    if let Err(problems) = admission {
        let covered = |path: &str| {
            compiler
                .iter()
                .filter_map(crate::policy::PolicyError::path)
                .any(|p| {
                    // The same field, one inside it, or (for a CEL rule on
                    // a rule or peer) the object holding it.
                    let within = |a: &str, b: &str| {
                        a == b || a.starts_with(&format!("{b}.")) || a.starts_with(&format!("{b}["))
                    };
                    within(path, p) || (path.contains('[') && within(p, path))
                })
        };
        out.extend(
            problems
                .iter()
                .filter(|p| p.path.is_empty() || !covered(&p.path))
                .map(ToString::to_string),
        );
    }
    out
}

/// Whether a document is a FirewallPolicy (any other kind — a Deployment
/// beside the policies in a GitOps repository — is skipped and counted).
fn is_policy(value: &Value) -> bool {
    value.get("kind").and_then(Value::as_str) == Some("FirewallPolicy")
        || value
            .get("apiVersion")
            .and_then(Value::as_str)
            .is_some_and(|v| v.starts_with("palisade.dev/"))
}

/// The compiler's problems with every peer `cidr` of a manifest that does
/// not decode as a whole.
fn cidr_problems(value: &Value) -> Vec<crate::policy::PolicyError> {
    let mut out = Vec::new();
    for direction in ["ingress", "egress"] {
        let rules = value["spec"][direction].as_array().into_iter().flatten();
        for (i, rule) in rules.enumerate() {
            let peers = rule["peers"].as_array().into_iter().flatten();
            for (j, peer) in peers.enumerate() {
                if let Some(cidr) = peer["cidr"].as_str() {
                    let path = format!("spec.{direction}[{i}].peers[{j}].cidr");
                    out.extend(crate::policy::parse_cidr(cidr, &path).err());
                }
            }
        }
    }
    out
}

/// `palisade validate`: checks every FirewallPolicy document of `files`
/// (directories: their YAML and JSON files, recursively) and prints one
/// line per finding, each naming the file, the document (`#N`, counted
/// from 1) and the field path: `origin (name): OK`, each problem, the
/// compiler's warnings (duplicate or shadowed rules, quota near). It goes
/// on past a file it cannot read or parse and reports every one. Refused
/// besides invalid policies: a file with no document, a policy given
/// twice (the second would silently replace the first), and no policy at
/// all. Documents of other kinds are skipped and counted.
pub fn validate_files(files: &[PathBuf], out: &mut impl Write) -> Result<(), Error> {
    let (mut invalid, mut valid, mut other, mut broken) = (0, 0, 0, 0);
    let mut seen: std::collections::BTreeMap<String, String> = Default::default();
    for file in &expand_paths(files)? {
        let docs = match read_documents(file) {
            Ok(docs) => docs,
            Err(e) => {
                broken += 1;
                writeln!(out, "{e}")?;
                continue;
            }
        };
        if docs.is_empty() {
            broken += 1;
            writeln!(out, "{}: empty: no document", file.display())?;
            continue;
        }
        for doc in docs {
            if !is_policy(&doc.value) {
                other += 1;
                continue;
            }
            let name = doc
                .value
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("<unnamed>")
                .to_string();
            let mut problems = check_policy(&doc.value);
            if name != "<unnamed>" {
                match seen.get(&name) {
                    Some(first) => problems.push(format!(
                        "metadata.name: policy {name} is given twice (first at {first}); the second would replace the first: give each policy its own name"
                    )),
                    None => {
                        seen.insert(name.clone(), doc.origin.clone());
                    }
                }
            }
            if problems.is_empty() {
                valid += 1;
                writeln!(out, "{} ({name}): OK", doc.origin)?;
                for w in offline_warnings(&doc.value) {
                    writeln!(out, "{} ({name}): warning: {w}", doc.origin)?;
                }
            } else {
                invalid += 1;
                for p in problems {
                    writeln!(out, "{} ({name}): {p}", doc.origin)?;
                }
            }
        }
    }
    writeln!(
        out,
        "{valid} valid, {invalid} invalid FirewallPolicy manifest(s); {broken} file(s) unreadable or empty; {other} document(s) of other kinds skipped"
    )?;
    if invalid + broken > 0 {
        Err(Error::Invalid(invalid + broken))
    } else if valid == 0 {
        Err(Error::Render(
            "no FirewallPolicy found in the files given".into(),
        ))
    } else {
        Ok(())
    }
}

/// The compiler's warnings about a valid policy that need no cluster:
/// duplicate and shadowed rules, a quota nearly reached.
fn offline_warnings(value: &Value) -> Vec<String> {
    let Ok(policy) = crate::policy::admission::admit(value) else {
        return Vec::new();
    };
    let Ok(compiled) = crate::policy::compile_policy(&policy, &crate::policy::Facts::default())
    else {
        return Vec::new();
    };
    compiled
        .warnings
        .iter()
        .filter(|w| {
            matches!(
                w,
                crate::policy::Warning::DuplicateRule { .. }
                    | crate::policy::Warning::ShadowedRule { .. }
                    | crate::policy::Warning::QuotaNear { .. }
            )
        })
        .map(ToString::to_string)
        .collect()
}
