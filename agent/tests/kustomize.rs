//! deploy/ as users install it: `kubectl kustomize` builds deploy/, deploy/base and every overlay
//! in deploy/overlays/, and what comes out holds together.
//!
//! - Built-in kinds parse into the Kubernetes API's types (as in `manifests.rs`).
//! - A `ServiceMonitor` selects Services that exist, on a port they have, whose pods serve the
//!   metrics there (the container's `--http-addr`).
//! - Every `PromQL` expression (alerting rules, the Grafana dashboard) names only series the agent
//!   and the gate export, with labels they carry: the catalogue comes from their own render code,
//!   not from a list kept here.
//! - The image is named in one place, and the image overlay changes every container's.
//!
//! These tests need kubectl (kustomize is built into it); without it they fail and say so.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use serde_json::Value;

mod common;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The documents `kubectl kustomize DIR` prints. Fails, never skips, without kubectl.
fn kustomize(dir: &str) -> Vec<Value> {
    let kubectl = std::env::var_os("KUBECTL").unwrap_or_else(|| "kubectl".into());
    let output = Command::new(&kubectl)
        .arg("kustomize")
        .arg(root().join(dir))
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `{} kustomize {dir}`: {e}. These tests build deploy/ with kubectl \
                 (1.27 or newer, kustomize is built in): put it on PATH or name it in $KUBECTL \
                 (https://kubernetes.io/docs/tasks/tools/)",
                kubectl.to_string_lossy()
            )
        });
    assert!(
        output.status.success(),
        "kubectl kustomize {dir} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).expect("kubectl prints UTF-8");
    let docs = common::documents(&format!("kubectl kustomize {dir}"), &text);
    assert!(!docs.is_empty(), "kubectl kustomize {dir} printed nothing");
    docs
}

/// deploy/, deploy/base and each overlay: every kustomization the project ships.
fn kustomizations() -> Vec<String> {
    let mut overlays: Vec<String> = std::fs::read_dir(root().join("deploy/overlays"))
        .expect("deploy/overlays")
        .filter_map(Result::ok)
        .filter(|e| e.path().join("kustomization.yaml").is_file())
        .map(|e| format!("deploy/overlays/{}", e.file_name().to_string_lossy()))
        .collect();
    overlays.sort();
    for expected in ["hold", "image", "prometheus-operator", "seccomp"] {
        assert!(
            overlays.contains(&format!("deploy/overlays/{expected}")),
            "no overlay {expected}: {overlays:?}"
        );
    }
    let mut dirs = vec!["deploy".to_owned(), "deploy/base".to_owned()];
    dirs.extend(overlays);
    dirs
}

fn read_yaml(path: &str) -> Value {
    let text = std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn name_of(doc: &Value) -> String {
    format!(
        "{} {}/{}",
        doc["kind"].as_str().unwrap_or("?"),
        doc["metadata"]["namespace"].as_str().unwrap_or(""),
        doc["metadata"]["name"].as_str().unwrap_or("?")
    )
}

/// True when `labels` holds every pair of `wanted` (a selector's matchLabels).
fn matches(wanted: &Value, labels: &Value) -> bool {
    wanted
        .as_object()
        .is_some_and(|w| !w.is_empty() && w.iter().all(|(k, v)| &labels[k] == v))
}

fn is_workload(doc: &Value) -> bool {
    matches!(doc["kind"].as_str(), Some("Deployment" | "DaemonSet"))
}

/// Every container (and init container) of the workloads in `docs`, as ("Kind ns/name/container",
/// container).
fn containers(docs: &[Value]) -> Vec<(String, &Value)> {
    let mut found = Vec::new();
    for doc in docs.iter().filter(|d| is_workload(d)) {
        let spec = &doc["spec"]["template"]["spec"];
        for list in ["initContainers", "containers"] {
            for c in spec[list].as_array().into_iter().flatten() {
                let name = c["name"].as_str().unwrap_or("?");
                found.push((format!("{}/{name}", name_of(doc)), c));
            }
        }
    }
    found
}

// ---------------------------------------------------------------------------------------------
// What the agent and the gate export.

/// Series name -> the labels it carries, parsed from `OpenMetrics` text: a counter `x` is the
/// series `x_total`, a histogram's are `_bucket` (with `le`), `_sum` and `_count`.
fn parse_exposition(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut series: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            match kind {
                "counter" => {
                    series.entry(format!("{name}_total")).or_default();
                }
                "histogram" => {
                    series
                        .entry(format!("{name}_bucket"))
                        .or_default()
                        .insert("le".to_owned());
                    series.entry(format!("{name}_sum")).or_default();
                    series.entry(format!("{name}_count")).or_default();
                }
                _ => {
                    series.entry(name.to_owned()).or_default();
                }
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            let labels = series.entry(line[..end].to_owned()).or_default();
            if line[end..].starts_with('{') {
                let body = &line[end + 1..line.rfind('}').expect("closing brace")];
                let mut rest = body;
                while let Some((name, after)) = rest.split_once("=\"") {
                    labels.insert(name.trim_start_matches(',').to_owned());
                    let close = after.find('"').expect("closing quote");
                    rest = &after[close + 1..];
                }
            }
        }
    }
    series
}

