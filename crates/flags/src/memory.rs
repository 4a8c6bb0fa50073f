//! Flag state for the memory engine: one map per tenant, whose writes append their events to
//! the tenant's log under the same lock, so the log's order is the order of the writes.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, PoisonError};

use changegate_core::{EnvironmentId, Feed, MemoryEngine, TenantId, Timestamp};

use crate::{Emit, Environment, FlagError};

/// Every tenant's environments, flags and segments.
#[derive(Debug, Default)]
pub struct MemoryFlags {
    tenants: Mutex<HashMap<TenantId, BTreeMap<String, Environment>>>,
}

impl MemoryFlags {
    /// Creates an environment (idempotent: `false` if it existed).
    pub fn create_environment(&self, tenant: &TenantId, environment: &EnvironmentId) -> bool {
        let mut tenants = self.tenants.lock().unwrap_or_else(PoisonError::into_inner);
        let environments = tenants.entry(tenant.clone()).or_default();
        if environments.contains_key(environment.as_str()) {
            return false;
        }
        environments.insert(environment.to_string(), Environment::default());
        true
    }

    /// The tenant's environments.
    pub fn environments(&self, tenant: &TenantId) -> Vec<String> {
        let tenants = self.tenants.lock().unwrap_or_else(PoisonError::into_inner);
        tenants.get(tenant).map(|e| e.keys().cloned().collect()).unwrap_or_default()
    }

    /// A copy of one environment's state.
    pub fn read(&self, tenant: &TenantId, environment: &EnvironmentId) -> Result<Environment, FlagError> {
        let tenants = self.tenants.lock().unwrap_or_else(PoisonError::into_inner);
        tenants
            .get(tenant)
            .and_then(|e| e.get(environment.as_str()))
            .cloned()
            .ok_or_else(|| FlagError::NotFound(format!("environment `{environment}`")))
    }

    /// Applies a write and logs its events, in order, before anyone else can write.
    pub fn write<R>(
        &self,
        engine: &MemoryEngine,
        tenant: &TenantId,
        environment: &EnvironmentId,
        op: impl FnOnce(&mut Environment, &str) -> Result<(R, Vec<Emit>), FlagError>,
    ) -> Result<R, FlagError> {
        let mut tenants = self.tenants.lock().unwrap_or_else(PoisonError::into_inner);
        let state = tenants
            .get_mut(tenant)
            .and_then(|e| e.get_mut(environment.as_str()))
            .ok_or_else(|| FlagError::NotFound(format!("environment `{environment}`")))?;
        let (result, events) = op(state, &Timestamp::now().rfc3339())?;
        for event in events {
            engine.append(tenant, Feed::Flags, event.into_body(environment));
        }
        Ok(result)
    }
}
