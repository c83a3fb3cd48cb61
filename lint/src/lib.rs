//! `draingate lint`: checks Deployments and Argo Rollouts against the practices that keep a
//! rolling update from losing requests. Each finding names the line, why it loses requests, and
//! the fix. Rules (ids as printed):
//! - `strategy`: Recreate stops every pod before starting new ones (error); a rolling update
//!   with `maxUnavailable` above 0 serves with fewer pods meanwhile (warning) and with no surge
//!   at all cannot proceed without taking pods away (error when both are 0).
//! - `readiness-probe`: a container without one gets traffic before it listens (error).
//! - `pre-stop`: without a preStop hook SIGTERM arrives while Services still route to the pod
//!   (error); a sleep shorter than endpoint propagation only narrows the gap (warning).
//! - `pre-stop-signals-app`: a preStop that signals the app (`kill -TERM 1; sleep 45`) stops it
//!   before its endpoints are removed (error).
//! - `grace-period`: terminationGracePeriodSeconds at most the preStop leaves no time to drain
//!   (error); less than 5 s after it is tight (warning).
//! - `pod-disruption-budget`: no `PodDisruptionBudget` in the same files selects the pods of a
//!   workload with more than one replica, so a node drain may evict every replica at once
//!   (warning).

use std::{fmt::Write as _, time::Duration};

use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Container, PodTemplateSpec},
    policy::v1::PodDisruptionBudget,
};
use serde::Serialize;
use serde_json::Value;

/// How bad a finding is: errors lose requests on every rollout; warnings can.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub file: String,
    pub line: usize,
    pub severity: Severity,
    pub rule: &'static str,
    /// `Deployment shop/web`, with the container when it is about one.
    pub object: String,
    /// Why it loses requests.
    pub message: String,
    pub fix: String,
}

/// Why a file could not be linted.
#[derive(Debug, thiserror::Error)]
pub enum LintError {
    #[error("cannot read {file}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{file}: larger than {} MiB; lint reads manifests, not archives (split the file)",
        MAX_INPUT / 1024 / 1024
    )]
    TooLarge { file: String },
    #[error("{file}:{line}: not valid YAML: {message}")]
    Yaml {
        file: String,
        line: usize,
        message: String,
    },
    #[error(
        "{file}:{line}: not a Kubernetes object (it has no apiVersion and kind); lint reads \
         Kubernetes manifests"
    )]
    NotKubernetes { file: String, line: usize },
    #[error("{file}:{line}: invalid {kind}: {message}")]
    Invalid {
        file: String,
        line: usize,
        kind: String,
        message: String,
    },
}

/// Endpoint removal reaches kube-proxy, ingress controllers and cloud load balancers within
/// about this long; a preStop sleep shorter than it leaves a gap.
pub const PROPAGATION: Duration = Duration::from_secs(5);

/// Largest file lint reads (manifests are kilobytes; a bound keeps a huge or endless input from
/// taking the machine's memory).
pub const MAX_INPUT: u64 = 4 * 1024 * 1024;

/// Reads at most [`MAX_INPUT`] bytes of `reader` (the file `file`) as text; more is an error.
pub fn read_bounded(file: &str, reader: impl std::io::Read) -> Result<String, LintError> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    reader
        .take(MAX_INPUT + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| LintError::Read {
            file: file.into(),
            source,
        })?;
    if bytes.len() as u64 > MAX_INPUT {
        return Err(LintError::TooLarge { file: file.into() });
    }
    String::from_utf8(bytes).map_err(|e| LintError::Read {
        file: file.into(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })
}

/// One document of a file: its parsed value and where it is.
struct Document {
    value: Value,
    /// 1-based line of `lines[0]` in the file.
    first_line: usize,
    /// 1-based line of the document's first content (not a comment, blank or `---`).
    head: usize,
    /// The document's text, from its `---` (or the file's start) to the next one.
    lines: Vec<String>,
}

