//! Operations: the chart's PrometheusRule, the Grafana dashboard and the
//! agent's Events.
//!
//! - The rule, rendered by `helm template` with
//!   `metrics.prometheusRule.enabled=true`, passes `promtool check rules`,
//!   and its alerts behave as `tests/fixtures/promtool/alerts-test.yaml`
//!   says (`promtool test rules`).
//! - Every metric an alert or a dashboard query names is one the code
//!   exports (read from the exposition of `Metrics::default()` of the
//!   controller and the agent), every exported metric is on the dashboard,
//!   and every dashboard query parses.
//! - Every alert links a section of docs/runbook.md that exists, and every
//!   alert section of the runbook has its alert.
//! - The controller's gauges follow its policies (ready, stalled, nodes,
//!   last sync) and forget a deleted one.
//! - An agent that repairs drift says so in an Event on its FirewallNode,
//!   which `kubectl describe fwn` shows.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::DeleteParams;
use palisade::api::FirewallNode;
use palisade::testenv::{SimNet, SimNode, TestEnv, testbin};

const CRDS: &str = include_str!("../crds/palisade.dev.yaml");

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn ok(what: &str, out: Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn promtool(args: &[&str], dir: &Path) -> String {
    let out = Command::new(testbin("promtool").unwrap())
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    ok(&format!("promtool {}", args.join(" ")), out)
}

/// The chart's PrometheusRule, rendered with the defaults as a user
/// enabling it would.
fn rendered_rule() -> serde_json::Value {
    let out = Command::new(testbin("helm").unwrap())
        .env(
            "HELM_CACHE_HOME",
            std::env::temp_dir().join("palisade-helm-cache"),
        )
        .arg("template")
        .arg("palisade")
        .arg(root().join("charts/palisade"))
        .args(["--namespace", "palisade-system"])
        .args(["--set", "metrics.prometheusRule.enabled=true"])
        .args(["--show-only", "templates/prometheusrule.yaml"])
        .output()
        .unwrap();
    let yaml = ok("helm template", out);
    let rule: serde_json::Value = serde_yaml::from_str(&yaml).unwrap();
    assert_eq!(rule["kind"], "PrometheusRule", "{yaml}");
    rule
}

/// Every alert rule of the PrometheusRule.
fn alerts(rule: &serde_json::Value) -> Vec<&serde_json::Value> {
    rule["spec"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .filter(|r| r.get("alert").is_some())
        .collect()
}

/// The sample names the code exports, from the text exposition of both
/// components' registries: a counter `x` is `x_total`, a histogram
/// `x_bucket`, `x_sum` and `x_count`. Per family (its `# TYPE` name).
///
/// The exposition leaves out families without a series, so each labelled
/// family gets one here; a family registered in the source but missing from
/// the exposition fails the test (give it a series here).
fn exported() -> Vec<(String, Vec<String>)> {
    use palisade::agent::metrics::AuditLabels;
    let controller = Arc::new(palisade::controller::Metrics::default());
    controller.reconciled("ok", Duration::ZERO);
    controller.failed("Example");
    (controller.ec2_observer())("DescribeSecurityGroups", "ok");
    controller.observe_status("example", &Default::default());
    controller.widened("example", 1);
    let agent = palisade::agent::metrics::Metrics::default();
    agent
        .audit_would_drop
        .get_or_create(&AuditLabels {
            policy: "example".into(),
            direction: "ingress".into(),
        })
        .set(0);
    palisade::agent::wake::Wake::new(agent.wakeups.clone())
        .wake(palisade::agent::wake::Source::Policy);
    let text = controller.encode() + &agent.render();
    let families: Vec<(String, Vec<String>)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let mut words = l.split_whitespace();
            let name = words.next().unwrap().to_string();
            let samples = match words.next().unwrap() {
                "counter" => vec![format!("{name}_total")],
                "histogram" => ["bucket", "sum", "count"]
                    .iter()
                    .map(|s| format!("{name}_{s}"))
                    .collect(),
                _ => vec![name.clone()],
            };
            (name, samples)
        })
        .collect();
    for (prefix, source) in [
        ("palisade_controller", "src/controller/metrics.rs"),
        ("palisade_agent", "src/agent/metrics.rs"),
    ] {
        let source = std::fs::read_to_string(root().join(source)).unwrap();
        for registered in registered_names(&source) {
            let name = format!("{prefix}_{registered}");
            assert!(
                families.iter().any(|(f, _)| *f == name),
                "{name} is registered but has no series in this test: give it one\n{text}"
            );
        }
    }
    families
}

