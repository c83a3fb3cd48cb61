use super::{Finding, LintError, MAX_INPUT, Severity, lint, read_bounded, render};

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
    let text = include_str!("../../examples/senior.yaml");
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
    // The line of the value that is wrong, not of the document.
    assert!(
        err.to_string().starts_with("c.yaml:3: invalid Deployment"),
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

/// (line, rule) of each finding, sorted, `shift` lines down.
fn lines_of(findings: &[Finding], shift: usize) -> Vec<(usize, &'static str)> {
    let mut lines: Vec<_> = findings.iter().map(|f| (f.line + shift, f.rule)).collect();
    lines.sort_unstable();
    lines
}

#[test]
fn comments_before_the_first_separator_keep_every_line_exact() {
    let alone = run(&[("a.yaml", BAD)]).unwrap();
    assert!(!alone.is_empty());
    let text = format!("# shop's api\n# owned by team x\n\n---\n{BAD}");
    let found = run(&[("a.yaml", &text)]).unwrap();
    assert_eq!(lines_of(&found, 0), lines_of(&alone, 4));
    assert!(found.iter().all(|f| f.line > 4), "{found:?}");
}

#[test]
fn each_documents_findings_point_into_that_document() {
    let alone = run(&[("a.yaml", BAD)]).unwrap();
    let first_len = BAD.lines().count();
    for (text, first_at, second_at) in [
        // Document 2 starts after document 1 and its separator.
        (format!("{BAD}---\n{BAD}"), 0, first_len + 1),
        // Comments first, an empty document between, a marker with a comment on it.
        (
            format!("# a\n---\n{BAD}---\n# nothing\n--- # the second\n{BAD}"),
            2,
            2 + first_len + 3,
        ),
    ] {
        let found = run(&[("a.yaml", &text)]).unwrap();
        let mut expected = lines_of(&alone, first_at);
        expected.extend(lines_of(&alone, second_at));
        expected.sort_unstable();
        assert_eq!(lines_of(&found, 0), expected, "{text}");
    }
    // An error in document 2 names its line, not one in document 1.
    let text = "# x\n---\napiVersion: v1\nkind: Service\n---\napiVersion: apps/v1\n\
                kind: Deployment\nmetadata: {name: a}\nspec:\n  replicas: many\n";
    let err = run(&[("b.yaml", text)]).unwrap_err().to_string();
    assert!(err.starts_with("b.yaml:10: invalid Deployment"), "{err}");
    let err = run(&[("c.yaml", "# x\n---\nkind: Service\n---\nname: y\n")])
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("c.yaml:3: not a Kubernetes object"),
        "{err}"
    );
    let err = run(&[("d.yaml", "# x\n---\na: 1\n---\n\nb: [oops\n")])
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("d.yaml:7: not valid YAML") || err.starts_with("d.yaml:6: not valid YAML"),
        "{err}"
    );
}

#[test]
fn inputs_over_the_bound_are_refused_without_reading_them_whole() {
    let limit = usize::try_from(MAX_INPUT).unwrap();
    // An endless input: read up to the bound and refused.
    let err = read_bounded("<stdin>", std::io::repeat(b'a')).unwrap_err();
    assert!(matches!(err, LintError::TooLarge { .. }), "{err}");
    assert!(err.to_string().contains("larger than 4 MiB"), "{err}");
    let at_bound = "#".repeat(limit);
    assert_eq!(read_bounded("f", at_bound.as_bytes()).unwrap().len(), limit);
    let over = format!("{at_bound}\n");
    let err = run(&[("f.yaml", &over)]).unwrap_err();
    assert!(matches!(err, LintError::TooLarge { .. }), "{err}");
    let err = read_bounded("bin", &[0xff, 0xfe][..]).unwrap_err();
    assert!(matches!(err, LintError::Read { .. }), "{err}");
}

/// A small deterministic generator (xorshift), so that a failure names a reproducible case.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n.max(1) as u64).unwrap_or(0)
    }
}

