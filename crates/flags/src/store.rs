//! The flags of one environment as a state machine: every write validates, bumps a monotonic
//! version, honours `If-Match`, and returns the events it causes. Both engines run the same
//! transitions; they differ only in where the state is kept.

use std::collections::BTreeMap;

use changegate_core::{ConfigReason, EnvironmentId, EventBody, FlagEventKind};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::FlagError;
use crate::model::{
    Flag, FlagSpec, NewFlag, Rule, Segment, SegmentSpec, check_condition, check_key, validate,
};

/// An event a write causes, before it is logged.
#[derive(Clone, PartialEq, Debug)]
pub enum Emit {
    /// A flag changed.
    Flag {
        /// What happened.
        kind: FlagEventKind,
        /// The flag's key.
        key: String,
        /// Its version after the change.
        version: u64,
        /// Its FlagDto after the change (`null` when deleted).
        flag: Value,
    },
    /// Configuration that may affect many flags changed.
    Config(ConfigReason),
}

impl Emit {
    /// The event as the shared model carries it.
    pub fn into_body(self, environment: &EnvironmentId) -> EventBody {
        match self {
            Self::Flag { kind, key, version, flag } => {
                EventBody::Flag { environment: environment.clone(), kind, flag_key: key, version, flag }
            }
            Self::Config(reason) => {
                EventBody::Config { environment: Some(environment.clone()), reason, valid_until: None }
            }
        }
    }
}

/// One environment's flags and segments.
#[derive(Serialize, Deserialize, Default, Clone, PartialEq, Debug)]
#[serde(default)]
pub struct Environment {
    /// Flags by key.
    pub flags: BTreeMap<String, Flag>,
    /// Segments by key.
    pub segments: BTreeMap<String, Segment>,
    /// The last version of each deleted flag, so a re-created one continues from it.
    pub flag_tombstones: BTreeMap<String, u64>,
    /// The same for segments.
    pub segment_tombstones: BTreeMap<String, u64>,
}

fn check_version(current: u64, if_match: Option<u64>) -> Result<(), FlagError> {
    match if_match {
        Some(expected) if expected != current => Err(FlagError::VersionMismatch { current }),
        _ => Ok(()),
    }
}

fn dto(flag: &Flag) -> Value {
    serde_json::to_value(flag).unwrap_or(Value::Null)
}

