//! The mutating admission webhook of `gate serve --hold --webhook-addr`: it adds the readiness
//! gate `draingate.io/predecessors-drained` to each pod a ReplicaSet creates (a Deployment's
//! pod) in a namespace labelled `draingate.io/hold=enabled` (the namespace selector of
//! `deploy/overlays/hold/webhook.yaml`), so the user's spec stays untouched.
//!
//! It never denies: a request it cannot read is answered `400`, and the webhook's
//! `failurePolicy: Ignore` lets the API server create the pod without the gate; a gate that is
//! down never blocks pod creation (such a pod is simply not held).
//!
//! The API server only calls webhooks over HTTPS. The serving certificate comes from a mounted
//! `kubernetes.io/tls` Secret (`--webhook-tls-dir`, as cert-manager writes it, which also
//! injects the `caBundle`), or the gate makes its own ([`self_signed`]): a CA and a serving
//! certificate kept in a Secret, so that every replica serves the same one ([`ensure_secret`]),
//! and the CA written into the webhook configuration's `caBundle` ([`patch_ca_bundle`]).

use std::time::{Duration, SystemTime};

use axum::{
    Json, Router,
    body::Bytes,
    extract::DefaultBodyLimit,
    http::StatusCode,
    response::{IntoResponse as _, Response},
    routing::post,
};
use draingate_serve::telemetry::chain;
use k8s_openapi::{
    ByteString,
    api::{
        admissionregistration::v1::MutatingWebhookConfiguration,
        core::v1::{Pod, Secret},
    },
};
use kube::{
    Api,
    api::{PostParams, entry::Entry},
    core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation},
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_json::json;

use crate::hold::CONDITION_TYPE;

/// The webhook's path.
pub const PATH: &str = "/mutate";

/// Largest admission review read: the API server's own request limit is 3 MiB.
pub const MAX_REVIEW_BYTES: usize = 4 * 1024 * 1024;

/// How long a certificate the gate makes is valid; it is made again when less than
/// [`RENEW_BEFORE`] is left.
pub const VALIDITY: Duration = Duration::from_hours(24 * 365);
/// Certificates with less than this left are replaced at start.
pub const RENEW_BEFORE: Duration = Duration::from_hours(24 * 30);

/// The annotations of the Secret that record what its certificate is for.
const NAMES_ANNOTATION: &str = "draingate.io/webhook-names";
const NOT_AFTER_ANNOTATION: &str = "draingate.io/not-after";

/// Why the webhook's TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("cannot make the webhook's certificate")]
    Generate(#[from] rcgen::Error),
    #[error("cannot read or write Secret {namespace}/{name}")]
    Secret {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("Secret {namespace}/{name} was changed by another replica {tries} times in a row")]
    Contended {
        namespace: String,
        name: String,
        tries: u32,
    },
    #[error(
        "cannot write the caBundle of MutatingWebhookConfiguration {name} (apply \
         deploy/overlays/hold first)"
    )]
    Configuration {
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// The JSON patch that adds the readiness gate to `pod`, or `None` when it needs none: only a
/// pod a ReplicaSet controls (what a Deployment's rollout replaces), and only once.
#[must_use]
pub fn patch_for(pod: &Pod) -> Option<serde_json::Value> {
    let owned_by_replica_set = pod
        .metadata
        .owner_references
        .as_ref()
        .is_some_and(|owners| {
            owners
                .iter()
                .any(|o| o.controller == Some(true) && o.kind == "ReplicaSet")
        });
    if !owned_by_replica_set {
        return None;
    }
    let gate = json!({ "conditionType": CONDITION_TYPE });
    match pod.spec.as_ref()?.readiness_gates.as_deref() {
        Some(gates) if gates.iter().any(|g| g.condition_type == CONDITION_TYPE) => None,
        Some(_) => Some(json!([
            {"op": "add", "path": "/spec/readinessGates/-", "value": gate}
        ])),
        None => Some(json!([
            {"op": "add", "path": "/spec/readinessGates", "value": [gate]}
        ])),
    }
}

/// The answer to one admission review's body: always allowed, with the patch where one is
/// needed; `Err` with the reason for a body that is no pod review.
pub fn review(body: &[u8]) -> Result<AdmissionReview<kube::core::DynamicObject>, String> {
    let review: AdmissionReview<Pod> = serde_json::from_slice(body)
        .map_err(|e| format!("not an AdmissionReview of a pod: {e}"))?;
    let request: AdmissionRequest<Pod> = review
        .try_into()
        .map_err(|_| "the AdmissionReview has no request".to_owned())?;
    let mut response = AdmissionResponse::from(&request);
    if matches!(request.operation, Operation::Create)
        && let Some(patch) = request.object.as_ref().and_then(patch_for)
    {
        let patch: json_patch::Patch =
            serde_json::from_value(patch).map_err(|e| format!("cannot make the patch: {e}"))?;
        response = response
            .with_patch(patch)
            .map_err(|e| format!("cannot write the patch: {e}"))?;
        tracing::debug!(
            pod = %format!(
                "{}/{}",
                request.namespace.as_deref().unwrap_or_default(),
                request.object.as_ref().and_then(|p| p.metadata.generate_name.as_deref()).unwrap_or_default()
            ),
            "readiness gate added"
        );
    }
    Ok(response.into_review())
}

async fn mutate(body: Bytes) -> Response {
    match review(&body) {
        Ok(review) => Json(review).into_response(),
        Err(reason) => {
            tracing::warn!(%reason, "admission review refused");
            (StatusCode::BAD_REQUEST, reason).into_response()
        }
    }
}

/// The webhook's routes: `POST /mutate`, and `GET /healthz`.
pub fn router() -> Router {
    Router::new()
        .route(PATH, post(mutate))
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .layer(DefaultBodyLimit::max(MAX_REVIEW_BYTES))
}

/// A serving certificate and what signed it, in PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServingCert {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    /// The names (DNS names or IP addresses) it is valid for.
    pub names: Vec<String>,
    pub not_after: SystemTime,
}

