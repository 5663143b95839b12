//! `[residency]` in custos.toml: where tenants' keys and backups may be, so
//! that a customer can show (and custos enforces) that no key is held by a
//! provider they ruled out, e.g. one reachable under another country's law.
//!
//! ```toml
//! [residency]
//! key_providers = ["pkcs11", "kmip"]       # schemes of key references
//! pkcs11_tokens = ["hospital-hsm", "backup-hsm/5c1a0e7f"]  # label, or label/serial
//! kmip_servers  = ["kms.hospital.internal:5696"]
//! kms_regions   = ["eu-central-1"]          # AWS KMS regions
//! kms_endpoints = ["https://vpce-0a1b.kms.eu-central-1.vpce.amazonaws.com"]
//! stores        = ["s3://backups/custos"]   # store locations (and beneath)
//! s3_endpoints  = ["https://minio.hospital.internal:9000"]
//! ```
//!
//! Each rule present restricts; an absent rule allows anything. A rule is an
//! allow-list: an empty list allows nothing.
//!
//! The rules are checked when a key is bound to a tenant, by `policy
//! validate` and the daemon, and before every key operation (the key gate of
//! `crate::context`): a key named by the store (a tampered descriptor or
//! envelope, a legacy tenant) is refused before its provider is called. At
//! an operation the facts are the provider's own (the region and endpoint
//! the AWS KMS client calls, the KMIP server), not only the configuration's.

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

use super::diag::PolicyError;
use super::policy::Policy;
use super::settings::StoreLocation;
use crate::keys::pkcs11::Pkcs11Uri;
use crate::keys::{KeyRef, ProviderKind};

pub(super) const KEYS: &[&str] = &[
    "key_providers",
    "pkcs11_tokens",
    "kmip_servers",
    "kms_regions",
    "kms_endpoints",
    "stores",
    "s3_endpoints",
];

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Residency {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_providers: Option<Vec<ProviderKind>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pkcs11_tokens: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kmip_servers: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kms_regions: Option<Vec<String>>,
    /// The AWS KMS endpoint URLs custos may call (a VPC endpoint, a
    /// sovereign partition's endpoint).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kms_endpoints: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stores: Option<Vec<StoreLocation>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub s3_endpoints: Option<Vec<String>>,
    /// The file that set the rules, for messages.
    #[serde(skip)]
    pub file: Option<PathBuf>,
}

/// Where the configuration sends a key's operations, beyond what its
/// reference says: the AWS region a key id or alias resolves in, the KMIP
/// server every `kmip:` key lives on.
#[derive(Debug, Clone, Default)]
pub struct Placement {
    pub kms_region: Option<String>,
    /// The endpoint AWS KMS calls go to: the configured one, else
    /// `https://kms.<region>.amazonaws.com`.
    pub kms_endpoint: Option<String>,
    pub kmip_server: Option<String>,
}

impl Placement {
    /// This placement with what a provider reports about itself
    /// ([`crate::keys::Custody::details`]: `region`, `endpoint`, `server`)
    /// in place of the configuration's guess.
    pub fn with_custody(&self, custody: &crate::keys::Custody) -> Placement {
        let fact = |name: &str, configured: &Option<String>| {
            custody
                .details
                .get(name)
                .cloned()
                .or_else(|| configured.clone())
        };
        match custody.provider {
            ProviderKind::AwsKms => Placement {
                kms_region: fact("region", &self.kms_region),
                kms_endpoint: fact("endpoint", &self.kms_endpoint),
                kmip_server: self.kmip_server.clone(),
            },
            ProviderKind::Kmip => Placement {
                kmip_server: fact("server", &self.kmip_server),
                ..self.clone()
            },
            ProviderKind::Local | ProviderKind::Pkcs11 => self.clone(),
        }
    }
}

/// A `pkcs11_tokens` entry: `label`, or `label/serial` (the serial after the
/// last `/`), which admits only references that pin that serial.
fn token_entry_admits(entry: &str, uri: &Pkcs11Uri) -> bool {
    match entry.rsplit_once('/') {
        Some((label, serial)) => label == uri.token && uri.serial.as_deref() == Some(serial),
        None => entry == uri.token,
    }
}

/// The rules with the facts they are checked against: what a daemon or a
/// command that binds keys holds.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    pub residency: Residency,
    pub placement: Placement,
}

