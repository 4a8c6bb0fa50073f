//! Keys for the memory engine: loaded from a JSON file, or generated for the `dev` tenant.

use changegate_core::{ApiKey, EnvironmentId, KeyRecord, MemoryKeys, Scope, TenantId};
use serde::Deserialize;

/// A key file could not be used. Never contains a key.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// Not the documented JSON shape.
    #[error(
        "key file is not a JSON array of {{\"tenant\",\"scope\",\"key\"[,\"environment\"][,\"revoked\"]}}: {0}"
    )]
    Shape(#[from] serde_json::Error),
    /// One entry is invalid.
    #[error("key file entry {index}: {reason}")]
    Entry {
        /// Zero-based index of the entry.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    tenant: String,
    scope: String,
    key: String,
    environment: Option<String>,
    #[serde(default)]
    revoked: bool,
}

/// The record stored for `key`.
pub fn record(
    key: &ApiKey,
    tenant: TenantId,
    environment: Option<EnvironmentId>,
    revoked: bool,
) -> KeyRecord {
    KeyRecord { id: key.hash().id(), hash: key.hash(), tenant, environment, scope: key.scope(), revoked }
}

/// Parses the `--keys` file format:
/// `[{"tenant":"t1","scope":"anon","key":"flc_anon_…"}, {"tenant":"t1","environment":"production","scope":"sdk","key":"flc_sdk_…"}]`
/// with an optional `"revoked": true`.
pub fn parse_key_file(json: &str) -> Result<MemoryKeys, KeyFileError> {
    let entries: Vec<Entry> = serde_json::from_str(json)?;
    let mut keys = MemoryKeys::default();
    for (index, entry) in entries.into_iter().enumerate() {
        let bad = |reason: String| KeyFileError::Entry { index, reason };
        let tenant = TenantId::parse(&entry.tenant).map_err(|e| bad(e.to_string()))?;
        let scope: Scope =
            entry.scope.parse().map_err(|e: changegate_core::auth::UnknownScope| bad(e.to_string()))?;
        let key = ApiKey::parse(&entry.key).map_err(|e| bad(e.to_string()))?;
        if key.scope() != scope {
            return Err(bad(format!("the key is a `{}` key but `scope` says `{scope}`", key.scope())));
        }
        let environment = entry
            .environment
            .as_deref()
            .map(EnvironmentId::parse)
            .transpose()
            .map_err(|e| bad(e.to_string()))?;
        keys.insert(record(&key, tenant, environment, entry.revoked));
    }
    Ok(keys)
}

/// Fresh `anon`, `publish`, `service` keys for tenant `dev`, and an `sdk` key for its
/// `development` environment.
pub fn dev_keys() -> (MemoryKeys, Vec<ApiKey>) {
    let mut keys = MemoryKeys::default();
    let mut issued = Vec::new();
    for scope in [Scope::Anon, Scope::Publish, Scope::Service, Scope::Sdk] {
        let key = ApiKey::generate(scope);
        let environment = (scope == Scope::Sdk).then(dev_environment);
        keys.insert(record(&key, dev_tenant(), environment, false));
        issued.push(key);
    }
    (keys, issued)
}

/// The environment the dev tenant's `sdk` key belongs to.
pub fn dev_environment() -> EnvironmentId {
    #[allow(clippy::expect_used)]
    EnvironmentId::parse("development").expect("`development` is a valid environment id")
}

/// The tenant the memory engine creates when no key file is given.
pub fn dev_tenant() -> TenantId {
    #[allow(clippy::expect_used)]
    TenantId::parse("dev").expect("`dev` is a valid tenant id")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_file_loads_every_entry_with_its_tenant_scope_and_environment() {
        let anon = ApiKey::generate(Scope::Anon);
        let sdk = ApiKey::generate(Scope::Sdk);
        let json = format!(
            r#"[{{"tenant":"t1","scope":"anon","key":"{}"}},
                {{"tenant":"t2","environment":"production","scope":"sdk","key":"{}","revoked":true}}]"#,
            anon.expose(),
            sdk.expose()
        );
        let keys = parse_key_file(&json).unwrap();
        let a = keys.find(&anon).unwrap();
        assert_eq!(
            (a.tenant.as_str(), a.scope, a.revoked, a.environment.is_none()),
            ("t1", Scope::Anon, false, true)
        );
        let s = keys.find(&sdk).unwrap();
        assert_eq!(s.environment.as_ref().unwrap().as_str(), "production");
        assert!(s.revoked);
        assert!(keys.find(&ApiKey::generate(Scope::Anon)).is_none());
    }

    #[test]
    fn a_key_whose_prefix_contradicts_its_scope_is_refused_without_echoing_it() {
        let key = ApiKey::generate(Scope::Service);
        let json = format!(r#"[{{"tenant":"t1","scope":"anon","key":"{}"}}]"#, key.expose());
        let error = parse_key_file(&json).unwrap_err().to_string();
        assert!(error.contains("entry 0") && error.contains("`service` key"), "{error}");
        assert!(!error.contains(key.expose()));
    }

    #[test]
    fn malformed_key_files_are_refused() {
        for bad in ["{}", "[{\"tenant\":\"t\"}]", "[{\"tenant\":\"t\",\"scope\":\"anon\",\"key\":\"nope\"}]"]
        {
            assert!(parse_key_file(bad).is_err(), "{bad}");
        }
    }
}