/// A new CA (its key is not kept) and a serving certificate for `names`, valid for `valid`.
pub fn self_signed(names: &[String], valid: Duration) -> Result<ServingCert, WebhookError> {
    let now = SystemTime::now();
    let not_after = now + valid;
    let dated = |mut params: CertificateParams| {
        params.not_before = (now - Duration::from_mins(5)).into();
        params.not_after = not_after.into();
        params
    };
    let mut ca = dated(CertificateParams::new(Vec::<String>::new())?);
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name
        .push(DnType::CommonName, "draingate webhook CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    let mut serving = dated(CertificateParams::new(names.to_vec())?);
    serving.distinguished_name.push(
        DnType::CommonName,
        names.first().map_or("draingate-gate", String::as_str),
    );
    serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate()?;
    let cert = serving.signed_by(&key, &issuer)?;
    Ok(ServingCert {
        ca_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        names: names.to_vec(),
        not_after,
    })
}

/// The certificate kept in `secret`, if it is complete, for exactly `names` and valid for at
/// least [`RENEW_BEFORE`] more.
fn stored(secret: &Secret, names: &[String]) -> Option<ServingCert> {
    let annotations = secret.metadata.annotations.as_ref()?;
    if annotations.get(NAMES_ANNOTATION)? != &names.join(",") {
        return None;
    }
    let not_after = humantime::parse_rfc3339(annotations.get(NOT_AFTER_ANNOTATION)?).ok()?;
    if not_after < SystemTime::now() + RENEW_BEFORE {
        return None;
    }
    let data = secret.data.as_ref()?;
    let text = |key: &str| String::from_utf8(data.get(key)?.0.clone()).ok();
    Some(ServingCert {
        ca_pem: text("ca.crt")?,
        cert_pem: text("tls.crt")?,
        key_pem: text("tls.key")?,
        names: names.to_vec(),
        not_after,
    })
}

fn to_secret(name: &str, cert: &ServingCert) -> Secret {
    let bytes = |s: &str| ByteString(s.as_bytes().to_vec());
    Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_owned()),
            annotations: Some(
                [
                    (NAMES_ANNOTATION.to_owned(), cert.names.join(",")),
                    (
                        NOT_AFTER_ANNOTATION.to_owned(),
                        humantime::format_rfc3339_seconds(cert.not_after).to_string(),
                    ),
                ]
                .into(),
            ),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(
            [
                ("ca.crt".to_owned(), bytes(&cert.ca_pem)),
                ("tls.crt".to_owned(), bytes(&cert.cert_pem)),
                ("tls.key".to_owned(), bytes(&cert.key_pem)),
            ]
            .into(),
        ),
        ..Default::default()
    }
}