impl Rules {
    pub fn check_key(&self, key: &KeyRef) -> Result<(), ResidencyViolation> {
        self.residency.check_key(key, &self.placement)
    }

    /// A policy whose key is outside the rules, as the policy's error.
    pub fn check_policy(&self, policy: &Policy) -> Result<(), PolicyError> {
        self.check_key(&policy.key)
            .map_err(|e| PolicyError::file(&policy.file, format!("tenant {}: {e}", policy.tenant)))
    }
}

/// A key or store outside a `[residency]` rule; names the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{subject} is outside the residency rule [residency] {rule} = {allowed}{}: {why}", in_file(.file))]
pub struct ResidencyViolation {
    pub rule: &'static str,
    pub allowed: String,
    pub subject: String,
    pub why: String,
    pub file: Option<PathBuf>,
}

fn in_file(file: &Option<PathBuf>) -> String {
    file.as_ref()
        .map(|f| format!(" (in {})", f.display()))
        .unwrap_or_default()
}

fn list<T: fmt::Display>(items: &[T]) -> String {
    let quoted: Vec<String> = items
        .iter()
        .map(|i| format!("{:?}", i.to_string()))
        .collect();
    format!("[{}]", quoted.join(", "))
}

impl Residency {
    pub fn is_unrestricted(&self) -> bool {
        self == &Residency {
            file: self.file.clone(),
            ..Residency::default()
        }
    }

    fn violation(
        &self,
        rule: &'static str,
        allowed: String,
        subject: String,
        why: String,
    ) -> ResidencyViolation {
        ResidencyViolation {
            rule,
            allowed,
            subject,
            why,
            file: self.file.clone(),
        }
    }

    /// Whether tenants may use `key`, given where the configuration sends
    /// its provider's calls.
    pub fn check_key(&self, key: &KeyRef, at: &Placement) -> Result<(), ResidencyViolation> {
        let subject = format!("key {key}");
        if let Some(allowed) = &self.key_providers
            && !allowed.contains(&key.kind())
        {
            let schemes: Vec<&str> = allowed.iter().map(|k| k.scheme()).collect();
            return Err(self.violation(
                "key_providers",
                list(&schemes),
                subject,
                format!("its provider {} is not allowed", key.kind().scheme()),
            ));
        }
        match key.kind() {
            ProviderKind::Pkcs11 => {
                if let Some(allowed) = &self.pkcs11_tokens {
                    let uri = Pkcs11Uri::parse(key.id()).ok();
                    if !uri
                        .as_ref()
                        .is_some_and(|u| allowed.iter().any(|e| token_entry_admits(e, u)))
                    {
                        let token = uri.map(|u| match u.serial {
                            Some(serial) => format!("{:?} (serial {serial})", u.token),
                            None => format!("{:?} (no serial= in the reference)", u.token),
                        });
                        return Err(self.violation(
                            "pkcs11_tokens",
                            list(allowed),
                            subject,
                            format!(
                                "its token {} is not allowed",
                                token.unwrap_or_else(|| "(unparsable)".into())
                            ),
                        ));
                    }
                }
            }
            ProviderKind::Kmip => {
                if let Some(allowed) = &self.kmip_servers {
                    match &at.kmip_server {
                        Some(server) if allowed.contains(server) => {}
                        Some(server) => {
                            return Err(self.violation(
                                "kmip_servers",
                                list(allowed),
                                subject,
                                format!("[kmip] server {server:?} is not allowed"),
                            ));
                        }
                        None => {
                            return Err(self.violation(
                                "kmip_servers",
                                list(allowed),
                                subject,
                                "no [kmip] server is configured".into(),
                            ));
                        }
                    }
                }
            }
            ProviderKind::AwsKms => {
                // The SDK calls the client's region (its endpoint) whatever
                // region a key ARN names: a key of another region would be
                // asked about there. Both must be allowed, so they must agree.
                let arn = crate::keys::aws_kms::arn_region(key.id());
                if let (Some(a), Some(c)) = (arn, at.kms_region.as_deref())
                    && a != c
                {
                    let rule = match (&self.kms_regions, &self.kms_endpoints) {
                        (Some(allowed), _) => Some(("kms_regions", list(allowed))),
                        (None, Some(allowed)) => Some(("kms_endpoints", list(allowed))),
                        (None, None) => None,
                    };
                    if let Some((rule, allowed)) = rule {
                        return Err(self.violation(
                            rule,
                            allowed,
                            subject,
                            format!(
                                "its ARN names region {a:?}, but the AWS KMS client calls region {c:?}{}: the \
                                 request would go there, not to {a:?} (set [aws] region = {a:?})",
                                at.kms_endpoint
                                    .as_deref()
                                    .map(|e| format!(" at {e}"))
                                    .unwrap_or_default()
                            ),
                        ));
                    }
                }
                if let Some(allowed) = &self.kms_regions {
                    // The region called: the client's; an ARN's own when the
                    // client's is not known (no [aws] region).
                    let region = at.kms_region.clone().or_else(|| arn.map(str::to_owned));
                    match region {
                        Some(r) if allowed.contains(&r) => {}
                        Some(r) => {
                            return Err(self.violation(
                                "kms_regions",
                                list(allowed),
                                subject,
                                format!("its region {r:?} is not allowed"),
                            ));
                        }
                        None => {
                            return Err(self.violation(
                                "kms_regions",
                                list(allowed),
                                subject,
                                "its region is unknown (no ARN, no [aws] region)".into(),
                            ));
                        }
                    }
                }
                if let Some(allowed) = &self.kms_endpoints {
                    let endpoint = at.kms_endpoint.as_deref().map(|e| e.trim_end_matches('/'));
                    match endpoint {
                        Some(e) if allowed.iter().any(|a| a.trim_end_matches('/') == e) => {}
                        Some(e) => {
                            return Err(self.violation(
                                "kms_endpoints",
                                list(allowed),
                                subject,
                                format!("its endpoint {e:?} is not allowed"),
                            ));
                        }
                        None => {
                            return Err(self.violation(
                                "kms_endpoints",
                                list(allowed),
                                subject,
                                "its endpoint is unknown (no [aws] kms_endpoint_url or endpoint_url, no region)"
                                    .into(),
                            ));
                        }
                    }
                }
            }
            ProviderKind::Local => {}
        }
        Ok(())
    }