impl Document {
    /// The line of the value at `path` (keys; `name=X` steps into the list item named X), or
    /// of the deepest part of it that exists: a heuristic over the text, as YAML parsers keep no
    /// positions in values.
    fn line_of(&self, path: &[&str]) -> usize {
        let mut line = 0;
        let mut indent: Option<usize> = None;
        for key in path {
            let start = line;
            let found = self
                .lines
                .iter()
                .enumerate()
                .skip(start)
                .find_map(|(i, text)| {
                    let trimmed = text.trim_start();
                    let this_indent = text.len() - trimmed.len();
                    if i > start && indent.is_some_and(|d| this_indent <= d) && !trimmed.is_empty()
                    {
                        // Left the parent's block.
                        return Some(None);
                    }
                    let item = trimmed.strip_prefix("- ").unwrap_or(trimmed);
                    let matches = if let Some(name) = key.strip_prefix("name=") {
                        let value = item
                            .strip_prefix("name:")
                            .map(|v| v.trim().trim_matches(['"', '\'']));
                        value == Some(name)
                    } else {
                        item.starts_with(&format!("{key}:"))
                    };
                    (matches && (i > start || line == 0)).then_some(Some((i, this_indent)))
                });
            match found.flatten() {
                Some((i, d)) => {
                    line = i;
                    indent = Some(d);
                }
                None => break,
            }
        }
        self.first_line + line
    }
}

/// Whether `line` starts a YAML document: `---` at column 0, alone or followed by a space (a
/// `---` there can be nothing else, not even inside a block scalar).
fn is_document_start(line: &str) -> bool {
    line.strip_prefix("---")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r']))
}

/// Whether `line` holds YAML content (not blank, a comment, a directive or a bare marker).
fn is_content(line: &str) -> bool {
    let trimmed = line.trim();
    !(trimmed.is_empty()
        || trimmed.starts_with('#')
        || line.starts_with('%')
        || trimmed == "---"
        || trimmed == "...")
}

/// A YAML error's line in the file: its location within a document that starts at `offset`
/// (0-based), else `fallback`.
fn yaml_line(e: &serde_yaml_ng::Error, offset: usize, fallback: usize) -> usize {
    e.location().map_or(fallback, |l| offset + l.line())
}

/// A YAML error's message with every `line N` in it made a line of the file (the parser counts
/// from the start of the document it was given).
fn yaml_message(e: &serde_yaml_ng::Error, offset: usize) -> String {
    let text = e.to_string();
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(at) = rest.find("line ") {
        let (before, after) = rest.split_at(at + "line ".len());
        out.push_str(before);
        let digits = after.len() - after.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        match after[..digits].parse::<usize>() {
            Ok(n) => out.push_str(&(n + offset).to_string()),
            Err(_) => out.push_str(&after[..digits]),
        }
        rest = &after[digits..];
    }
    out.push_str(rest);
    out
}

/// The file's documents, each parsed on its own so that every line reported is the file's: the
/// text is cut at each `---`; what precedes the first one is a document only if it has content.
fn split_documents(file: &str, text: &str) -> Result<Vec<Document>, LintError> {
    let all: Vec<&str> = text.lines().collect();
    let mut starts: Vec<usize> = vec![0];
    starts.extend(
        all.iter()
            .enumerate()
            .skip(1)
            .filter(|(_, l)| is_document_start(l))
            .map(|(i, _)| i),
    );
    let mut documents = Vec::new();
    for (n, &start) in starts.iter().enumerate() {
        let end = starts.get(n + 1).copied().unwrap_or(all.len());
        let lines = &all[start..end];
        let Some(head) = lines.iter().position(|l| is_content(l)) else {
            continue;
        };
        let head = start + head + 1;
        let mut segment = lines.join("\n");
        segment.push('\n');
        for doc in serde_yaml_ng::Deserializer::from_str(&segment) {
            let value: Value =
                serde::Deserialize::deserialize(doc).map_err(|e| LintError::Yaml {
                    file: file.into(),
                    line: yaml_line(&e, start, head),
                    message: yaml_message(&e, start),
                })?;
            if value.is_null() {
                continue;
            }
            documents.push(Document {
                value,
                first_line: start + 1,
                head,
                lines: lines.iter().map(|l| (*l).to_owned()).collect(),
            });
        }
    }
    Ok(documents)
}