/// The serving certificate for `names` kept in Secret `namespace/name`: the one there when it
/// is still good, else a new one written there. Every replica of the gate ends up with the same
/// certificate: a replica that loses the race to write reads the winner's.
pub async fn ensure_secret(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    names: &[String],
) -> Result<ServingCert, WebhookError> {
    const TRIES: u32 = 5;
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let failed = |source| WebhookError::Secret {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        source,
    };
    for _ in 0..TRIES {
        let entry = api.entry(name).await.map_err(failed)?;
        if let Entry::Occupied(occupied) = &entry
            && let Some(cert) = stored(occupied.get(), names)
        {
            return Ok(cert);
        }
        let cert = self_signed(names, VALIDITY)?;
        let fresh = to_secret(name, &cert);
        let written = match entry {
            Entry::Vacant(vacant) => vacant.insert(fresh).commit(&PostParams::default()).await,
            Entry::Occupied(mut occupied) => {
                let secret = occupied.get_mut();
                secret.metadata.annotations = fresh.metadata.annotations;
                secret.data = fresh.data;
                secret.type_ = fresh.type_;
                occupied.commit(&PostParams::default()).await
            }
        };
        match written {
            Ok(()) => {
                tracing::info!(
                    secret = %format!("{namespace}/{name}"),
                    names = %names.join(","),
                    "made the webhook's certificate"
                );
                return Ok(cert);
            }
            // Another replica wrote it first: read theirs.
            Err(kube::api::entry::CommitError::Save(kube::Error::Api(status)))
                if status.code == 409 => {}
            Err(kube::api::entry::CommitError::Save(source)) => return Err(failed(source)),
            Err(kube::api::entry::CommitError::Validate(source)) => {
                return Err(failed(kube::Error::SerdeError(serde_json::Error::io(
                    std::io::Error::other(source.to_string()),
                ))));
            }
        }
    }
    Err(WebhookError::Contended {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        tries: TRIES,
    })
}

/// Writes `ca_pem` into the `caBundle` of every webhook of `MutatingWebhookConfiguration` `name`
/// that does not have it yet; whether it changed anything.
pub async fn patch_ca_bundle(
    client: &kube::Client,
    name: &str,
    ca_pem: &str,
) -> Result<bool, WebhookError> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let failed = |source| WebhookError::Configuration {
        name: name.to_owned(),
        source,
    };
    for _ in 0..5 {
        let mut config = api.get(name).await.map_err(failed)?;
        let mut changed = false;
        for webhook in config.webhooks.iter_mut().flatten() {
            let bundle = &mut webhook.client_config.ca_bundle;
            if bundle.as_ref().map(|b| b.0.as_slice()) != Some(ca_pem.as_bytes()) {
                *bundle = Some(ByteString(ca_pem.as_bytes().to_vec()));
                changed = true;
            }
        }
        if !changed {
            return Ok(false);
        }
        match api.replace(name, &PostParams::default(), &config).await {
            Ok(_) => {
                tracing::info!(configuration = name, "wrote the webhook's caBundle");
                return Ok(true);
            }
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(source) => return Err(failed(source)),
        }
    }
    Ok(false)
}

/// Where the webhook's certificate comes from.
#[derive(Debug, Clone)]
pub enum WebhookTls {
    /// Read from a mounted `kubernetes.io/tls` Secret (`--webhook-tls-dir`).
    Mounted(draingate_serve::tls::HttpsConfig),
    /// Made by the gate ([`ensure_secret`]) and its CA written into the configuration
    /// ([`patch_ca_bundle`]).
    SelfMade {
        namespace: String,
        secret: String,
        names: Vec<String>,
        configuration: String,
    },
}

/// How long a self-made certificate is tried again after the API server refused it.
const RETRY: Duration = Duration::from_secs(5);