    /// Whether the store (and, for S3, the endpoint it is reached at) is allowed.
    pub fn check_store(
        &self,
        store: &StoreLocation,
        s3_endpoint: Option<&str>,
    ) -> Result<(), ResidencyViolation> {
        let subject = format!("store {store}");
        if let Some(allowed) = &self.stores
            && !allowed.iter().any(|a| beneath(store, a))
        {
            return Err(self.violation(
                "stores",
                list(allowed),
                subject,
                "it is neither one of them nor beneath one".into(),
            ));
        }
        if let (Some(allowed), StoreLocation::S3 { .. }) = (&self.s3_endpoints, store) {
            let endpoint = s3_endpoint.map(|e| e.trim_end_matches('/'));
            match endpoint {
                Some(e) if allowed.iter().any(|a| a.trim_end_matches('/') == e) => {}
                Some(e) => {
                    return Err(self.violation(
                        "s3_endpoints",
                        list(allowed),
                        subject,
                        format!("its endpoint {e:?} is not allowed"),
                    ));
                }
                None => {
                    return Err(self.violation(
                        "s3_endpoints",
                        list(allowed),
                        subject,
                        "it would be reached at AWS's own S3 endpoint (no [aws] endpoint_url)"
                            .into(),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// `store` is `allowed` or beneath it (at a path-segment boundary).
fn beneath(store: &StoreLocation, allowed: &StoreLocation) -> bool {
    let under = |inner: &str, outer: &str| {
        outer.is_empty()
            || inner == outer
            || inner
                .strip_prefix(outer)
                .is_some_and(|rest| rest.starts_with('/'))
    };
    match (store, allowed) {
        (StoreLocation::Local(p), StoreLocation::Local(a)) => p.starts_with(a),
        (
            StoreLocation::S3 { bucket, prefix },
            StoreLocation::S3 {
                bucket: ab,
                prefix: ap,
            },
        ) => bucket == ab && under(prefix, ap),
        (StoreLocation::Memory, StoreLocation::Memory) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> KeyRef {
        KeyRef::parse(s).unwrap()
    }

    #[test]
    fn an_arn_of_another_region_than_the_client_calls_is_refused() {
        let r = Residency {
            kms_regions: Some(vec!["eu-central-1".into()]),
            ..Default::default()
        };
        let arn = key(
            "aws-kms:arn:aws:kms:eu-central-1:111122223333:key/0b6f2c1e-1111-2222-3333-444455556666",
        );
        let at = |region: &str| Placement {
            kms_region: Some(region.into()),
            kms_endpoint: Some(format!("https://kms.{region}.amazonaws.com")),
            kmip_server: None,
        };
        r.check_key(&arn, &at("eu-central-1")).unwrap();
        let e = r.check_key(&arn, &at("us-east-1")).unwrap_err();
        assert_eq!(e.rule, "kms_regions");
        let msg = e.to_string();
        assert!(
            msg.contains("\"us-east-1\" at https://kms.us-east-1.amazonaws.com")
                && msg.contains("set [aws] region = \"eu-central-1\""),
            "{msg}"
        );
        // An alias resolves where the client calls.
        r.check_key(&key("aws-kms:alias/x"), &at("eu-central-1"))
            .unwrap();
        assert!(
            r.check_key(&key("aws-kms:alias/x"), &at("us-east-1"))
                .is_err()
        );
        // Only endpoints restricted: a mismatch is still refused, by that rule.
        let r = Residency {
            kms_endpoints: Some(vec!["https://kms.eu-central-1.amazonaws.com".into()]),
            ..Default::default()
        };
        let e = r.check_key(&arn, &at("us-east-1")).unwrap_err();
        assert_eq!(e.rule, "kms_endpoints");
    }

    #[test]
    fn an_absent_rule_allows_and_a_present_one_restricts() {
        let open = Residency::default();
        assert!(open.is_unrestricted());
        open.check_key(&key("aws-kms:alias/x"), &Placement::default())
            .unwrap();
        let r = Residency {
            key_providers: Some(vec![ProviderKind::Pkcs11, ProviderKind::Kmip]),
            pkcs11_tokens: Some(vec!["hsm".into()]),
            kmip_servers: Some(vec!["kms.internal:5696".into()]),
            file: Some("/etc/custos/custos.toml".into()),
            ..Default::default()
        };
        let e = r
            .check_key(&key("aws-kms:alias/x"), &Placement::default())
            .unwrap_err();
        assert_eq!(e.rule, "key_providers");
        let msg = e.to_string();
        assert!(
            msg.contains("[residency] key_providers = [\"pkcs11\", \"kmip\"]")
                && msg.contains("aws-kms")
                && msg.contains("/etc/custos/custos.toml"),
            "{msg}"
        );
        r.check_key(&key("pkcs11:token=hsm;object=a"), &Placement::default())
            .unwrap();
        let e = r
            .check_key(&key("pkcs11:token=other;object=a"), &Placement::default())
            .unwrap_err();
        assert_eq!(e.rule, "pkcs11_tokens");
        let at = |s: &str| Placement {
            kmip_server: Some(s.into()),
            ..Default::default()
        };
        r.check_key(&key("kmip:name/a"), &at("kms.internal:5696"))
            .unwrap();
        assert_eq!(
            r.check_key(&key("kmip:name/a"), &at("evil:5696"))
                .unwrap_err()
                .rule,
            "kmip_servers"
        );
        assert_eq!(
            r.check_key(&key("local:a"), &Placement::default())
                .unwrap_err()
                .rule,
            "key_providers"
        );
        let none = Residency {
            key_providers: Some(vec![]),
            ..Default::default()
        };
        assert!(
            none.check_key(&key("local:a"), &Placement::default())
                .is_err()
        );
    }

    #[test]
    fn kms_regions_come_from_the_arn_or_the_configuration() {
        let r = Residency {
            kms_regions: Some(vec!["eu-central-1".into()]),
            ..Default::default()
        };
        let arn =
            "aws-kms:arn:aws:kms:us-east-1:111122223333:key/0b6f2c1e-1111-2222-3333-444455556666";
        let eu = Placement {
            kms_region: Some("eu-central-1".into()),
            ..Default::default()
        };
        // The ARN's region wins over the configured one.
        assert!(r.check_key(&key(arn), &eu).is_err());
        r.check_key(&key("aws-kms:alias/a"), &eu).unwrap();
        assert!(
            r.check_key(&key("aws-kms:alias/a"), &Placement::default())
                .is_err()
        );
    }

    #[test]
    fn pkcs11_tokens_match_a_label_or_a_label_and_its_serial() {
        let r = Residency {
            pkcs11_tokens: Some(vec!["hsm".into(), "vault/5c1a0e7f".into()]),
            ..Default::default()
        };
        let at = Placement::default();
        for ok in [
            "pkcs11:token=hsm;object=a",
            "pkcs11:token=hsm;serial=anything;object=a",
            "pkcs11:token=vault;serial=5c1a0e7f;object=a",
        ] {
            r.check_key(&key(ok), &at)
                .unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        // A serial pinned by the rule must be pinned by the reference too:
        // without it the provider would take any token of that label.
        for bad in [
            "pkcs11:token=vault;object=a",
            "pkcs11:token=vault;serial=00000000;object=a",
            "pkcs11:token=other;object=a",
        ] {
            let e = r.check_key(&key(bad), &at).unwrap_err();
            assert_eq!(e.rule, "pkcs11_tokens", "{bad}");
            assert!(e.to_string().contains("vault/5c1a0e7f"), "{e}");
        }
    }

    #[test]
    fn kms_endpoints_come_from_the_configuration_or_the_provider() {
        let r = Residency {
            kms_endpoints: Some(vec![
                "https://vpce-1.kms.eu-central-1.vpce.amazonaws.com/".into(),
            ]),
            ..Default::default()
        };
        let at = |e: Option<&str>| Placement {
            kms_endpoint: e.map(str::to_owned),
            ..Default::default()
        };
        let k = key("aws-kms:alias/a");
        r.check_key(
            &k,
            &at(Some("https://vpce-1.kms.eu-central-1.vpce.amazonaws.com")),
        )
        .unwrap();
        let e = r
            .check_key(&k, &at(Some("https://kms.us-east-1.amazonaws.com")))
            .unwrap_err();
        assert_eq!(e.rule, "kms_endpoints");
        assert!(e.to_string().contains("kms.us-east-1"), "{e}");
        assert_eq!(
            r.check_key(&k, &at(None)).unwrap_err().rule,
            "kms_endpoints"
        );
        // At use, the endpoint the provider calls wins over the configured one.
        let custody = crate::keys::Custody {
            provider: ProviderKind::AwsKms,
            holder: String::new(),
            details: [("endpoint".to_owned(), "http://127.0.0.1:1".to_owned())].into(),
            network: true,
        };
        let configured = at(Some("https://vpce-1.kms.eu-central-1.vpce.amazonaws.com"));
        assert_eq!(
            r.check_key(&k, &configured.with_custody(&custody))
                .unwrap_err()
                .rule,
            "kms_endpoints"
        );
        // Other providers are not touched by the rule.
        r.check_key(&key("local:a"), &at(None)).unwrap();
    }

    #[test]
    fn stores_match_at_segment_boundaries() {
        let base = std::path::Path::new("/");
        let loc = |s: &str| StoreLocation::parse(s, base).unwrap();
        let r = Residency {
            stores: Some(vec![loc("s3://backups/custos"), loc("/srv/custos")]),
            s3_endpoints: Some(vec!["https://minio.internal:9000".into()]),
            ..Default::default()
        };
        let minio = Some("https://minio.internal:9000/");
        r.check_store(&loc("s3://backups/custos/t1"), minio)
            .unwrap();
        r.check_store(&loc("s3://backups/custos"), minio).unwrap();
        r.check_store(&loc("/srv/custos/store"), None).unwrap();
        for bad in ["s3://backups/custos2", "s3://other/custos", "/srv/custos2"] {
            assert_eq!(
                r.check_store(&loc(bad), minio).unwrap_err().rule,
                "stores",
                "{bad}"
            );
        }
        assert_eq!(
            r.check_store(&loc("s3://backups/custos"), None)
                .unwrap_err()
                .rule,
            "s3_endpoints"
        );
        assert_eq!(
            r.check_store(
                &loc("s3://backups/custos"),
                Some("https://s3.amazonaws.com")
            )
            .unwrap_err()
            .rule,
            "s3_endpoints"
        );
    }
}