/// `T` read from the document's own text, for the line of what makes it invalid (a value has
/// no positions; the text has).
fn typed_error_line<T: serde::de::DeserializeOwned>(doc: &Document) -> usize {
    match serde_yaml_ng::from_str::<T>(&(doc.lines.join("\n") + "\n")) {
        Err(e) => yaml_line(&e, doc.first_line - 1, doc.head),
        Ok(_) => doc.head,
    }
}

/// The workload a document describes, when it is one lint checks.
struct Workload<'a> {
    doc: &'a Document,
    file: &'a str,
    kind: &'static str,
    name: String,
    template: PodTemplateSpec,
    replicas: i32,
    /// Deployment strategy, resolved: (type, maxSurge, maxUnavailable) as written.
    strategy: Option<(String, Option<String>, Option<String>)>,
}

/// `doc` is not a valid `T` (of kind `kind`): the error at the line that makes it so.
fn invalid<T: serde::de::DeserializeOwned>(
    file: &str,
    doc: &Document,
    kind: &str,
    message: &dyn std::fmt::Display,
) -> LintError {
    LintError::Invalid {
        file: file.into(),
        line: typed_error_line::<T>(doc),
        kind: kind.into(),
        message: message.to_string(),
    }
}

/// What lint reads of an Argo Rollout (the rest it ignores).
#[derive(serde::Deserialize)]
#[expect(dead_code, reason = "read only for the line of an error in it")]
struct RolloutTemplate {
    spec: RolloutSpec,
}

#[derive(serde::Deserialize)]
#[expect(dead_code, reason = "read only for the line of an error in it")]
struct RolloutSpec {
    template: PodTemplateSpec,
}

fn int_or_string(
    v: Option<&k8s_openapi::apimachinery::pkg::util::intstr::IntOrString>,
) -> Option<String> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    v.map(|v| match v {
        IntOrString::Int(n) => n.to_string(),
        IntOrString::String(s) => s.clone(),
    })
}

/// Lints the files' documents together (a `PodDisruptionBudget` in one file covers a Deployment
/// in another). Findings come sorted by file and line.
pub fn lint(files: &[(String, String)]) -> Result<Vec<Finding>, LintError> {
    let mut parsed = Vec::new();
    for (file, text) in files {
        if text.len() as u64 > MAX_INPUT {
            return Err(LintError::TooLarge { file: file.clone() });
        }
        parsed.push((file.as_str(), split_documents(file, text)?));
    }
    let mut workloads = Vec::new();
    let mut budgets: Vec<PodDisruptionBudget> = Vec::new();
    for (file, docs) in &parsed {
        for doc in docs {
            let kind = doc.value.get("kind").and_then(Value::as_str);
            let api = doc.value.get("apiVersion").and_then(Value::as_str);
            let (Some(kind), Some(api)) = (kind, api) else {
                return Err(LintError::NotKubernetes {
                    file: (*file).into(),
                    line: doc.head,
                });
            };
            match (kind, api) {
                ("Deployment", _) => {
                    let d: Deployment = serde_json::from_value(doc.value.clone())
                        .map_err(|e| invalid::<Deployment>(file, doc, kind, &e))?;
                    let spec = d.spec;
                    let strategy = spec.strategy.unwrap_or_default();
                    let rolling = strategy.rolling_update.unwrap_or_default();
                    workloads.push(Workload {
                        doc,
                        file,
                        kind: "Deployment",
                        name: name_of(&d.metadata),
                        template: spec.template,
                        replicas: spec.replicas.unwrap_or(1),
                        strategy: Some((
                            strategy.type_.unwrap_or_else(|| "RollingUpdate".into()),
                            int_or_string(rolling.max_surge.as_ref()),
                            int_or_string(rolling.max_unavailable.as_ref()),
                        )),
                    });
                }
                ("Rollout", a) if a.starts_with("argoproj.io/") => {
                    let template: PodTemplateSpec = serde_json::from_value(
                        doc.value["spec"]["template"].clone(),
                    )
                    .map_err(|e| {
                        invalid::<RolloutTemplate>(file, doc, kind, &format!("spec.template: {e}"))
                    })?;
                    let metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta =
                        serde_json::from_value(doc.value["metadata"].clone()).unwrap_or_default();
                    workloads.push(Workload {
                        doc,
                        file,
                        kind: "Rollout",
                        name: name_of(&metadata),
                        template,
                        replicas: doc.value["spec"]["replicas"]
                            .as_i64()
                            .and_then(|n| i32::try_from(n).ok())
                            .unwrap_or(1),
                        strategy: None,
                    });
                }
                ("PodDisruptionBudget", _) => {
                    budgets.push(
                        serde_json::from_value(doc.value.clone())
                            .map_err(|e| invalid::<PodDisruptionBudget>(file, doc, kind, &e))?,
                    );
                }
                _ => {}
            }
        }
    }
    let mut findings = Vec::new();
    for w in &workloads {
        check(w, &budgets, &mut findings);
    }
    findings.sort_by(|a, b| (&a.file, a.line, a.rule).cmp(&(&b.file, b.line, b.rule)));
    Ok(findings)
}