/// The gate's labelled families. The gate renders a family only once it has a sample, and
/// these get theirs from agents' answers, so they are read from gate/src/lib.rs instead:
/// (name registered under the `draingate_gate` prefix, field of `GateMetrics`, label struct,
/// metric type). Each row is checked against the source, and its labels are the struct's fields.
const GATE_FAMILIES: [(&str, &str, &str, &str); 4] = [
    ("checks", "checks", "CheckLabels", "Counter"),
    ("agents", "agents", "AgentLabels", "Gauge"),
    ("rollout_verdict", "rollouts", "RolloutLabels", "Gauge"),
    (
        "rollout_failed_requests",
        "rollout_errors",
        "RolloutLabels",
        "Gauge",
    ),
];

/// The field names of `struct NAME { ... }` in `source`.
fn struct_fields(source: &str, name: &str) -> BTreeSet<String> {
    let start = source
        .find(&format!("struct {name} {{"))
        .unwrap_or_else(|| panic!("gate.rs has no struct {name}"));
    let body = &source[start..];
    let body = &body[body.find('{').unwrap() + 1..body.find('}').unwrap()];
    body.lines()
        .filter_map(|l| l.trim().split_once(':'))
        .map(|(field, _)| field.trim_start_matches("pub ").trim().to_owned())
        .collect()
}

/// Every series the agent and the gate export, with its labels, from their render code: the
/// agent's with a pod in it (its families then have samples, and so labels).
fn exported() -> BTreeMap<String, BTreeSet<String>> {
    let mut state = draingate::agent::AgentState::default();
    let id = draingate::inventory::PodId {
        namespace: "shop".into(),
        name: "web-1".into(),
        uid: "u-1".into(),
    };
    state.pods.insert(
        id.uid.clone(),
        draingate::drain::PodDrain::new(id, 0, SystemTime::now()),
    );
    let mut series = parse_exposition(&draingate::http::render_metrics(&state));
    assert!(
        series.contains_key("draingate_pod_verdict"),
        "the agent's metrics changed shape: {series:?}"
    );

    let gate = draingate::gate::Gate::new(draingate::gate::GateConfig {
        pool: draingate::gate::pool::PoolConfig {
            discovery: draingate::gate::pool::Discovery::Static(Vec::new()),
            timeout: Duration::from_secs(1),
            concurrency: 1,
            reuse: Duration::from_secs(1),
            tls: None,
        },
        poll: Duration::from_secs(1),
        history_size: 1,
        history_age: Duration::from_secs(1),
    });
    let mut gate_series = parse_exposition(&gate.render_metrics());
    let source = include_str!("../../gate/src/lib.rs");
    assert!(source.contains("Registry::with_prefix(\"draingate_gate\")"));
    for (name, field, labels, kind) in GATE_FAMILIES {
        assert!(
            source.contains(&format!("{field}: Family<{labels}, {kind}>,")),
            "gate/src/lib.rs: GateMetrics::{field} is no longer a Family<{labels}, {kind}>"
        );
        let registered = format!("\"{name}\",");
        let at = source
            .find(&registered)
            .unwrap_or_else(|| panic!("gate/src/lib.rs registers no {registered}"));
        assert!(
            source[at..]
                .split("self.metrics.")
                .nth(1)
                .is_some_and(|s| s.starts_with(&format!("{field}."))),
            "gate.rs: {name} is not registered from GateMetrics::{field}"
        );
        let suffix = if kind == "Counter" { "_total" } else { "" };
        gate_series
            .entry(format!("draingate_gate_{name}{suffix}"))
            .or_default()
            .extend(struct_fields(source, labels));
    }
    assert!(
        gate_series.contains_key("draingate_gate_history_entries"),
        "the gate's metrics changed shape: {gate_series:?}"
    );
    series.append(&mut gate_series);
    series
}

/// Labels Prometheus adds to every scraped series (the `ServiceMonitor`s' target labels and their
/// `node` relabelling).
const TARGET_LABELS: [&str; 3] = ["instance", "job", "node"];

fn verdicts() -> BTreeSet<&'static str> {
    use draingate::drain::Verdict;
    [
        Verdict::None,
        Verdict::Pending,
        Verdict::Pass,
        Verdict::Fail,
        Verdict::Unknown,
    ]
    .into_iter()
    .map(Verdict::as_str)
    .collect()
}

// ---------------------------------------------------------------------------------------------
// Just enough PromQL: the metrics an expression names, their matchers, the grouping labels.

