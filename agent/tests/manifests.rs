//! Every manifest the project ships (deploy/, deploy/base/ and examples/) parses into the
//! Kubernetes API's own types, and says nothing those types do not know: each document is read
//! into its k8s-openapi type and written back, and the two must be equal (a misspelt or
//! misplaced field would be dropped on the way and show as a difference). Custom resources
//! (Argo Rollouts, Flagger) are checked for the fields the gate's contract depends on.

use std::path::{Path, PathBuf};

use serde_json::Value;

mod common;

fn manifests() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    for dir in ["deploy", "deploy/base", "examples"] {
        let mut found: Vec<PathBuf> = std::fs::read_dir(root.join(dir))
            .unwrap_or_else(|e| panic!("{dir}: {e}"))
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
            // kustomize's kustomization.yaml is its build file, not a Kubernetes object (no
            // API server knows its kind); agent/tests/kustomize.rs builds it and checks what
            // comes out.
            .filter(|p| p.file_name().is_some_and(|n| n != "kustomization.yaml"))
            .collect();
        found.sort();
        assert!(!found.is_empty(), "no manifests in {dir}/");
        files.extend(found);
    }
    files
}

#[test]
fn every_shipped_manifest_is_valid_kubernetes() {
    let mut kinds = Vec::new();
    for path in manifests() {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(&path).expect("read manifest");
        for doc in common::documents(&origin, &text) {
            let kind = doc["kind"].as_str().unwrap_or("<none>").to_owned();
            match kind.as_str() {
                _ if common::check_builtin(&origin, &doc) => {}
                "AnalysisTemplate" => check_analysis_template(&path, &doc),
                "Canary" => check_canary(&path, &doc),
                other => panic!("{origin}: unexpected kind {other}"),
            }
            kinds.push(kind);
        }
    }
    for expected in [
        "Namespace",
        "Deployment",
        "DaemonSet",
        "Service",
        "AnalysisTemplate",
        "Canary",
    ] {
        assert!(
            kinds.iter().any(|k| k == expected),
            "no {expected} shipped: {kinds:?}"
        );
    }
}

fn check_analysis_template(path: &Path, doc: &Value) {
    assert_eq!(
        doc["apiVersion"],
        "argoproj.io/v1alpha1",
        "{}",
        path.display()
    );
    let metric = &doc["spec"]["metrics"][0];
    assert_eq!(metric["successCondition"], "result.verdict == \"pass\"");
    assert_eq!(metric["failureCondition"], "result.verdict == \"fail\"");
    let url = metric["provider"]["web"]["url"]
        .as_str()
        .expect("web provider url");
    assert!(url.contains(":8080/v1/verdict?"), "{url}");
    for arg in [
        "{{args.namespace}}",
        "{{args.rollout}}",
        "{{args.stable-hash}}",
    ] {
        assert!(url.contains(arg), "{url} lacks {arg}");
    }
}

fn check_canary(path: &Path, doc: &Value) {
    assert_eq!(
        doc["apiVersion"],
        "flagger.app/v1beta1",
        "{}",
        path.display()
    );
    let hooks = doc["spec"]["analysis"]["webhooks"]
        .as_array()
        .expect("webhooks");
    let url_of = |kind: &str| {
        hooks
            .iter()
            .find(|h| h["type"] == kind)
            .and_then(|h| h["url"].as_str())
            .unwrap_or_else(|| panic!("no {kind} webhook"))
            .to_owned()
    };
    assert!(url_of("confirm-promotion").ends_with("/flagger/gate"));
    assert!(url_of("rollback").ends_with("/flagger/rollback"));
}