fn name_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or("<unnamed>")
    )
}

/// The preStop hook's sleep, if it is one: native `sleep`, or exec `sleep N` (also via a shell).
fn pre_stop_sleep(c: &Container) -> Option<Duration> {
    let hook = c.lifecycle.as_ref()?.pre_stop.as_ref()?;
    if let Some(sleep) = &hook.sleep {
        return u64::try_from(sleep.seconds).ok().map(Duration::from_secs);
    }
    let command = hook.exec.as_ref()?.command.as_ref()?.join(" ");
    let words: Vec<&str> = command
        .split(|ch: char| ch.is_whitespace() || ch == ';')
        .collect();
    words
        .windows(2)
        .find(|w| w[0] == "sleep" || w[0].ends_with("/sleep"))
        .and_then(|w| {
            w[1].trim_matches(|c| c == '"' || c == '\'')
                .parse::<f64>()
                .ok()
        })
        .and_then(sleep_duration)
}

/// A `sleep` argument in seconds as a duration: `infinity` (or one too long for a duration)
/// sleeps for ever, which is [`Duration::MAX`] here; a negative or NaN one is no sleep at all.
pub(crate) fn sleep_duration(seconds: f64) -> Option<Duration> {
    if seconds.is_nan() || seconds < 0.0 {
        return None;
    }
    Some(Duration::try_from_secs_f64(seconds).unwrap_or(Duration::MAX))
}

/// Whether the preStop signals the app itself before the endpoints are gone.
fn pre_stop_signals(c: &Container) -> Option<String> {
    let hook = c.lifecycle.as_ref()?.pre_stop.as_ref()?;
    let command = hook.exec.as_ref()?.command.as_ref()?.join(" ");
    let words: Vec<&str> = command
        .split(|ch: char| ch.is_whitespace() || ch == ';' || ch == '&' || ch == '|')
        .filter(|w| !w.is_empty())
        .collect();
    let signals = words
        .iter()
        .any(|w| matches!(*w, "kill" | "pkill" | "killall") || w.ends_with("/kill"))
        || command.contains("-s quit")
        || command.contains("-s stop");
    signals.then_some(command)
}