/// Serves the webhook on `listener` until `shutdown`. A self-made certificate is retried every
/// [`RETRY`] until the API server lets the gate keep it (its RBAC or the webhook configuration
/// may be applied after the gate starts); pods created meanwhile are not held
/// (`failurePolicy: Ignore`).
pub async fn serve(
    client: kube::Client,
    listener: tokio::net::TcpListener,
    tls: WebhookTls,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let config = match tls {
        WebhookTls::Mounted(config) => config,
        WebhookTls::SelfMade {
            namespace,
            secret,
            names,
            configuration,
        } => loop {
            let made = async {
                let cert = ensure_secret(&client, &namespace, &secret, &names).await?;
                patch_ca_bundle(&client, &configuration, &cert.ca_pem).await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                    draingate_serve::tls::https_config(
                        cert.cert_pem.as_bytes(),
                        cert.key_pem.as_bytes(),
                    )?,
                )
            };
            match made.await {
                Ok(config) => break config,
                Err(err) => {
                    tracing::warn!(error = %chain(err.as_ref()), "the webhook cannot serve yet; retrying in 5 s");
                    tokio::time::sleep(RETRY).await;
                }
            }
        },
    };
    tracing::info!(
        addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        "admission webhook serving"
    );
    draingate_serve::limits::serve_https(
        listener,
        draingate_serve::limits::FaceLimits::gate_webhook(),
        config,
        router(),
        shutdown,
    )
    .await;
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Pod;
    use serde_json::{Value, json};

    use super::{patch_for, review, self_signed};

    fn pod(owner_kind: Option<&str>, gates: Option<Value>) -> Pod {
        let mut pod = json!({
            "metadata": {"generateName": "web-7c9d-", "namespace": "shop"},
            "spec": {"containers": [{"name": "web", "image": "web"}]}
        });
        if let Some(kind) = owner_kind {
            pod["metadata"]["ownerReferences"] = json!([{
                "apiVersion": "apps/v1", "kind": kind, "name": "web-7c9d",
                "uid": "u", "controller": true
            }]);
        }
        if let Some(gates) = gates {
            pod["spec"]["readinessGates"] = gates;
        }
        serde_json::from_value(pod).unwrap()
    }

    #[test]
    fn only_a_replica_sets_pods_get_the_gate_and_only_once() {
        assert_eq!(
            patch_for(&pod(Some("ReplicaSet"), None)),
            Some(json!([{"op": "add", "path": "/spec/readinessGates",
                         "value": [{"conditionType": "draingate.io/predecessors-drained"}]}]))
        );
        assert_eq!(
            patch_for(&pod(
                Some("ReplicaSet"),
                Some(json!([{"conditionType": "example.com/other"}]))
            )),
            Some(json!([{"op": "add", "path": "/spec/readinessGates/-",
                         "value": {"conditionType": "draingate.io/predecessors-drained"}}]))
        );
        assert_eq!(
            patch_for(&pod(
                Some("ReplicaSet"),
                Some(json!([{"conditionType": "draingate.io/predecessors-drained"}]))
            )),
            None
        );
        assert_eq!(patch_for(&pod(Some("StatefulSet"), None)), None);
        assert_eq!(patch_for(&pod(None, None)), None);
    }

    fn admission(operation: &str, object: &Pod) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "shop",
                "operation": operation,
                "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
                "object": object,
                "dryRun": false
            }
        }))
        .unwrap()
    }

    /// The answer the API server reads: the request's uid, allowed, and a JSON patch
    /// that, applied to the pod, gives it the gate.
    #[test]
    fn a_review_answers_allowed_with_a_patch_that_adds_the_gate() {
        let original = pod(Some("ReplicaSet"), None);
        let answer =
            serde_json::to_value(review(&admission("CREATE", &original)).unwrap()).unwrap();
        let response = &answer["response"];
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(answer["kind"], "AdmissionReview");
        assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(response["allowed"], true);
        assert_eq!(response["patchType"], "JSONPatch");
        // kube-rs writes the bytes as a JSON array, which the API server's Go decoder reads as
        // it reads base64 (the real API server applies it in tests/tests/hold.rs).
        let bytes: Vec<u8> = serde_json::from_value(response["patch"].clone()).expect("a patch");
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
        let mut patched = serde_json::to_value(&original).unwrap();
        json_patch::patch(&mut patched, &patch).unwrap();
        assert_eq!(
            patched["spec"]["readinessGates"],
            json!([{"conditionType": "draingate.io/predecessors-drained"}])
        );
        // An update, or a pod no ReplicaSet owns: allowed, untouched.
        for (operation, pod) in [("UPDATE", &original), ("CREATE", &pod(None, None))] {
            let answer = serde_json::to_value(review(&admission(operation, pod)).unwrap()).unwrap();
            assert_eq!(answer["response"]["allowed"], true);
            assert!(answer["response"].get("patch").is_none(), "{answer}");
        }
        // Not a review: refused with the reason, never a panic.
        for body in [&b"{}"[..], b"[", b"{\"request\": 5}"] {
            assert!(review(body).is_err());
        }
    }

    #[test]
    fn a_self_made_certificate_serves_tls_for_its_names() {
        let names = vec![
            "draingate-gate.draingate.svc".to_owned(),
            "127.0.0.1".to_owned(),
        ];
        let cert = self_signed(&names, std::time::Duration::from_hours(1)).unwrap();
        assert!(cert.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert_ne!(cert.ca_pem, cert.cert_pem);
        draingate_serve::tls::https_config(cert.cert_pem.as_bytes(), cert.key_pem.as_bytes())
            .unwrap();
    }
}
