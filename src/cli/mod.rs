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
    /// YAML that is not even YAML.
    #[error("{0}")]
    Yaml(#[from] serde_yaml::Error),
    /// Writing the output failed.
    #[error("writing output: {0}")]
    Write(#[from] std::io::Error),
    /// Some manifests are invalid; each was reported on the output.
    #[error("{0} invalid manifest(s)")]
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

/// One YAML document of an input file, with where it came from.
#[derive(Debug, Clone)]
pub struct Document {
    /// `file` or `file#N` (N counts documents from 1) for messages.
    pub origin: String,
    /// The document as JSON.
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

/// Reads every non-empty YAML document of `path` (`-` is standard input).
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
    let mut docs = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        let value: Value = serde::Deserialize::deserialize(de)?;
        if value.is_null() {
            continue;
        }
        docs.push(Document {
            origin: format!("{}#{}", path.display(), i + 1),
            value,
        });
    }
    Ok(docs)
}

/// Checks one manifest as admission would: it must be a palisade.dev/v1alpha1
/// FirewallPolicy, carry no unknown fields, decode into the typed API, and
/// pass every CEL rule of the CRD. Returns every problem found, one line each.
pub fn check_policy(value: &Value) -> Vec<String> {
    let api_version = value
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let kind = value
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if api_version != "palisade.dev/v1alpha1" || kind != "FirewallPolicy" {
        return vec![format!(
            "not a FirewallPolicy: apiVersion {api_version:?}, kind {kind:?} (want palisade.dev/v1alpha1, FirewallPolicy)"
        )];
    }
    let policy: FirewallPolicy = match serde_json::from_value(value.clone()) {
        Ok(p) => p,
        Err(e) => return vec![format!("does not match the FirewallPolicy schema: {e}")],
    };
    let mut problems = Vec::new();
    // serde drops fields it does not know; the apiserver's strict field
    // validation refuses them. A typo (`prot:` for `port:`) must not vanish.
    if let Ok(round_trip) = serde_json::to_value(&policy) {
        unknown_fields(value, &round_trip, "", &mut problems);
    }
    // The compiler's own validation: the schema checks (patterns, bounds,
    // unique names) that CEL leaves to the apiserver, and what no schema can say.
    match crate::policy::validate(&policy) {
        Err(crate::policy::PolicyError::Invalid { errors, .. }) => {
            problems.extend(errors.iter().map(|e| e.to_string()))
        }
        Err(e) => problems.push(e.to_string()),
        Ok(_) => {}
    }
    if let Err(errors) = policy.validate_cel() {
        // One line per failed rule: "<field path>: <message>".
        problems.extend(
            errors
                .to_string()
                .lines()
                .map(|l| l.trim().trim_start_matches("- ").to_owned())
                .filter(|l| !l.is_empty() && !l.ends_with("validation error(s):")),
        );
    }
    problems
}

/// Fields of `input` that `known` (the typed round trip) lost, as paths.
fn unknown_fields(input: &Value, known: &Value, path: &str, out: &mut Vec<String>) {
    match (input, known) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                // metadata and status are not ours to police offline.
                if path.is_empty() && (k == "metadata" || k == "status") {
                    continue;
                }
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match b.get(k) {
                    Some(w) => unknown_fields(v, w, &p, out),
                    None if v.is_null() => {}
                    None => out.push(format!("{p}: unknown field")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                unknown_fields(v, w, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
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

/// `palisade validate`: checks every FirewallPolicy document of `files`
/// (directories: their YAML and JSON files, recursively), printing
/// `origin: OK` or each problem, then the compiler's warnings (duplicate or
/// shadowed rules, quota near); documents of other kinds are skipped and
/// counted. Fails if any policy is invalid, or if no policy was found.
pub fn validate_files(files: &[PathBuf], out: &mut impl Write) -> Result<(), Error> {
    let (mut invalid, mut valid, mut other) = (0, 0, 0);
    for file in &expand_paths(files)? {
        for doc in read_documents(file)? {
            if !is_policy(&doc.value) {
                other += 1;
                continue;
            }
            let name = doc
                .value
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("<unnamed>");
            let problems = check_policy(&doc.value);
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
        "{valid} valid, {invalid} invalid FirewallPolicy manifest(s); {other} document(s) of other kinds skipped"
    )?;
    if invalid > 0 {
        Err(Error::Invalid(invalid))
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
    let Ok(policy) = serde_json::from_value::<FirewallPolicy>(value.clone()) else {
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