fn check(w: &Workload<'_>, budgets: &[PodDisruptionBudget], out: &mut Vec<Finding>) {
    let object = format!("{} {}", w.kind, w.name);
    let mut push = |path: &[&str],
                    severity: Severity,
                    rule: &'static str,
                    object: &str,
                    message: String,
                    fix: String| {
        out.push(Finding {
            file: w.file.into(),
            line: w.doc.line_of(path),
            severity,
            rule,
            object: object.into(),
            message,
            fix,
        });
    };
    if let Some((kind, surge, unavailable)) = &w.strategy {
        if kind == "Recreate" {
            push(
                &["spec", "strategy", "type"],
                Severity::Error,
                "strategy",
                &object,
                "strategy Recreate stops every old pod before any new one is ready: every request \
                 in between fails"
                    .into(),
                "use type: RollingUpdate with maxSurge: 1 (or 25%) and maxUnavailable: 0".into(),
            );
        } else {
            let zero = |v: &Option<String>, default: &str| {
                let v = v.as_deref().unwrap_or(default);
                v == "0" || v == "0%"
            };
            let no_surge = zero(surge, "25%");
            let no_unavailable = zero(unavailable, "25%");
            if no_surge && no_unavailable {
                push(
                    &["spec", "strategy"],
                    Severity::Error,
                    "strategy",
                    &object,
                    "maxSurge and maxUnavailable are both 0: the rollout can neither add nor \
                     remove a pod (the API server rejects it)"
                        .into(),
                    "maxSurge: 1, maxUnavailable: 0".into(),
                );
            } else if !no_unavailable {
                push(
                    &["spec", "strategy"],
                    Severity::Warning,
                    "strategy",
                    &object,
                    format!(
                        "maxUnavailable {} takes pods away before their replacements are ready: \
                         the rest must carry their load, and a slow start or a failing probe \
                         leaves the Service short",
                        unavailable.as_deref().unwrap_or("25% (the default)")
                    ),
                    "maxUnavailable: 0 with maxSurge: 1 (or 25%): a new pod is ready before an \
                     old one goes"
                        .into(),
                );
            }
        }
    }
    let spec = w.template.spec.clone().unwrap_or_default();
    let grace = Duration::from_secs(
        u64::try_from(spec.termination_grace_period_seconds.unwrap_or(30)).unwrap_or(0),
    );
    let mut longest_pre_stop = Duration::ZERO;
    for (i, c) in spec.containers.iter().enumerate() {
        let object = format!("{object}, container {}", c.name);
        let item = format!("name={}", c.name);
        let path = |key: &'static str| -> Vec<&str> {
            let mut p = vec!["spec", "template", "spec", "containers", item.as_str()];
            if !key.is_empty() {
                p.push(key);
            }
            p
        };
        let serves = c.ports.as_ref().is_some_and(|p| !p.is_empty()) || i == 0;
        if serves && c.readiness_probe.is_none() {
            push(
                &path(""),
                Severity::Error,
                "readiness-probe",
                &object,
                "no readinessProbe: the pod joins the Service endpoints as soon as it starts, \
                 before the app listens, so the first requests are refused"
                    .into(),
                "add readinessProbe (httpGet on a health path, or tcpSocket on the port), \
                 periodSeconds 1-5"
                    .into(),
            );
        }
        if let Some(command) = pre_stop_signals(c) {
            push(
                &path("lifecycle"),
                Severity::Error,
                "pre-stop-signals-app",
                &object,
                format!(
                    "preStop `{command}` signals the app while the Service still routes to the \
                     pod: endpoint removal runs at the same time as preStop, so requests keep \
                     arriving at an app that is shutting down"
                ),
                "let preStop only wait (`sleep: {seconds: 10}`, or exec `draingate wait-drained \
                 --self`); the kubelet sends SIGTERM after it"
                    .into(),
            );
        }
        match pre_stop_sleep(c) {
            None if serves
                && c.lifecycle
                    .as_ref()
                    .and_then(|l| l.pre_stop.as_ref())
                    .is_none() =>
            {
                push(
                    &path(""),
                    Severity::Error,
                    "pre-stop",
                    &object,
                    "no preStop hook: SIGTERM arrives while kube-proxy, ingress controllers and \
                     load balancers still send new connections to the pod (endpoint removal \
                     takes seconds to propagate), and those are refused or reset"
                        .into(),
                    format!(
                        "lifecycle: preStop: sleep: seconds: {} (or exec `draingate wait-drained \
                         --self`, which waits for the endpoints to be gone and the connections \
                         to drain)",
                        PROPAGATION.as_secs() * 2
                    ),
                );
            }
            Some(sleep) => {
                longest_pre_stop = longest_pre_stop.max(sleep);
                if sleep < PROPAGATION {
                    push(
                        &path("lifecycle"),
                        Severity::Warning,
                        "pre-stop",
                        &object,
                        format!(
                            "preStop sleeps {}s, less than endpoint removal usually takes to \
                             propagate ({}s and more): connections arriving after it are refused",
                            sleep.as_secs_f64(),
                            PROPAGATION.as_secs()
                        ),
                        format!("sleep at least {}s", PROPAGATION.as_secs() * 2),
                    );
                }
            }
            None => {}
        }
    }
    if !longest_pre_stop.is_zero() {
        let grace_path = ["spec", "template", "spec", "terminationGracePeriodSeconds"];
        let fix = if longest_pre_stop == Duration::MAX {
            "a preStop that ends: `sleep N` for a few times the endpoint propagation, or \
             `draingate wait-drained --self`"
                .to_owned()
        } else {
            format!(
                "terminationGracePeriodSeconds: {} (the preStop, plus time for the app to finish \
                 its requests after SIGTERM)",
                longest_pre_stop.as_secs().saturating_add(30)
            )
        };
        if grace <= longest_pre_stop {
            push(
                &grace_path,
                Severity::Error,
                "grace-period",
                &object,
                format!(
                    "terminationGracePeriodSeconds {} is not longer than the preStop ({}): the \
                     app is SIGKILLed right after SIGTERM, with its requests in flight",
                    grace.as_secs(),
                    if longest_pre_stop == Duration::MAX {
                        "it sleeps for ever".to_owned()
                    } else {
                        format!("{}s", longest_pre_stop.as_secs_f64())
                    }
                ),
                fix,
            );
        } else if grace < longest_pre_stop.saturating_add(PROPAGATION) {
            push(
                &grace_path,
                Severity::Warning,
                "grace-period",
                &object,
                format!(
                    "terminationGracePeriodSeconds {} leaves the app {}s after the preStop to \
                     finish its requests before SIGKILL",
                    grace.as_secs(),
                    grace.saturating_sub(longest_pre_stop).as_secs_f64()
                ),
                fix,
            );
        }
    }
    let labels = w
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let namespace = w.name.split('/').next().unwrap_or("default");
    let covered = budgets.iter().any(|b| {
        b.metadata.namespace.as_deref().unwrap_or("default") == namespace
            && b.spec
                .as_ref()
                .and_then(|s| s.selector.as_ref())
                .and_then(|s| s.match_labels.as_ref())
                .is_some_and(|m| !m.is_empty() && m.iter().all(|(k, v)| labels.get(k) == Some(v)))
    });
    // A budget for a single replica either blocks node drains or allows nothing: not advised.
    if !covered && w.replicas > 1 {
        push(
            &["metadata", "name"],
            Severity::Warning,
            "pod-disruption-budget",
            &object,
            "no PodDisruptionBudget in these files selects its pods: a node drain or cluster \
             upgrade may evict every replica at once, outside any rolling update"
                .into(),
            "add a PodDisruptionBudget with maxUnavailable: 1 and the pods' labels as selector"
                .into(),
        );
    }
}

/// The findings for people: one block per finding, then a summary line.
#[must_use]
pub fn render(findings: &[Finding]) -> String {
    let mut out = String::new();
    for f in findings {
        let severity = match f.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        let _ = writeln!(
            out,
            "{}:{}: {severity} [{}] {}: {}\n  fix: {}",
            f.file, f.line, f.rule, f.object, f.message, f.fix
        );
    }
    let errors = findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .count();
    let _ = writeln!(
        out,
        "{} errors, {} warnings",
        errors,
        findings.len() - errors
    );
    out
}

#[cfg(test)]
mod tests;
