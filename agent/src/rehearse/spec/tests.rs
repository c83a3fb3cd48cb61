use std::time::Duration;

use super::*;

const CLASSIC: &str = r"
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 20
  strategy:
    type: RollingUpdate
    rollingUpdate: {maxSurge: 5, maxUnavailable: 0}
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      terminationGracePeriodSeconds: 60
      containers:
      - name: web
        image: example/web:2
        readinessProbe:
          httpGet: {path: /health/ready, port: http}
          periodSeconds: 2
          failureThreshold: 2
        livenessProbe:
          httpGet: {path: /health/live, port: http}
        lifecycle:
          preStop:
            sleep: {seconds: 5}
";

#[test]
fn reads_the_classic_zero_downtime_deployment() {
    let spec = RolloutSpec::from_manifest("classic.yaml", CLASSIC).unwrap();
    assert_eq!(spec.name, "web");
    assert_eq!(spec.replicas, 20);
    assert_eq!((spec.max_surge, spec.max_unavailable), (5, 0));
    assert_eq!(spec.grace_period, Duration::from_mins(1));
    assert_eq!(spec.pre_stop, Some(Duration::from_secs(5)));
    let probe = spec.readiness.unwrap();
    assert_eq!(probe.http_path.as_deref(), Some("/health/ready"));
    assert_eq!(probe.period, Duration::from_secs(2));
    assert_eq!(probe.failure_threshold, 2);
    assert_eq!(probe.success_threshold, 1);
    // What it does not simulate is named, not dropped.
    assert!(
        spec.not_simulated
            .iter()
            .any(|s| s.contains("livenessProbe")),
        "{:?}",
        spec.not_simulated
    );
    assert!(spec.not_simulated.iter().any(|s| s.contains("image")));
}

#[test]
fn defaults_and_percentages_follow_the_deployment_controller() {
    let manifest = r"
kind: Deployment
apiVersion: apps/v1
metadata: {name: api}
spec:
  replicas: 10
  selector: {matchLabels: {app: api}}
  template:
    spec:
      containers: [{name: api}]
";
    let spec = RolloutSpec::from_manifest("m.yaml", manifest).unwrap();
    // 25% of 10: surge rounds up, unavailability rounds down.
    assert_eq!((spec.max_surge, spec.max_unavailable), (3, 2));
    // Fewer replicas: the percentages apply to the new count.
    let mut spec = spec;
    spec.replicas = 3;
    spec.resolve_strategy().unwrap();
    assert_eq!((spec.max_surge, spec.max_unavailable), (1, 0));
    assert_eq!(spec.grace_period, Duration::from_secs(30));
    assert_eq!(spec.readiness, None);
    assert_eq!(spec.pre_stop, None);
}

#[test]
fn pre_stop_sleep_in_every_common_spelling() {
    for (command, expected) in [
        (vec!["sleep", "15"], Some(15.0)),
        (vec!["/bin/sleep", "2.5"], Some(2.5)),
        (vec!["sh", "-c", "sleep 10"], Some(10.0)),
        (vec!["/bin/sh", "-c", "sleep 3s"], Some(3.0)),
        (vec!["sh", "-c", "kill -TERM 1; sleep 45"], None),
        (vec!["nginx", "-s", "quit"], None),
    ] {
        let words: Vec<String> = command.iter().map(|s| (*s).to_owned()).collect();
        assert_eq!(
            sleep_seconds(&words),
            expected.map(Duration::from_secs_f64),
            "{command:?}"
        );
    }
}

#[test]
fn a_pre_stop_it_cannot_run_is_named() {
    let manifest = r#"
kind: Deployment
apiVersion: apps/v1
metadata: {name: api}
spec:
  selector: {matchLabels: {app: api}}
  template:
    spec:
      containers:
      - name: api
        lifecycle: {preStop: {exec: {command: ["sh", "-c", "kill -TERM 1; sleep 45"]}}}
"#;
    let spec = RolloutSpec::from_manifest("m.yaml", manifest).unwrap();
    assert_eq!(spec.pre_stop, None);
    // It is run, but where it cannot signal anything: said so.
    assert_eq!(
        spec.pre_stop_exec.as_deref(),
        Some(
            &[
                "sh".to_owned(),
                "-c".into(),
                "kill -TERM 1; sleep 45".into()
            ][..]
        )
    );
    assert!(
        spec.not_simulated
            .iter()
            .any(|s| s.contains("preStop") && s.contains("cannot signal")),
        "{:?}",
        spec.not_simulated
    );
}

#[test]
fn the_stop_signal_is_honoured_and_a_bad_one_is_an_error() {
    let manifest = |signal: &str| {
        format!(
            "kind: Deployment\napiVersion: apps/v1\nmetadata: {{name: web}}\nspec:\n  selector: \
             {{matchLabels: {{app: web}}}}\n  template:\n    spec:\n      containers:\n      - \
             name: web\n        lifecycle: {{stopSignal: {signal}}}\n"
        )
    };
    let spec = RolloutSpec::from_manifest("m.yaml", &manifest("SIGQUIT")).unwrap();
    assert_eq!(spec.stop_signal, nix::sys::signal::Signal::SIGQUIT);
    let err = RolloutSpec::from_manifest("m.yaml", &manifest("SIGNOPE")).unwrap_err();
    assert!(err.to_string().contains("stopSignal"), "{err}");
    assert_eq!(
        RolloutSpec::default().stop_signal,
        nix::sys::signal::Signal::SIGTERM
    );
}

#[test]
fn bad_manifests_are_clear_errors() {
    let err = RolloutSpec::from_manifest("svc.yaml", "kind: Service\napiVersion: v1\n")
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "svc.yaml: no Deployment found (kinds seen: Service); rehearse needs a Deployment"
    );
    let err = RolloutSpec::from_manifest("x.yaml", "a: [unclosed")
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("x.yaml: not valid YAML"), "{err}");
    let err = RolloutSpec::from_manifest(
        "d.yaml",
        "kind: Deployment\napiVersion: apps/v1\nspec: {replicas: lots}\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.starts_with("d.yaml: invalid Deployment"), "{err}");
    let err = RolloutSpec::from_manifest(
        "d.yaml",
        "kind: Deployment\napiVersion: apps/v1\nmetadata: {name: x}\nspec:\n  selector: {}\n  \
         strategy: {rollingUpdate: {maxSurge: 0, maxUnavailable: 0}}\n  template:\n    spec:\n      \
         containers: [{name: x}]\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("both are 0"), "{err}");
    assert!(parse_int_or_percent("lots").is_err());
    assert_eq!(
        parse_int_or_percent("30%"),
        Ok(IntOrString::String("30%".into()))
    );
}