/// The names passed to `registry.register(` in a metrics module's source.
fn registered_names(source: &str) -> Vec<String> {
    let names: Vec<String> = source
        .split("register(")
        .skip(1)
        .filter_map(|rest| {
            let rest = rest.trim_start().strip_prefix('"')?;
            Some(rest[..rest.find('"')?].to_string())
        })
        .collect();
    assert!(names.len() > 5, "{names:?}");
    names
}

fn exported_samples() -> BTreeSet<String> {
    exported().into_iter().flat_map(|(_, s)| s).collect()
}

/// The metric names a PromQL expression selects. A small lexer, enough for
/// rules and dashboards: it skips strings, label matchers (`{...}`), ranges
/// (`[...]`), the label lists of `by`/`without`/`on`/`ignoring`/
/// `group_left`/`group_right`, function names (an identifier before `(`),
/// aggregations and other keywords, numbers and Grafana variables
/// (`$__rate_interval`).
fn metric_names(expr: &str) -> Vec<String> {
    const GROUPING: [&str; 6] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    const KEYWORDS: [&str; 21] = [
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "inf",
        "nan",
        // Aggregations, which `by (...)` or `without (...)` may follow.
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ];
    let c: Vec<char> = expr.chars().collect();
    let mut names = Vec::new();
    let mut i = 0;
    let mut label_list_may_follow = false;
    // Skips from an opening char to its closing one, minding strings.
    let skip = |mut i: usize, close: char| -> usize {
        while i < c.len() && c[i] != close {
            if matches!(c[i], '"' | '\'' | '`') {
                let q = c[i];
                i += 1;
                while i < c.len() && c[i] != q {
                    i += if c[i] == '\\' { 2 } else { 1 };
                }
            }
            i += 1;
        }
        i + 1
    };
    while i < c.len() {
        let ch = c[i];
        if ch.is_whitespace() {
            i += 1;
            continue;
        }
        let after_grouping = std::mem::take(&mut label_list_may_follow);
        match ch {
            '"' | '\'' | '`' => i = skip(i + 1, ch),
            '{' => i = skip(i + 1, '}'),
            '[' => i = skip(i + 1, ']'),
            '(' if after_grouping => i = skip(i + 1, ')'),
            '$' => {
                i += 1;
                while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                    i += 1;
                }
            }
            d if d.is_ascii_digit() || d == '.' => {
                while i < c.len() && (c[i].is_alphanumeric() || c[i] == '.') {
                    i += 1;
                }
            }
            a if a.is_ascii_alphabetic() || a == '_' || a == ':' => {
                let start = i;
                while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '_' || c[i] == ':') {
                    i += 1;
                }
                let word: String = c[start..i].iter().collect();
                let next = c[i..].iter().find(|x| !x.is_whitespace());
                if GROUPING.contains(&word.as_str()) {
                    label_list_may_follow = true;
                } else if KEYWORDS.contains(&word.to_lowercase().as_str()) || next == Some(&'(') {
                    // A keyword or a function.
                } else {
                    names.push(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

#[test]
fn the_lexer_finds_metric_names_only() {
    assert_eq!(
        metric_names(
            r#"sum by (namespace, job) (rate(a_total{x="}by(",y=~'b'}[5m])) / on(job) group_left sum without (pod) (b) > bool 0.05 unless absent(c:rule) or vector(1) and time() - d offset 5m"#
        ),
        ["a_total", "b", "c:rule", "d"]
    );
    assert_eq!(
        metric_names("histogram_quantile(0.99, sum(rate(x_bucket[$__rate_interval])) by (le))"),
        ["x_bucket"]
    );
    assert_eq!(metric_names("max(palisade_x > 0)"), ["palisade_x"]);
}

/// Fails naming each query that selects no metric, or one the code does not
/// export.
fn assert_exported(what: &str, exprs: &[(String, String)]) {
    let samples = exported_samples();
    let mut problems = Vec::new();
    for (name, expr) in exprs {
        let names = metric_names(expr);
        if names.is_empty() {
            problems.push(format!("{what} {name}: selects no metric: {expr}"));
        }
        for metric in names {
            if !samples.contains(&metric) {
                problems.push(format!(
                    "{what} {name}: {metric} is not exported by the controller or the agent"
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{}\nexported: {samples:?}",
        problems.join("\n")
    );
}

/// GitHub's anchor of a Markdown heading.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

#[test]
fn alerts_pass_promtool_name_exported_metrics_and_link_the_runbook() {
    let rule = rendered_rule();
    let alerts = alerts(&rule);
    let names: BTreeSet<&str> = alerts
        .iter()
        .map(|a| a["alert"].as_str().unwrap())
        .collect();
    // What the issue asked for, at least.
    for wanted in [
        "PalisadePolicyStalled",
        "PalisadeNodeDriftRepairs",
        "PalisadeRestoreFailures",
        "PalisadeNodesNotSynced",
        "PalisadeAgentSyncStale",
        "PalisadeEc2Throttling",
    ] {
        assert!(names.contains(wanted), "no alert {wanted}: {names:?}");
    }

    // Metrics.
    let exprs: Vec<(String, String)> = alerts
        .iter()
        .map(|a| {
            (
                a["alert"].as_str().unwrap().to_string(),
                a["expr"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_exported("alert", &exprs);

    // Runbook: each alert links its own section, and each alert section
    // has its alert.
    let runbook = std::fs::read_to_string(root().join("docs/runbook.md")).unwrap();
    let sections: BTreeSet<String> = runbook
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .map(anchor)
        .collect();
    for a in &alerts {
        let name = a["alert"].as_str().unwrap();
        let url = a["annotations"]["runbook_url"].as_str().unwrap();
        let (base, section) = url
            .split_once('#')
            .unwrap_or_else(|| panic!("{name}: {url} names no section"));
        assert!(base.ends_with("docs/runbook.md"), "{name}: {url}");
        assert_eq!(section, anchor(name), "{name} links another section");
        assert!(
            sections.contains(section),
            "{name}: docs/runbook.md has no section #{section}"
        );
        for key in ["summary", "description"] {
            assert!(
                a["annotations"][key]
                    .as_str()
                    .is_some_and(|s| !s.is_empty()),
                "{name} has no {key}"
            );
        }
        assert!(a["labels"]["severity"].is_string(), "{name}: no severity");
    }
    for section in runbook
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .filter(|h| h.starts_with("Palisade"))
    {
        assert!(
            names.contains(section.trim()),
            "docs/runbook.md has a section for {section}, which is no alert"
        );
    }

    // promtool: the rules check, and the alerts behave as the unit tests say.
    let dir = tempfile::tempdir().unwrap();
    let groups = serde_json::json!({ "groups": rule["spec"]["groups"] });
    std::fs::write(
        dir.path().join("rules.yaml"),
        serde_yaml::to_string(&groups).unwrap(),
    )
    .unwrap();
    let checked = promtool(&["check", "rules", "rules.yaml"], dir.path());
    println!("{checked}");
    assert!(
        checked.contains(&format!("SUCCESS: {} rules found", alerts.len())),
        "{checked}"
    );
    std::fs::copy(
        root().join("tests/fixtures/promtool/alerts-test.yaml"),
        dir.path().join("alerts-test.yaml"),
    )
    .unwrap();
    let tested = promtool(&["test", "rules", "alerts-test.yaml"], dir.path());
    println!("{tested}");
    assert!(tested.contains("SUCCESS"), "{tested}");
}

/// Every `expr` of the dashboard, with the panel title it belongs to.
fn dashboard_queries(v: &serde_json::Value, title: &str, out: &mut Vec<(String, String)>) {
    match v {
        serde_json::Value::Object(map) => {
            let title = map
                .get("title")
                .and_then(|t| t.as_str())
                .unwrap_or(title)
                .to_string();
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(e)) => out.push((title.clone(), e.clone())),
                    _ => dashboard_queries(v, &title, out),
                }
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                dashboard_queries(item, title, out);
            }
        }
        _ => {}
    }
}

#[test]
fn dashboard_queries_parse_and_cover_the_exported_metrics() {
    let path = root().join("deploy/grafana/palisade.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(dashboard["uid"], "palisade");
    let mut queries = Vec::new();
    dashboard_queries(&dashboard, "dashboard", &mut queries);
    assert!(queries.len() > 10, "{queries:?}");
    assert_exported("dashboard panel", &queries);

    // Every metric family the code exports is on the dashboard.
    let used: BTreeSet<String> = queries.iter().flat_map(|(_, e)| metric_names(e)).collect();
    let missing: Vec<String> = exported()
        .into_iter()
        .filter(|(_, samples)| !samples.iter().any(|s| used.contains(s)))
        .map(|(family, _)| family)
        .collect();
    assert!(missing.is_empty(), "not on the dashboard: {missing:?}");

    // Every query parses: promtool checks them as recording rules, with
    // Grafana's variables replaced by what they stand for.
    let rules: Vec<serde_json::Value> = queries
        .iter()
        .enumerate()
        .map(|(i, (_, e))| {
            let expr = e
                .replace("$__rate_interval", "2m")
                .replace("$__interval", "1m")
                .replace("$__range", "6h");
            serde_json::json!({"record": format!("dashboard:query{i}"), "expr": expr})
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]});
    std::fs::write(
        dir.path().join("dashboard.yaml"),
        serde_yaml::to_string(&file).unwrap(),
    )
    .unwrap();
    promtool(&["check", "rules", "dashboard.yaml"], dir.path());
}

// --- The controller's gauges, against moto --------------------------------

/// The value of the sample `line_prefix` (name and labels) in `text`.
fn sample(text: &str, line_prefix: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(line_prefix)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn controller_gauges_follow_policies_and_forget_deleted_ones() {
    use palisade::cloud::RetryPolicy;
    use palisade::controller::{self, Config, Metrics};
    let env = TestEnv::shared().unwrap();
    env.install_crds(CRDS).await.unwrap();
    let client = env.client().await.unwrap();
    let vpc = env.sim_cloud().await.unwrap().vpc_id.clone();
    let metrics = Arc::new(Metrics::default());
    let retry = RetryPolicy {
        max_attempts: 4,
        base: Duration::from_millis(10),
        cap: Duration::from_millis(100),
        ..RetryPolicy::default()
    };
    let ec2 = palisade::testenv::aws_ec2_for(&env.ec2_endpoint(), retry)
        .with_observer(metrics.ec2_observer());
    let config = Config {
        cluster_name: "obs-tests".into(),
        policy_selector: Some("palisade.dev/test=obs".into()),
        instance: Some("test-obs".into()),
        vpc_cidrs: Vec::new(),
        ..Config::default()
    };
    let ctx = controller::context(client.clone(), Arc::new(ec2), config, metrics.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(controller::run(ctx, async move {
        let _ = stopped.await;
    }));

    // One policy that can be applied (it selects no node: 0/0 synced), one
    // whose peer group does not exist (Stalled).
    let policy = |name: &str, peer: &str| {
        format!(
            "apiVersion: palisade.dev/v1alpha1\nkind: FirewallPolicy\nmetadata:\n  name: {name}\n  labels: {{palisade.dev/test: obs}}\nspec:\n  policyTypes: [Ingress]\n  nodeSelector:\n    matchLabels: {{role: obs-nothing}}\n  securityGroup: {{vpcId: {vpc}}}\n  ingress:\n    - name: ssh\n      protocol: TCP\n      ports: [{{port: 22}}]\n      peers: [{peer}]\n"
        )
    };
    env.apply_yaml(&policy("obs-ready", "{cidr: 192.0.2.0/24}"))
        .await
        .unwrap();
    env.apply_yaml(&policy(
        "obs-stalled",
        "{securityGroupId: sg-0123456789abcdef0}",
    ))
    .await
    .unwrap();
    let text = wait_until("both policies counted", Duration::from_secs(60), || async {
        let text = metrics.encode();
        (sample(&text, r#"palisade_controller_policies{state="ready"}"#) == Some(1.0)
            && sample(&text, r#"palisade_controller_policies{state="stalled"}"#) == Some(1.0))
        .then_some(text)
    })
    .await;
    println!("{text}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let synced = sample(
        &text,
        r#"palisade_controller_last_successful_sync_timestamp_seconds{policy="obs-ready"}"#,
    )
    .unwrap();
    assert!(
        (now - synced).abs() < 120.0,
        "synced at {synced}, now {now}"
    );
    assert_eq!(
        sample(
            &text,
            r#"palisade_controller_last_successful_sync_timestamp_seconds{policy="obs-stalled"}"#
        ),
        Some(0.0),
        "a policy never synced reads 0"
    );
    for state in ["selected", "synced", "failed"] {
        let series =
            format!(r#"palisade_controller_policy_nodes{{policy="obs-ready",state="{state}"}}"#);
        assert_eq!(sample(&text, &series), Some(0.0), "{series}");
    }
    assert_eq!(
        sample(
            &text,
            r#"palisade_controller_policies{state="reconciling"}"#
        ),
        Some(0.0)
    );

    // Deleted: the policies' series go, and they are counted no more.
    let api = Api::<palisade::api::FirewallPolicy>::all(client.clone());
    for name in ["obs-ready", "obs-stalled"] {
        api.delete(name, &DeleteParams::default()).await.unwrap();
    }
    let text = wait_until(
        "the policies forgotten",
        Duration::from_secs(60),
        || async {
            let text = metrics.encode();
            (!text.contains("policy=\"obs-")).then_some(text)
        },
    )
    .await;
    for state in ["ready", "reconciling", "stalled"] {
        let series = format!(r#"palisade_controller_policies{{state="{state}"}}"#);
        assert_eq!(sample(&text, &series), Some(0.0), "{series}");
    }
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
}

// --- The agent's Events, on a simulated node -----------------------------

/// GET on the agent's metrics server, from inside the node's namespace.
fn http_get(node: &SimNode, path: &str) -> String {
    let script = format!(
        "exec 3<>/dev/tcp/127.0.0.1/9901; printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' >&3; cat <&3"
    );
    node.host().exec(&["bash", "-c", &script]).unwrap()
}

async fn wait_until<F, Fut, T>(what: &str, timeout: Duration, f: F) -> T
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The agent's `DriftRepaired` Events about `node`'s FirewallNode.
async fn drift_events(client: &kube::Client, node: &str) -> Vec<Event> {
    Api::<Event>::namespaced(client.clone(), "default")
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some("DriftRepaired")
                && e.regarding
                    .as_ref()
                    .is_some_and(|r| r.name.as_deref() == Some(node))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_reports_a_drift_repair_in_an_event_on_its_firewall_node() {
    let env = TestEnv::shared().unwrap();
    env.install_crds(CRDS).await.unwrap();
    let client = env.client().await.unwrap();
    let net = SimNet::new().unwrap();
    let node = SimNode::create(env, &net, "obs-n1", [("role", "obs")])
        .await
        .unwrap();
    let mut agent = node
        .host()
        .tokio_command(env!("CARGO_BIN_EXE_palisade-agent"))
        .env("KUBECONFIG", env.kubeconfig_path())
        .env("NODE_NAME", node.name())
        .env("RUST_LOG", "info")
        .args(["--metrics-address", "127.0.0.1:9901", "--backend", "nft"])
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    env.apply_yaml(
        "apiVersion: palisade.dev/v1alpha1\nkind: FirewallPolicy\nmetadata:\n  name: obs-web\nspec:\n  policyTypes: [Ingress]\n  nodeSelector:\n    matchLabels: {role: obs}\n  ingress:\n    - name: http\n      protocol: TCP\n      ports: [{port: 8080}]\n      peers: [{cidr: 0.0.0.0/0}]\n",
    )
    .await
    .unwrap();
    let nodes: Api<FirewallNode> = Api::all(client.clone());
    let fwn = wait_until("the policy applied", Duration::from_secs(30), || async {
        let fwn = nodes.get_opt("obs-n1").await.ok()??;
        let status = fwn.status.as_ref()?;
        (status.last_sync.as_ref()?.result == "Success"
            && status.policies.iter().any(|p| p.name == "obs-web"))
        .then_some(fwn)
    })
    .await;
    assert!(drift_events(&client, "obs-n1").await.is_empty());

    // The agent's last successful sync is a recent Unix time.
    let metrics = http_get(&node, "/metrics");
    let synced: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("palisade_agent_last_successful_sync_timestamp_seconds "))
        .unwrap_or_else(|| panic!("{metrics}"))
        .trim()
        .parse()
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - synced).abs() < 60.0, "last sync {synced}, now {now}");

    // Something flushes the node's chain: repaired, and said in an Event.
    node.host()
        .exec(&["iptables-nft", "-F", "PALISADE-INPUT"])
        .unwrap();
    let events = wait_until("a DriftRepaired Event", Duration::from_secs(30), || async {
        let events = drift_events(&client, "obs-n1").await;
        (!events.is_empty()).then_some(events)
    })
    .await;
    let event = &events[0];
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert_eq!(
        event.reporting_controller.as_deref(),
        Some("palisade-agent")
    );
    assert_eq!(event.reporting_instance.as_deref(), Some("obs-n1"));
    let regarding = event.regarding.as_ref().unwrap();
    assert_eq!(regarding.kind.as_deref(), Some("FirewallNode"));
    assert_eq!(regarding.uid, fwn.metadata.uid, "kubectl describe finds it");
    let note = event.note.as_deref().unwrap_or_default();
    assert!(note.contains("PALISADE-INPUT"), "{note}");

    // As a person looks at it.
    let described = env
        .kubectl()
        .unwrap()
        .args(["describe", "fwn", "obs-n1"])
        .output()
        .unwrap();
    let described = ok("kubectl describe fwn", described);
    println!("{described}");
    assert!(described.contains("DriftRepaired"), "{described}");

    // A second repair within the minute adds no Event (one per minute).
    node.host()
        .exec(&["iptables-nft", "-F", "PALISADE-INPUT"])
        .unwrap();
    wait_until("the second repair", Duration::from_secs(30), || async {
        let fwn = nodes.get_opt("obs-n1").await.ok()??;
        (fwn.status?.drift_repairs >= 2).then_some(())
    })
    .await;
    let events = drift_events(&client, "obs-n1").await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(events[0].series.is_none(), "{events:?}");

    // Clean up: the policy goes, then the agent.
    Api::<palisade::api::FirewallPolicy>::all(client.clone())
        .delete("obs-web", &DeleteParams::default())
        .await
        .unwrap();
    wait_until("the policy removed", Duration::from_secs(30), || async {
        let fwn = nodes.get_opt("obs-n1").await.ok()??;
        fwn.status?.policies.is_empty().then_some(())
    })
    .await;
    let _ = agent.kill().await;
    let _ = nodes.delete("obs-n1", &DeleteParams::default()).await;
}