fn flag_event(kind: FlagEventKind, flag: &Flag) -> Emit {
    Emit::Flag { kind, key: flag.key.clone(), version: flag.version, flag: dto(flag) }
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    if let Value::Object(target) = target {
        for (name, value) in patch {
            if value.is_null() {
                target.remove(name);
            } else {
                merge(target.entry(name.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

impl Environment {
    fn segment_exists(&self) -> impl Fn(&str) -> bool + '_ {
        |key| self.segments.contains_key(key)
    }

    fn build(
        &self,
        key: &str,
        environment: &str,
        spec: FlagSpec,
        base: Option<&Flag>,
        now: &str,
    ) -> Result<Flag, FlagError> {
        let (variants, default_variant) = match (spec.variants, spec.default_variant) {
            (Some(variants), Some(default)) => (variants, default),
            (Some(variants), None) => {
                let first = variants.keys().next().cloned().unwrap_or_default();
                (variants, first)
            }
            (None, default) => (
                BTreeMap::from([
                    ("off".to_owned(), Value::Bool(false)),
                    ("on".to_owned(), Value::Bool(true)),
                ]),
                default.unwrap_or_else(|| "off".to_owned()),
            ),
        };
        let mut rules = spec.rules.or_else(|| base.map(|b| b.rules.clone())).unwrap_or_default();
        rules.sort_by_key(|r| r.priority);
        let version = match base {
            Some(b) => b.version + 1,
            None => self.flag_tombstones.get(key).copied().unwrap_or(0) + 1,
        };
        let flag = Flag {
            key: key.to_owned(),
            environment: environment.to_owned(),
            name: spec.name.unwrap_or_else(|| key.to_owned()),
            description: spec.description,
            enabled: spec.enabled,
            variants,
            default_variant,
            tags: spec.tags,
            rules,
            version,
            created_at: base.map_or_else(|| now.to_owned(), |b| b.created_at.clone()),
            updated_at: now.to_owned(),
        };
        validate(&flag, self.segment_exists())?;
        Ok(flag)
    }

    /// `POST /v1/flags`.
    pub fn create_flag(
        &mut self,
        environment: &str,
        new: NewFlag,
        now: &str,
    ) -> Result<(Flag, Vec<Emit>), FlagError> {
        check_key("flag key", &new.key)?;
        if self.flags.contains_key(&new.key) {
            return Err(FlagError::Exists(format!("flag `{}`", new.key)));
        }
        let flag = self.build(&new.key, environment, new.spec, None, now)?;
        self.flag_tombstones.remove(&flag.key);
        self.flags.insert(flag.key.clone(), flag.clone());
        let event = flag_event(FlagEventKind::FlagCreated, &flag);
        Ok((flag, vec![event]))
    }

    fn existing(&self, key: &str) -> Result<&Flag, FlagError> {
        self.flags.get(key).ok_or_else(|| FlagError::NotFound(format!("flag `{key}`")))
    }

    fn store(&mut self, kind: FlagEventKind, flag: Flag) -> (Flag, Vec<Emit>) {
        let event = flag_event(kind, &flag);
        self.flags.insert(flag.key.clone(), flag.clone());
        (flag, vec![event])
    }

    /// `PUT /v1/flags/{key}`: replaces the editable fields (rules are kept unless given).
    pub fn replace_flag(
        &mut self,
        key: &str,
        spec: FlagSpec,
        if_match: Option<u64>,
        now: &str,
    ) -> Result<(Flag, Vec<Emit>), FlagError> {
        let current = self.existing(key)?.clone();
        check_version(current.version, if_match)?;
        let flag = self.build(key, &current.environment, spec, Some(&current), now)?;
        Ok(self.store(FlagEventKind::FlagUpdated, flag))
    }

    /// `PATCH /v1/flags/{key}`: a JSON merge patch over the editable fields.
    pub fn patch_flag(
        &mut self,
        key: &str,
        patch: &Value,
        if_match: Option<u64>,
        now: &str,
    ) -> Result<(Flag, Vec<Emit>), FlagError> {
        let current = self.existing(key)?.clone();
        check_version(current.version, if_match)?;
        let mut spec = serde_json::to_value(FlagSpec {
            name: Some(current.name.clone()),
            description: current.description.clone(),
            enabled: current.enabled,
            variants: Some(current.variants.clone()),
            default_variant: Some(current.default_variant.clone()),
            tags: current.tags.clone(),
            rules: Some(current.rules.clone()),
        })
        .map_err(|e| FlagError::Invalid(e.to_string()))?;
        merge(&mut spec, patch);
        let spec: FlagSpec =
            serde_json::from_value(spec).map_err(|e| FlagError::Invalid(format!("patch: {e}")))?;
        let kind = if spec.rules.as_ref() == Some(&current.rules) {
            FlagEventKind::FlagUpdated
        } else {
            FlagEventKind::RuleUpdated
        };
        let flag = self.build(key, &current.environment, spec, Some(&current), now)?;
        Ok(self.store(kind, flag))
    }

    /// `DELETE /v1/flags/{key}`.
    pub fn delete_flag(&mut self, key: &str, if_match: Option<u64>) -> Result<Vec<Emit>, FlagError> {
        let current = self.existing(key)?;
        check_version(current.version, if_match)?;
        let version = current.version + 1;
        self.flags.remove(key);
        self.flag_tombstones.insert(key.to_owned(), version);
        Ok(vec![Emit::Flag {
            kind: FlagEventKind::FlagDeleted,
            key: key.to_owned(),
            version,
            flag: Value::Null,
        }])
    }

    fn with_rules(
        &mut self,
        key: &str,
        if_match: Option<u64>,
        now: &str,
        kind: FlagEventKind,
        edit: impl FnOnce(&mut Vec<Rule>) -> Result<(), FlagError>,
    ) -> Result<(Flag, Vec<Emit>), FlagError> {
        let current = self.existing(key)?.clone();
        check_version(current.version, if_match)?;
        let mut next = current.clone();
        edit(&mut next.rules)?;
        next.rules.sort_by_key(|r| r.priority);
        next.version += 1;
        next.updated_at = now.to_owned();
        validate(&next, self.segment_exists())?;
        Ok(self.store(kind, next))
    }

    /// `POST /v1/flags/{key}/rules`.
    pub fn add_rule(
        &mut self,
        key: &str,
        rule: Rule,
        if_match: Option<u64>,
        now: &str,
    ) -> Result<(Flag, Vec<Emit>), FlagError> {
        self.with_rules(key, if_match, now, FlagEventKind::RuleCreated, |rules| {
            if rules.iter().any(|r| r.id == rule.id) {
                return Err(FlagError::Exists(format!("rule `{}`", rule.id)));
            }
            rules.push(rule);
            Ok(())
        })
    }

    /// `PUT /v1/flags/{key}/rules/{id}`.
    pub fn replace_rule(
        &mut self,
        key: &str,
        id: &str,
        mut rule: Rule,
        if_match: Option<u64>,
        now: &str,
    ) -> Result<(Flag, Vec<Emit>), FlagError> {
        rule.id = id.to_owned();
        self.with_rules(key, if_match, now, FlagEventKind::RuleUpdated, |rules| {
            let slot = rules
                .iter_mut()
                .find(|r| r.id == id)
                .ok_or_else(|| FlagError::NotFound(format!("rule `{id}`")))?;
            *slot = rule;
            Ok(())
        })
    }

    /// `DELETE /v1/flags/{key}/rules/{id}`.
    pub fn delete_rule(
        &mut self,
        key: &str,
        id: &str,
        if_match: Option<u64>,
        now: &str,
    ) -> Result<(Flag, Vec<Emit>), FlagError> {
        self.with_rules(key, if_match, now, FlagEventKind::RuleDeleted, |rules| {
            let before = rules.len();
            rules.retain(|r| r.id != id);
            if rules.len() == before {
                return Err(FlagError::NotFound(format!("rule `{id}`")));
            }
            Ok(())
        })
    }

    /// Events for every flag that uses `segment`, plus the configuration event.
    fn segment_changed(&self, segment: &str) -> Vec<Emit> {
        let mut events: Vec<Emit> = self
            .flags
            .values()
            .filter(|f| f.uses_segment(segment))
            .map(|f| flag_event(FlagEventKind::SegmentChanged, f))
            .collect();
        events.push(Emit::Config(ConfigReason::SegmentModified));
        events
    }

    /// `POST /v1/segments` (`create`) and `PUT /v1/segments/{key}`.
    pub fn put_segment(
        &mut self,
        environment: &str,
        key: &str,
        spec: SegmentSpec,
        if_match: Option<u64>,
        create: bool,
        now: &str,
    ) -> Result<(Segment, Vec<Emit>), FlagError> {
        check_key("segment key", key)?;
        if spec.key.as_deref().is_some_and(|k| k != key) {
            return Err(FlagError::Invalid("the body's `key` differs from the path".into()));
        }
        for condition in &spec.conditions {
            check_condition(condition)?;
        }
        let current = self.segments.get(key);
        if create && current.is_some() {
            return Err(FlagError::Exists(format!("segment `{key}`")));
        }
        if let Some(current) = current {
            check_version(current.version, if_match)?;
        } else if if_match.is_some() {
            return Err(FlagError::NotFound(format!("segment `{key}`")));
        }
        let version =
            current.map_or_else(|| self.segment_tombstones.get(key).copied().unwrap_or(0), |c| c.version) + 1;
        let segment = Segment {
            key: key.to_owned(),
            environment: environment.to_owned(),
            name: spec.name.unwrap_or_else(|| key.to_owned()),
            conditions: spec.conditions,
            version,
            created_at: current.map_or_else(|| now.to_owned(), |c| c.created_at.clone()),
            updated_at: now.to_owned(),
        };
        self.segments.insert(key.to_owned(), segment.clone());
        self.segment_tombstones.remove(key);
        Ok((segment, self.segment_changed(key)))
    }

    /// `DELETE /v1/segments/{key}`; refused while a flag uses it.
    pub fn delete_segment(&mut self, key: &str, if_match: Option<u64>) -> Result<Vec<Emit>, FlagError> {
        let current =
            self.segments.get(key).ok_or_else(|| FlagError::NotFound(format!("segment `{key}`")))?;
        check_version(current.version, if_match)?;
        if let Some(user) = self.flags.values().find(|f| f.uses_segment(key)) {
            return Err(FlagError::InUse(format!("segment `{key}` is used by flag `{}`", user.key)));
        }
        let version = current.version;
        self.segments.remove(key);
        self.segment_tombstones.insert(key.to_owned(), version);
        Ok(vec![Emit::Config(ConfigReason::SegmentModified)])
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::model::{Serve, Weighted};

    fn new_flag(key: &str) -> NewFlag {
        NewFlag::from_value(json!({"key": key, "enabled": true})).unwrap()
    }

    fn kinds(events: &[Emit]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                Emit::Flag { kind, version, .. } => format!("{}@{version}", kind.as_str()),
                Emit::Config(reason) => reason.as_str().to_owned(),
            })
            .collect()
    }

    fn rule(id: &str, serve: &str) -> Rule {
        Rule {
            id: id.into(),
            priority: 0,
            conditions: vec![],
            segments: vec![],
            serve: Serve { variant: Some(serve.into()), rollout: None },
        }
    }

    #[test]
    fn every_write_bumps_the_version_and_says_what_changed() {
        let mut env = Environment::default();
        let (flag, events) = env.create_flag("prod", new_flag("dark"), "t0").unwrap();
        assert_eq!(
            (flag.version, flag.default_variant.as_str(), kinds(&events)),
            (1, "off", vec!["flag.created@1".into()])
        );
        let (_, e) = env.patch_flag("dark", &json!({"enabled": false}), Some(1), "t1").unwrap();
        assert_eq!(kinds(&e), ["flag.updated@2"]);
        let (_, e) = env.add_rule("dark", rule("r1", "on"), None, "t2").unwrap();
        assert_eq!(kinds(&e), ["rule.created@3"]);
        let (_, e) = env.replace_rule("dark", "r1", rule("ignored", "off"), None, "t3").unwrap();
        assert_eq!(kinds(&e), ["rule.updated@4"]);
        let (_, e) = env.delete_rule("dark", "r1", None, "t4").unwrap();
        assert_eq!(kinds(&e), ["rule.deleted@5"]);
        assert_eq!(kinds(&env.delete_flag("dark", None).unwrap()), ["flag.deleted@6"]);
        // Re-created, the version keeps growing.
        let (flag, _) = env.create_flag("prod", new_flag("dark"), "t5").unwrap();
        assert_eq!(flag.version, 7);
    }

    #[test]
    fn if_match_with_a_stale_version_is_refused_and_changes_nothing() {
        let mut env = Environment::default();
        env.create_flag("prod", new_flag("dark"), "t0").unwrap();
        let stale = env.patch_flag("dark", &json!({"enabled": false}), Some(7), "t1");
        assert_eq!(stale.unwrap_err(), FlagError::VersionMismatch { current: 1 });
        assert!(env.flags["dark"].enabled);
    }

    #[test]
    fn invalid_flags_are_refused_with_the_reason() {
        let mut env = Environment::default();
        let cases = [
            (json!({"key": "bad key"}), "flag key"),
            (json!({"key": "k", "variants": {"a": 1, "b": "x"}}), "one type"),
            (json!({"key": "k", "variants": {"a": 1}, "defaultVariant": "z"}), "default variant"),
            (json!({"key": "k", "rules": [{"id": "r", "serve": {"variant": "nope"}}]}), "unknown variant"),
            (
                json!({"key": "k", "rules": [{"id": "r", "segments": ["ghost"], "serve": {"variant": "on"}}]}),
                "unknown segment",
            ),
            (
                json!({"key": "k", "rules": [{"id": "r", "serve": {"rollout": [{"variant": "on", "weight": 60}]}}]}),
                "add up to 100",
            ),
            (json!({"key": "k", "rules": [{"id": "r", "serve": {}}]}), "exactly one"),
            (
                json!({"key": "k", "rules": [{"id": "r", "conditions": [{"attribute": "a", "operator": "equals", "values": []}], "serve": {"variant": "on"}}]}),
                "exactly one value",
            ),
        ];
        for (body, reason) in cases {
            let new = NewFlag::from_value(body.clone()).unwrap();
            let error = env.create_flag("prod", new, "t").unwrap_err().to_string();
            assert!(error.contains(reason), "{body}: {error}");
        }
        env.create_flag("prod", new_flag("k"), "t").unwrap();
        assert!(matches!(env.create_flag("prod", new_flag("k"), "t"), Err(FlagError::Exists(_))));
    }

    #[test]
    fn a_segment_change_touches_every_flag_that_uses_it() {
        let mut env = Environment::default();
        env.put_segment(
            "prod",
            "beta",
            SegmentSpec { key: None, name: None, conditions: vec![] },
            None,
            true,
            "t",
        )
        .unwrap();
        env.create_flag("prod", new_flag("a"), "t").unwrap();
        env.create_flag("prod", new_flag("b"), "t").unwrap();
        let mut uses = rule("r", "on");
        uses.segments = vec!["beta".into()];
        uses.serve =
            Serve { variant: None, rollout: Some(vec![Weighted { variant: "on".into(), weight: 100 }]) };
        env.add_rule("a", uses, None, "t").unwrap();
        let (_, events) = env
            .put_segment(
                "prod",
                "beta",
                SegmentSpec { key: None, name: Some("Beta".into()), conditions: vec![] },
                Some(1),
                false,
                "t",
            )
            .unwrap();
        assert_eq!(kinds(&events), ["segment.changed@2", "segment-modified"]);
        assert!(matches!(env.delete_segment("beta", None), Err(FlagError::InUse(_))));
    }
}