/// A matcher: label, operator, value.
type Matcher = (String, String, String);

#[derive(Debug, Default)]
struct Scanned {
    /// Each selector: metric name and its matchers (label, operator, value).
    selectors: Vec<(String, Vec<Matcher>)>,
    /// Labels in `by`, `without`, `on`, `ignoring`, `group_left` and `group_right`.
    grouping: Vec<String>,
}

const GROUPING: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
/// Aggregation operators: a grouping clause may come between them and their parenthesis.
const AGGREGATIONS: [&str; 14] = [
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
const KEYWORDS: [&str; 7] = [
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "group_left",
    "group_right",
];

fn scan(expr: &str) -> Scanned {
    let c: Vec<char> = expr.chars().collect();
    let mut out = Scanned::default();
    let ident_start = |ch: char| ch.is_ascii_alphabetic() || ch == '_' || ch == ':';
    let ident_char = |ch: char| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':';
    let skip_ws = |mut i: usize| {
        while i < c.len() && c[i].is_whitespace() {
            i += 1;
        }
        i
    };
    let ident = |mut i: usize| {
        let start = i;
        while i < c.len() && ident_char(c[i]) {
            i += 1;
        }
        (c[start..i].iter().collect::<String>(), i)
    };
    // A quoted string starting at `i`: its content and the index after it.
    let string = |i: usize| {
        let quote = c[i];
        let mut j = i + 1;
        let mut s = String::new();
        while j < c.len() && c[j] != quote {
            if c[j] == '\\' && j + 1 < c.len() {
                j += 1;
            }
            s.push(c[j]);
            j += 1;
        }
        (s, j + 1)
    };
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        if ch == '"' || ch == '\'' || ch == '`' {
            i = string(i).1;
        } else if ch == '[' {
            while i < c.len() && c[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if ch.is_ascii_digit() || ch == '.' {
            while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '.') {
                i += 1;
            }
        } else if ident_start(ch) {
            let (word, end) = ident(i);
            let next = skip_ws(end);
            let paren = next < c.len() && c[next] == '(';
            if paren && GROUPING.contains(&word.as_str()) {
                let close = next + c[next..].iter().position(|&x| x == ')').expect(")");
                let list: String = c[next + 1..close].iter().collect();
                out.grouping.extend(
                    list.split(',')
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .map(str::to_owned),
                );
                i = close + 1;
            } else if paren
                || KEYWORDS.contains(&word.as_str())
                || AGGREGATIONS.contains(&word.as_str())
            {
                i = end;
            } else {
                let mut matchers = Vec::new();
                i = end;
                if next < c.len() && c[next] == '{' {
                    i = next + 1;
                    loop {
                        i = skip_ws(i);
                        if i >= c.len() || c[i] == '}' {
                            break;
                        }
                        if c[i] == ',' {
                            i += 1;
                            continue;
                        }
                        let (label, end) = ident(i);
                        assert!(!label.is_empty(), "{expr}: cannot read the matcher at {i}");
                        let mut j = skip_ws(end);
                        let op_start = j;
                        while j < c.len() && "=!~".contains(c[j]) {
                            j += 1;
                        }
                        let op: String = c[op_start..j].iter().collect();
                        let (value, after) = string(skip_ws(j));
                        matchers.push((label, op, value));
                        i = after;
                    }
                    i += 1;
                }
                out.selectors.push((word, matchers));
            }
        } else {
            assert!(ch != '{', "{expr}: a selector without a metric name");
            i += 1;
        }
    }
    out
}

/// Checks `expr` against what draingate exports; returns the labels its result may carry.
fn check_query(
    origin: &str,
    expr: &str,
    exported: &BTreeMap<String, BTreeSet<String>>,
) -> BTreeSet<String> {
    let scanned = scan(expr);
    assert!(
        !scanned.selectors.is_empty(),
        "{origin}: `{expr}` names no metric"
    );
    let mut labels: BTreeSet<String> = TARGET_LABELS.iter().map(|&l| l.to_owned()).collect();
    for (metric, matchers) in &scanned.selectors {
        let known = exported.get(metric).unwrap_or_else(|| {
            panic!(
                "{origin}: `{expr}` names {metric}, which draingate does not export \
                 (it exports {:?})",
                exported.keys().collect::<Vec<_>>()
            )
        });
        for (label, op, value) in matchers {
            assert!(
                known.contains(label) || TARGET_LABELS.contains(&label.as_str()),
                "{origin}: `{expr}`: {metric} has no label {label} (it has {known:?})"
            );
            if label == "verdict" && !value.starts_with('$') {
                let values: Vec<&str> = if op.contains('~') {
                    value.split('|').collect()
                } else {
                    vec![value.as_str()]
                };
                for v in values {
                    assert!(
                        verdicts().contains(v),
                        "{origin}: `{expr}`: no verdict is called {v:?} ({:?})",
                        verdicts()
                    );
                }
            }
        }
        labels.extend(known.iter().cloned());
    }
    for label in &scanned.grouping {
        assert!(
            labels.contains(label),
            "{origin}: `{expr}` groups by {label}, which none of its metrics carries"
        );
    }
    labels
}

/// The names in `{{name}}` (Grafana legends) or `{{ $labels.name }}` (alert annotations).
fn template_labels(text: &str) -> Vec<String> {
    text.split("{{")
        .skip(1)
        .filter_map(|s| s.split_once("}}"))
        .map(|(inner, _)| inner.trim())
        .filter(|inner| !inner.starts_with("$value"))
        .map(|inner| inner.trim_start_matches("$labels.").to_owned())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The custom resources the overlays add.

/// Checks a `ServiceMonitor` against the Services and workloads built with it; returns the
/// workloads it scrapes.
fn check_service_monitor(origin: &str, sm: &Value, docs: &[Value]) -> Vec<String> {
    let what = format!("{origin}: {}", name_of(sm));
    assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1", "{what}");
    let own = sm["metadata"]["namespace"].as_str().expect("namespace");
    let namespaces: Vec<&str> = match sm["spec"]["namespaceSelector"]["matchNames"].as_array() {
        Some(names) => names.iter().filter_map(Value::as_str).collect(),
        None => vec![own],
    };
    let selector = &sm["spec"]["selector"];
    assert!(
        selector["matchExpressions"].is_null(),
        "{what}: matchExpressions are not checked here"
    );
    let services: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "Service")
        .filter(|d| namespaces.contains(&d["metadata"]["namespace"].as_str().unwrap_or("default")))
        .filter(|d| matches(&selector["matchLabels"], &d["metadata"]["labels"]))
        .collect();
    assert!(!services.is_empty(), "{what} selects no Service");
    let endpoints = sm["spec"]["endpoints"].as_array().expect("endpoints");
    assert!(!endpoints.is_empty(), "{what}: no endpoints");
    let mut scraped = Vec::new();
    for endpoint in endpoints {
        let port = endpoint["port"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: an endpoint without a port name"));
        assert!(
            endpoint["path"].is_null() || endpoint["path"] == "/metrics",
            "{what}: the metrics are at /metrics, not {}",
            endpoint["path"]
        );
        // The series carry the judged pods' `namespace` and `pod`: without honorLabels
        // Prometheus renames them exported_namespace and exported_pod.
        assert_eq!(endpoint["honorLabels"], true, "{what}: honorLabels");
        for service in &services {
            let service_port = service["spec"]["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["name"] == port)
                .unwrap_or_else(|| panic!("{what}: {} has no port {port}", name_of(service)));
            let target = match &service_port["targetPort"] {
                Value::Null => service_port["port"].clone(),
                t => t.clone(),
            };
            let behind: Vec<&Value> = docs
                .iter()
                .filter(|d| is_workload(d))
                .filter(|d| d["metadata"]["namespace"] == service["metadata"]["namespace"])
                .filter(|d| {
                    matches(
                        &service["spec"]["selector"],
                        &d["spec"]["template"]["metadata"]["labels"],
                    )
                })
                .collect();
            assert!(
                !behind.is_empty(),
                "{what}: no pods behind {}",
                name_of(service)
            );
            for workload in behind {
                let found = containers(std::slice::from_ref(workload))
                    .into_iter()
                    .find_map(|(name, c)| {
                        c["ports"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .find(|p| match &target {
                                Value::String(t) => p["name"] == *t,
                                n => p["containerPort"] == *n,
                            })
                            .map(|p| (name, c, p["containerPort"].clone()))
                    });
                let (name, container, number) = found.unwrap_or_else(|| {
                    panic!(
                        "{what}: {}'s port {port} targets {target}, which no container of {} has",
                        name_of(service),
                        name_of(workload)
                    )
                });
                let http_addr = format!(":{number}");
                assert!(
                    container["args"].as_array().into_iter().flatten().any(|a| a
                        .as_str()
                        .is_some_and(|a| a.starts_with("--http-addr=") && a.ends_with(&http_addr))),
                    "{what}: {name} does not serve HTTP (/metrics) on {number}"
                );
                scraped.push(name_of(workload));
            }
        }
    }
    scraped
}

/// Checks a `PrometheusRule`'s expressions and annotations; returns its rules' expressions.
fn check_prometheus_rule(
    origin: &str,
    rule: &Value,
    exported: &BTreeMap<String, BTreeSet<String>>,
) -> Vec<String> {
    let what = format!("{origin}: {}", name_of(rule));
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1", "{what}");
    let mut exprs = Vec::new();
    for group in rule["spec"]["groups"].as_array().expect("groups") {
        for r in group["rules"].as_array().expect("rules") {
            let name = r["alert"]
                .as_str()
                .or(r["record"].as_str())
                .unwrap_or_else(|| panic!("{what}: a rule with neither alert nor record"));
            let expr = r["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("{what}: {name} has no expr"));
            let labels = check_query(&format!("{what}: {name}"), expr, exported);
            if !r["for"].is_null() {
                let d = r["for"].as_str().expect("for: a duration");
                assert!(
                    is_duration(d),
                    "{what}: {name}: `for: {d}` is not a duration"
                );
            }
            for (key, text) in r["annotations"].as_object().into_iter().flatten() {
                for label in template_labels(text.as_str().unwrap_or("")) {
                    assert!(
                        labels.contains(&label),
                        "{what}: {name}'s {key} names label {label}, which its expr has not"
                    );
                }
            }
            exprs.push(expr.to_owned());
        }
    }
    exprs
}

/// A Prometheus duration such as `5m` or `1h30m`.
fn is_duration(d: &str) -> bool {
    let mut digits = false;
    for ch in d.chars() {
        if ch.is_ascii_digit() {
            digits = true;
        } else if "smhdwy".contains(ch) && digits {
            digits = false;
        } else {
            return false;
        }
    }
    !d.is_empty() && !digits
}

// ---------------------------------------------------------------------------------------------

#[test]
fn every_kustomization_builds_and_what_it_builds_holds_together() {
    let exported = exported();
    let mut monitored = BTreeSet::new();
    let mut rules = Vec::new();
    for dir in kustomizations() {
        let docs = kustomize(&dir);
        let origin = format!("kubectl kustomize {dir}");
        let mut kinds = BTreeSet::new();
        for doc in &docs {
            let kind = doc["kind"].as_str().unwrap_or("<none>");
            match kind {
                _ if common::check_builtin(&origin, doc) => {}
                "ServiceMonitor" => monitored.extend(check_service_monitor(&origin, doc, &docs)),
                "PrometheusRule" => rules.extend(check_prometheus_rule(&origin, doc, &exported)),
                other => panic!("{origin}: unexpected kind {other} ({})", name_of(doc)),
            }
            kinds.insert(kind);
        }
        // Every build is a whole install.
        for expected in ["Namespace", "DaemonSet", "Deployment", "Service"] {
            assert!(kinds.contains(expected), "{origin}: no {expected}");
        }
    }
    for workload in [
        "DaemonSet draingate/draingate-agent",
        "Deployment draingate/draingate-gate",
    ] {
        assert!(
            monitored.contains(workload),
            "no ServiceMonitor scrapes {workload}: {monitored:?}"
        );
    }
    // The alerts the install promises: failed drains (per pod and per rollout), lost events.
    let alerted = |metric: &str, verdict: Option<&str>| {
        rules.iter().any(|expr| {
            scan(expr).selectors.iter().any(|(m, matchers)| {
                m == metric
                    && verdict.is_none_or(|v| {
                        matchers
                            .iter()
                            .any(|(l, op, value)| l == "verdict" && op == "=" && value == v)
                    })
            })
        })
    };
    assert!(alerted("draingate_pod_verdict", Some("fail")), "{rules:?}");
    assert!(
        alerted("draingate_gate_rollout_verdict", Some("fail")),
        "{rules:?}"
    );
    assert!(alerted("draingate_lost_events_total", None), "{rules:?}");
}

#[test]
fn the_image_is_named_once_and_the_image_overlay_changes_every_container() {
    let version = env!("CARGO_PKG_VERSION");
    let base = read_yaml("deploy/base/kustomization.yaml");
    let entries = base["images"].as_array().expect("deploy/base: images");
    assert_eq!(entries.len(), 1, "one image for the agent and the gate");
    let name = entries[0]["name"].as_str().expect("images[0].name");
    assert_eq!(
        entries[0]["newTag"], version,
        "deploy/base/kustomization.yaml: the image's tag is the release's version"
    );
    let released = format!("{name}:{version}");

    // The manifests themselves say the same, so that `kubectl apply -f` on one file agrees.
    let mut raw = Vec::new();
    for entry in std::fs::read_dir(root().join("deploy/base")).expect("deploy/base") {
        let path = entry.expect("entry").path();
        if path.file_name().is_some_and(|n| n == "kustomization.yaml") {
            continue;
        }
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(&path).expect("read");
        raw.extend(common::documents(&origin, &text));
    }
    let raw_containers = containers(&raw);
    assert!(raw_containers.len() >= 2, "{raw_containers:?}");
    for (container, c) in &raw_containers {
        assert_eq!(c["image"], released.as_str(), "deploy/base: {container}");
    }

    let built = kustomize("deploy");
    let built_containers = containers(&built);
    assert_eq!(built_containers.len(), raw_containers.len());
    for (container, c) in &built_containers {
        assert_eq!(c["image"], released.as_str(), "deploy/: {container}");
    }

    let overlay = read_yaml("deploy/overlays/image/kustomization.yaml");
    let entry = &overlay["images"][0];
    assert_eq!(
        entry["name"], name,
        "the image overlay names the base's image"
    );
    let new_name = entry["newName"].as_str().unwrap_or(name);
    let wanted = match (entry["newTag"].as_str(), entry["digest"].as_str()) {
        (_, Some(digest)) => format!("{new_name}@{digest}"),
        (Some(tag), None) => format!("{new_name}:{tag}"),
        (None, None) => format!("{new_name}:{version}"),
    };
    assert_ne!(wanted, released, "the image overlay changes nothing");
    let overlaid = kustomize("deploy/overlays/image");
    let overlaid_containers = containers(&overlaid);
    let names = |list: &[(String, &Value)]| list.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&overlaid_containers), names(&built_containers));
    for (container, c) in &overlaid_containers {
        assert_eq!(
            c["image"],
            wanted.as_str(),
            "deploy/overlays/image: {container}"
        );
    }
}

#[test]
fn the_dashboard_asks_only_for_what_draingate_exports() {
    let path = "deploy/grafana/draingate-dashboard.json";
    let text = std::fs::read_to_string(root().join(path)).expect(path);
    let dashboard: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    let exported = exported();

    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("templating");
    assert!(
        variables
            .iter()
            .any(|v| v["name"] == "datasource" && v["type"] == "datasource"),
        "{path}: no datasource variable"
    );
    for variable in variables.iter().filter(|v| v["type"] == "query") {
        let definition = variable["definition"].as_str().expect("definition");
        let inner = definition
            .strip_prefix("label_values(")
            .and_then(|d| d.strip_suffix(')'))
            .unwrap_or_else(|| panic!("{path}: variable {definition}"));
        let (metric, label) = inner.split_once(',').expect("label_values(metric, label)");
        let labels = check_query(path, metric.trim(), &exported);
        assert!(labels.contains(label.trim()), "{path}: {definition}");
    }

    let mut panels: Vec<&Value> = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        panels.push(panel);
        panels.extend(panel["panels"].as_array().into_iter().flatten());
    }
    let mut ids = BTreeSet::new();
    let mut titles = BTreeSet::new();
    let mut named = BTreeSet::new();
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        let title = panel["title"].as_str().unwrap_or("");
        assert!(!title.is_empty(), "{path}: a panel without a title");
        assert!(titles.insert(title), "{path}: two panels titled {title}");
        assert!(
            ids.insert(panel["id"].to_string()),
            "{path}: id {}",
            panel["id"]
        );
        let origin = format!("{path}: {title}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{origin}: no query");
        for target in targets {
            assert_eq!(target["datasource"]["uid"], "${datasource}", "{origin}");
            let expr = target["expr"].as_str().expect("expr");
            let labels = check_query(&origin, expr, &exported);
            for label in template_labels(target["legendFormat"].as_str().unwrap_or("")) {
                assert!(labels.contains(&label), "{origin}: legend {{{{{label}}}}}");
            }
            named.extend(scan(expr).selectors.into_iter().map(|(m, _)| m));
        }
    }
    // One panel per question asked during a rollout: which pods terminate, what they still
    // hold, errors by kind, verdicts, lost events.
    for metric in [
        "draingate_pod_verdict",
        "draingate_pod_open_connections",
        "draingate_pod_resets_sent_total",
        "draingate_pod_resets_received_total",
        "draingate_pod_refused_total",
        "draingate_pod_peer_failures_total",
        "draingate_pod_http_responses_total",
        "draingate_pod_requests_cut_total",
        "draingate_pod_http2_resets_total",
        "draingate_pod_drain_errors",
        "draingate_lost_events_total",
        "draingate_gate_rollout_verdict",
    ] {
        assert!(named.contains(metric), "{path}: no panel shows {metric}");
    }
}

#[test]
fn the_promql_scanner_reads_what_the_checks_rely_on() {
    let s = scan(concat!(
        r#"max by (namespace, pod) (a_b{verdict=~"fail|unknown", ns="x,}"}"#,
        " and on (uid) c[5m]) > 0.5",
    ));
    assert_eq!(
        s.selectors,
        [
            (
                "a_b".to_owned(),
                vec![
                    (
                        "verdict".to_owned(),
                        "=~".to_owned(),
                        "fail|unknown".to_owned()
                    ),
                    ("ns".to_owned(), "=".to_owned(), "x,}".to_owned()),
                ]
            ),
            ("c".to_owned(), vec![]),
        ]
    );
    assert_eq!(s.grouping, ["namespace", "pod", "uid"]);
    assert_eq!(
        template_labels("{{ $labels.pod }} {{namespace}} {{ $value }}"),
        ["pod", "namespace"]
    );
}

/// The agent container's seccompProfile in what `kubectl kustomize DIR` prints.
fn agent_seccomp(dir: &str) -> Value {
    let docs = kustomize(dir);
    let agent = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet" && d["metadata"]["name"] == "draingate-agent")
        .unwrap_or_else(|| panic!("{dir}: no agent DaemonSet"));
    agent["spec"]["template"]["spec"]["containers"][0]["securityContext"]["seccompProfile"].clone()
}

#[test]
fn the_agent_runs_under_the_runtime_default_or_the_seccomp_overlay_s_own_profile() {
    // The base: the runtime's default, never Unconfined (deploy/base/agent.yaml says which
    // runtimes' defaults let bpf() and perf_event_open() through).
    for dir in ["deploy", "deploy/base"] {
        assert_eq!(
            agent_seccomp(dir),
            serde_json::json!({"type": "RuntimeDefault"}),
            "{dir}"
        );
    }
    // The overlay: draingate's profile, by a path under the kubelet's seccomp root that
    // deploy/seccomp/ holds (tests/tests/image.rs runs the agent under it).
    let overlay = agent_seccomp("deploy/overlays/seccomp");
    assert_eq!(overlay["type"], "Localhost", "{overlay}");
    let file = overlay["localhostProfile"]
        .as_str()
        .expect("localhostProfile");
    let path = root().join("deploy/seccomp").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let profile: Value = serde_json::from_str(&text).expect("the profile is JSON");

    // Refused unless listed; listed are only allow rules, and errno rules that refuse.
    assert_eq!(profile["defaultAction"], "SCMP_ACT_ERRNO", "{profile}");
    assert!(
        profile.get("defaultErrnoRet").is_none(),
        "EPERM, the default"
    );
    let mut allowed = BTreeSet::new();
    for rule in profile["syscalls"].as_array().expect("syscalls") {
        let names = rule["names"].as_array().expect("names");
        match rule["action"].as_str() {
            Some("SCMP_ACT_ALLOW") => {
                allowed.extend(names.iter().map(|n| n.as_str().expect("a name").to_owned()));
            }
            Some("SCMP_ACT_ERRNO") => {}
            other => panic!("action {other:?} in {rule}"),
        }
    }
    // What the agent needs beyond an ordinary program.
    for needed in [
        "bpf",
        "perf_event_open",
        "ioctl",
        "socket",
        "flock",
        "execve",
    ] {
        assert!(allowed.contains(needed), "{needed} is not allowed");
    }
    // What it must never get: it enters no namespace, mounts nothing, traces no process, and
    // touches no keyring, module, kexec image, clock or swap.
    for refused in [
        "mount",
        "umount2",
        "fsopen",
        "fsmount",
        "move_mount",
        "open_tree",
        "pivot_root",
        "chroot",
        "unshare",
        "setns",
        "clone3",
        "ptrace",
        "process_vm_readv",
        "process_vm_writev",
        "pidfd_getfd",
        "kcmp",
        "keyctl",
        "add_key",
        "request_key",
        "init_module",
        "finit_module",
        "delete_module",
        "kexec_load",
        "kexec_file_load",
        "reboot",
        "swapon",
        "swapoff",
        "settimeofday",
        "clock_settime",
        "adjtimex",
        "open_by_handle_at",
        "name_to_handle_at",
        "userfaultfd",
        "io_uring_setup",
        "personality",
        "iopl",
        "ioperm",
        "syslog",
        "acct",
    ] {
        assert!(!allowed.contains(refused), "{refused} is allowed");
    }
    // clone only without namespace flags; sockets of the families the agent uses.
    let conditional: Vec<&Value> = profile["syscalls"]
        .as_array()
        .expect("syscalls")
        .iter()
        .filter(|r| r["args"].as_array().is_some_and(|a| !a.is_empty()))
        .collect();
    for rule in &conditional {
        let names = &rule["names"];
        assert!(
            names == &serde_json::json!(["clone"]) || names == &serde_json::json!(["socket"]),
            "{rule}"
        );
    }
    // The count docs/install.md gives.
    assert_eq!(allowed.len(), 167, "{allowed:?}");
}

#[test]
fn the_hold_overlay_runs_the_gate_with_hold_as_the_service_account_its_rbac_binds() {
    let docs = kustomize("deploy/overlays/hold");
    let gate = docs
        .iter()
        .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == "draingate-gate")
        .expect("the gate's Deployment");
    let spec = &gate["spec"]["template"]["spec"];
    let args = spec["containers"][0]["args"].as_array().expect("args");
    assert!(args.iter().any(|a| a == "--hold"), "{args:?}");
    assert_eq!(spec["automountServiceAccountToken"], true);
    let binding = docs
        .iter()
        .find(|d| {
            d["kind"] == "ClusterRoleBinding" && d["metadata"]["name"] == "draingate-gate-hold"
        })
        .expect("the gate's ClusterRoleBinding");
    assert_eq!(binding["subjects"][0]["kind"], "ServiceAccount");
    assert_eq!(
        (
            &binding["subjects"][0]["name"],
            &binding["subjects"][0]["namespace"]
        ),
        (&spec["serviceAccountName"], &gate["metadata"]["namespace"])
    );
    // Read pods, write their status, record Events, read and pause a Deployment, write its own
    // webhook's caBundle: nothing else (tests/tests/hold.rs runs the gate with exactly this on
    // a real API server).
    let role = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == "draingate-gate-hold")
        .expect("the gate's ClusterRole");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(
        granted(role),
        set(&[
            "deployments get",
            "deployments patch",
            "events create",
            "events patch",
            "mutatingwebhookconfigurations get draingate-gate",
            "mutatingwebhookconfigurations update draingate-gate",
            "pods get",
            "pods list",
            "pods watch",
            "pods/status patch",
        ])
    );
    // In its own namespace: its Lease and its webhook Secret, by name but for create.
    let local = docs
        .iter()
        .find(|d| d["kind"] == "Role" && d["metadata"]["name"] == "draingate-gate-hold")
        .expect("the gate's Role");
    assert_eq!(
        local["metadata"]["namespace"],
        gate["metadata"]["namespace"]
    );
    assert!(docs.iter().any(|d| d["kind"] == "RoleBinding"
        && d["roleRef"]["name"] == "draingate-gate-hold"
        && d["subjects"][0]["name"] == spec["serviceAccountName"]));
    assert_eq!(
        granted(local),
        set(&[
            "leases create",
            "leases get draingate-gate",
            "leases update draingate-gate",
            "secrets create",
            "secrets get draingate-gate-webhook",
            "secrets update draingate-gate-webhook",
        ])
    );
    // Two replicas, and a webhook that never blocks pod creation, reaches the gate's webhook
    // port through a Service, and only in labelled namespaces.
    assert_eq!(gate["spec"]["replicas"], 2);
    assert!(
        args.iter().any(|a| a == "--webhook-addr=0.0.0.0:9563"),
        "{args:?}"
    );
    let webhook = docs
        .iter()
        .find(|d| d["kind"] == "MutatingWebhookConfiguration")
        .expect("the MutatingWebhookConfiguration");
    let hook = &webhook["webhooks"][0];
    assert_eq!(hook["failurePolicy"], "Ignore");
    assert_eq!(hook["sideEffects"], "None");
    assert_eq!(
        hook["namespaceSelector"]["matchLabels"]["draingate.io/hold"],
        "enabled"
    );
    assert_eq!(hook["rules"][0]["operations"][0], "CREATE");
    let service = &hook["clientConfig"]["service"];
    let target = docs
        .iter()
        .find(|d| {
            d["kind"] == "Service"
                && d["metadata"]["name"] == service["name"]
                && d["metadata"]["namespace"] == service["namespace"]
        })
        .expect("the webhook's Service");
    assert!(matches(
        &target["spec"]["selector"],
        &gate["spec"]["template"]["metadata"]["labels"]
    ));
    let port = target["spec"]["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["port"] == service["port"])
        .expect("the webhook's Service port");
    let container_ports = spec["containers"][0]["ports"].as_array().expect("ports");
    assert!(
        container_ports
            .iter()
            .any(|p| p["name"] == port["targetPort"] && p["containerPort"] == 9563),
        "{container_ports:?}"
    );
    // The certificate the gate makes is for that Service's name (the flag's default).
    let help = Command::new(env!("CARGO_BIN_EXE_draingate"))
        .args(["gate", "serve", "--help"])
        .output()
        .expect("draingate gate serve --help");
    let help = String::from_utf8_lossy(&help.stdout);
    let name = format!(
        "{}.{}.svc",
        service["name"].as_str().expect("a name"),
        service["namespace"].as_str().expect("a namespace")
    );
    assert!(help.contains(&name), "--webhook-names defaults to {name}");
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// A role's grants, as "resource verb [name]".
fn granted(role: &Value) -> BTreeSet<String> {
    let mut grants = BTreeSet::new();
    for rule in role["rules"].as_array().expect("rules") {
        let names: Vec<&str> = rule["resourceNames"]
            .as_array()
            .map(|n| n.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        for resource in rule["resources"].as_array().into_iter().flatten() {
            for verb in rule["verbs"].as_array().into_iter().flatten() {
                let grant = format!(
                    "{} {}",
                    resource.as_str().unwrap_or("?"),
                    verb.as_str().unwrap_or("?")
                );
                for name in &names {
                    grants.insert(format!("{grant} {name}"));
                }
                if names.is_empty() {
                    grants.insert(grant);
                }
            }
        }
    }
    grants
}
