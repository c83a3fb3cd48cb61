use super::{Finding, LintError, Severity, lint, render};

fn run(files: &[(&str, &str)]) -> Result<Vec<Finding>, LintError> {
    lint(
        &files
            .iter()
            .map(|(f, t)| ((*f).to_owned(), (*t).to_owned()))
            .collect::<Vec<_>>(),
    )
}

/// (line, severity, rule) of each finding.
fn brief(findings: &[Finding]) -> Vec<(usize, Severity, &'static str)> {
    findings
        .iter()
        .map(|f| (f.line, f.severity, f.rule))
        .collect()
}

#[test]
fn the_senior_example_is_clean() {
    let text = include_str!("../../../examples/senior.yaml");
    let findings = run(&[("senior.yaml", text)]).unwrap();
    assert_eq!(findings, [], "{}", render(&findings));
}

const BAD: &str = "\
# every mistake at once
apiVersion: apps/v1
kind: Deployment
metadata:
  name: api
  namespace: shop
spec:
  replicas: 4
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxUnavailable: 1
  selector:
    matchLabels: {app: api}
  template:
    metadata:
      labels: {app: api}
    spec:
      terminationGracePeriodSeconds: 45
      containers:
        - name: api
          image: registry.example/api:1
          ports:
            - containerPort: 8080
          lifecycle:
            preStop:
              exec:
                command: [sh, -c, \"kill -TERM 1; sleep 45\"]
        - name: sidecar
          image: registry.example/proxy:1
          ports:
            - containerPort: 15001
          readinessProbe:
            tcpSocket: {port: 15001}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: batch
spec:
  replicas: 2
  strategy: {type: Recreate}
  selector:
    matchLabels: {app: batch}
  template:
    metadata:
      labels: {app: batch}
    spec:
      containers:
        - name: batch
          image: registry.example/batch:1
          readinessProbe:
            httpGet: {path: /ready, port: 8080}
          lifecycle:
            preStop:
              sleep: {seconds: 2}
";

#[test]
fn each_mistake_is_found_on_its_line_with_why_and_the_fix() {
    let findings = run(&[("bad.yaml", BAD)]).unwrap();
    assert_eq!(
        brief(&findings),
        [
            (5, Severity::Warning, "pod-disruption-budget"),
            (9, Severity::Warning, "strategy"),
            (19, Severity::Error, "grace-period"),
            (21, Severity::Error, "readiness-probe"),
            (25, Severity::Error, "pre-stop-signals-app"),
            (29, Severity::Error, "pre-stop"),
            (39, Severity::Warning, "pod-disruption-budget"),
            (42, Severity::Error, "strategy"),
            (54, Severity::Warning, "pre-stop"),
        ],
        "{}",
        render(&findings)
    );
    let signals = findings
        .iter()
        .find(|f| f.rule == "pre-stop-signals-app")
        .unwrap();
    assert_eq!(signals.object, "Deployment shop/api, container api");
    assert!(
        signals.message.contains("kill -TERM 1; sleep 45"),
        "{}",
        signals.message
    );
    assert!(signals.fix.contains("wait-drained --self"));
    let grace = findings.iter().find(|f| f.rule == "grace-period").unwrap();
    assert!(grace.message.contains("45"), "{}", grace.message);
    assert!(grace.fix.contains("75"), "{}", grace.fix);
    let text = render(&findings);
    assert!(
        text.contains("bad.yaml:21: error [readiness-probe] Deployment shop/api, container api"),
        "{text}"
    );
    assert!(text.ends_with("5 errors, 4 warnings\n"), "{text}");
}

#[test]
fn a_budget_in_another_file_covers_the_pods() {
    let budget = "apiVersion: policy/v1\nkind: PodDisruptionBudget\nmetadata: {name: api, namespace: shop}\nspec:\n  maxUnavailable: 1\n  selector:\n    matchLabels: {app: api}\n";
    let findings = run(&[("bad.yaml", BAD), ("pdb.yaml", budget)]).unwrap();
    let pdb: Vec<_> = findings
        .iter()
        .filter(|f| f.rule == "pod-disruption-budget")
        .map(|f| f.object.as_str())
        .collect();
    assert_eq!(pdb, ["Deployment default/batch"]);
}

#[test]
fn argo_rollouts_are_checked_too() {
    let rollout = "apiVersion: argoproj.io/v1alpha1\nkind: Rollout\nmetadata: {name: web}\nspec:\n  replicas: 3\n  strategy:\n    canary: {steps: [{setWeight: 20}]}\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      containers:\n        - name: web\n          image: x\n";
    let findings = run(&[("rollout.yaml", rollout)]).unwrap();
    assert_eq!(
        brief(&findings),
        [
            (3, Severity::Warning, "pod-disruption-budget"),
            (12, Severity::Error, "pre-stop"),
            (12, Severity::Error, "readiness-probe"),
        ]
    );
}

#[test]
fn what_is_not_kubernetes_is_a_clear_error() {
    let err = run(&[("a.yaml", "name: x\nreplicas: 3\n")]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "a.yaml:1: not a Kubernetes object (it has no apiVersion and kind); lint reads Kubernetes manifests"
    );
    let err = run(&[(
        "b.yaml",
        "apiVersion: v1\nkind: Service\n---\nkind: [unclosed\n",
    )])
    .unwrap_err();
    let err = err.to_string();
    assert!(
        err.starts_with("b.yaml:") && err.contains("not valid YAML") && err.contains("line 4"),
        "{err}"
    );
    let err = run(&[(
        "c.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nspec: {replicas: many}\n",
    )])
    .unwrap_err();
    assert!(
        err.to_string().starts_with("c.yaml:1: invalid Deployment"),
        "{err}"
    );
    // Other kinds are fine and unchecked.
    assert_eq!(
        run(&[(
            "d.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n"
        )])
        .unwrap(),
        []
    );
}

/// What `sleep` accepts, however large or odd, never panics the linter: `infinity` sleeps past
/// any grace period (an error), `nan` and `-1` are no sleep, and a grace period or sleep too
/// large for arithmetic saturates.
#[test]
fn odd_sleeps_and_huge_grace_periods_are_findings_not_panics() {
    for (sleep, grace) in [
        ("infinity", "30"),
        ("inf", "30"),
        ("nan", "30"),
        ("-1", "30"),
        ("1e300", "30"),
        ("5", "9223372036854775807"),
        ("1e300", "9223372036854775807"),
    ] {
        let manifest = format!(
            "apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
    spec:
      terminationGracePeriodSeconds: {grace}
      containers:
        - name: web
          image: web
          lifecycle:
            preStop:
              exec:
                command: [\"sleep\", \"{sleep}\"]
"
        );
        let findings = run(&[("web.yaml", &manifest)]).expect("linted");
        // 1e300 s is longer than any grace period Kubernetes takes (an i64 of seconds).
        let infinite = sleep.starts_with("inf") || sleep == "1e300";
        assert_eq!(
            findings
                .iter()
                .any(|f| f.rule == "grace-period" && f.severity == Severity::Error),
            infinite,
            "sleep {sleep}, grace {grace}: {findings:?}"
        );
        if sleep.starts_with("inf") {
            assert!(
                findings
                    .iter()
                    .any(|f| f.message.contains("sleeps for ever")),
                "{findings:?}"
            );
        }
    }
}
