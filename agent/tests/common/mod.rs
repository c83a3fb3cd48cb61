//! What the manifest tests share: reading YAML documents and holding the built-in kinds to the
//! Kubernetes API's types.

use k8s_openapi::api::{
    admissionregistration::v1::MutatingWebhookConfiguration,
    apps::v1::{DaemonSet, Deployment},
    core::v1::{Namespace, Service, ServiceAccount},
    networking::v1::NetworkPolicy,
    policy::v1::PodDisruptionBudget,
    rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
};
use serde_json::Value;

/// The non-empty documents of a YAML stream; `origin` names it in the panic.
pub(crate) fn documents(origin: &str, text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|doc| {
            serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{origin}: not YAML: {e}"))
        })
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// Reads `doc` as `T` and back; panics with the difference when something was lost.
fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(origin: &str, doc: &Value) {
    let typed: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{origin}: {} {}: {e}", doc["kind"], doc["metadata"]["name"]));
    let back = serde_json::to_value(&typed).expect("serialize");
    assert_eq!(
        &back, doc,
        "{origin}: {} {} has fields its API type does not know",
        doc["kind"], doc["metadata"]["name"]
    );
}

/// Holds `doc` to its k8s-openapi type when its kind is one the project ships; false for any
/// other kind (the caller checks custom resources itself).
pub(crate) fn check_builtin(origin: &str, doc: &Value) -> bool {
    match doc["kind"].as_str().unwrap_or("<none>") {
        "Namespace" => round_trip::<Namespace>(origin, doc),
        "Deployment" => round_trip::<Deployment>(origin, doc),
        "DaemonSet" => round_trip::<DaemonSet>(origin, doc),
        "Service" => round_trip::<Service>(origin, doc),
        "ServiceAccount" => round_trip::<ServiceAccount>(origin, doc),
        "ClusterRole" => round_trip::<ClusterRole>(origin, doc),
        "ClusterRoleBinding" => round_trip::<ClusterRoleBinding>(origin, doc),
        "Role" => round_trip::<Role>(origin, doc),
        "RoleBinding" => round_trip::<RoleBinding>(origin, doc),
        "MutatingWebhookConfiguration" => {
            round_trip::<MutatingWebhookConfiguration>(origin, doc);
        }
        "PodDisruptionBudget" => round_trip::<PodDisruptionBudget>(origin, doc),
        "NetworkPolicy" => round_trip::<NetworkPolicy>(origin, doc),
        _ => return false,
    }
    true
}