/// Manifests mutated at random (lines dropped, repeated, re-indented, cut; YAML's sharp edges
/// inserted: anchors, tags, markers, odd numbers) never panic the linter, and each is linted
/// quickly. Bounded: at most 4,000 cases or 20 s.
#[test]
fn arbitrary_manifests_never_panic_the_linter() {
    const TOKENS: &[&str] = &[
        "---",
        "...",
        "- ",
        ": ",
        "{",
        "}",
        "[",
        "]",
        "&a ",
        "*a",
        "<<: *a",
        "!!binary ",
        "!!int ",
        "? ",
        "|",
        ">-",
        "#",
        "'",
        "\"",
        "\t",
        "%YAML 1.2",
        "infinity",
        "inf",
        "-.inf",
        ".nan",
        "nan",
        "-1",
        "1e300",
        "9223372036854775807",
        "-9223372036854775808",
        "0x7fffffff",
        "~",
        "null",
        "true",
        "sleep",
        "sleep infinity",
        "kill -TERM 1",
        "terminationGracePeriodSeconds: ",
        "preStop:",
        "exec:",
        "command: [sh, -c, \"sleep ",
        "seconds: ",
        "maxUnavailable: ",
        "maxSurge: ",
        "replicas: ",
        "kind: Deployment",
        "kind: Rollout",
        "apiVersion: argoproj.io/v1alpha1",
        "kind: PodDisruptionBudget",
        "apiVersion: policy/v1",
        "selector:",
        "matchLabels: {app: api}",
        "\u{feff}",
        "é",
    ];
    let seeds = [
        BAD.to_owned(),
        include_str!("../../examples/senior.yaml").to_owned(),
        format!("# c\n---\n{BAD}---\n{BAD}"),
    ];
    let mut rng = Rng(0x5eed_d4a1_9a7e_0017);
    let started = std::time::Instant::now();
    let mut cases = 0;
    while cases < 4000 && started.elapsed() < std::time::Duration::from_secs(20) {
        let seed = &seeds[rng.below(seeds.len())];
        let mut lines: Vec<String> = seed.lines().map(str::to_owned).collect();
        for _ in 0..=rng.below(6) {
            let at = rng.below(lines.len());
            match rng.below(6) {
                0 if !lines.is_empty() => {
                    lines.remove(at);
                }
                1 if !lines.is_empty() => {
                    let line = lines[at].clone();
                    lines.insert(at, line);
                }
                2 if !lines.is_empty() => {
                    let line = &mut lines[at];
                    let cut = line
                        .char_indices()
                        .nth(rng.below(line.len() + 1))
                        .map_or(line.len(), |(i, _)| i);
                    let token = TOKENS[rng.below(TOKENS.len())];
                    line.insert_str(cut, token);
                }
                3 if !lines.is_empty() => {
                    let spaces = " ".repeat(rng.below(5));
                    let line = &mut lines[at];
                    if rng.below(2) == 0 {
                        *line = format!("{spaces}{}", line.trim_start());
                    } else {
                        *line = line.trim_start().to_owned();
                    }
                }
                4 => lines.truncate(at),
                _ => {
                    let indent = " ".repeat(rng.below(12));
                    lines.insert(
                        at.min(lines.len()),
                        format!(
                            "{indent}{}{}",
                            TOKENS[rng.below(TOKENS.len())],
                            TOKENS[rng.below(TOKENS.len())]
                        ),
                    );
                }
            }
        }
        let text = lines.join("\n");
        let case = std::time::Instant::now();
        let outcome = std::panic::catch_unwind(|| run(&[("fuzz.yaml", &text)]));
        assert!(outcome.is_ok(), "lint panicked on case {cases}:\n{text}");
        assert!(
            case.elapsed() < std::time::Duration::from_secs(2),
            "lint took {:?} on case {cases}:\n{text}",
            case.elapsed()
        );
        cases += 1;
    }
    assert!(cases >= 100, "only {cases} cases in the time allowed");
}
