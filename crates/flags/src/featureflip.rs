//! Featureflip's SDK wire shape — a translation of our flags and segments, not a second model.
//!
//! The published SDK (PyPI `featureflip` 2.10) fetches `GET /v1/sdk/flags` and evaluates
//! locally, so the translation must make it serve what our evaluator serves:
//!
//! * `offVariation` and the fixed `fallthrough` are our `defaultVariant` (served when the flag is
//!   disabled, has no rules, or no rule matched); `prerequisites` is always empty.
//! * A rule's conditions must all hold and the context must belong to every segment it names.
//!   The SDK's rule takes either condition groups (ANDed) or one `segmentKey`, so each segment's
//!   conditions travel **inlined** as one more AND group: a segment change is then a change of
//!   each flag using it (`flag.updated`), and the SDK never needs a segment refetch. A rule
//!   naming a segment that does not exist carries it as `segmentKey`, which the SDK fails
//!   closed on — as ours does.
//! * A rollout is `{"type":"rollout","bucketBy":"userId","salt":<flag key>}` with our weights:
//!   our bucket is the SDK's formula (see [`crate::eval::bucket`]), and the SDK's `user_id` is
//!   our `targetingKey` (a condition on `targetingKey` reads `userId`).
//! * Operators map one to one; operators of ours that read only the first value are sent with
//!   only the first value, so "any value" in the SDK means the same thing.
//!
//! What cannot be expressed is said in README ("Coming from Featureflip"): the SDK compares
//! strings ignoring case where we compare them exactly, and a rollout without a `user_id` skips
//! the rule in the SDK where OFREP answers `TARGETING_KEY_MISSING`.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::model::{Condition, Flag, Operator, Rule, Segment};

/// The SDK's name of a flag's value type, from its variants (which share one JSON type).
pub fn flag_type(flag: &Flag) -> &'static str {
    match flag.variants.values().next() {
        Some(Value::Bool(_)) => "boolean",
        Some(Value::String(_)) => "string",
        Some(Value::Number(_)) => "number",
        _ => "json",
    }
}

/// The SDK's operator name (the PascalCase its server sends), and whether it reads every value
/// (`In`, `NotIn`) rather than only the first.
const fn operator(operator: Operator) -> (&'static str, bool) {
    match operator {
        Operator::Equals => ("Equals", false),
        Operator::NotEquals => ("NotEquals", false),
        Operator::In => ("In", true),
        Operator::NotIn => ("NotIn", true),
        Operator::Contains => ("Contains", false),
        Operator::StartsWith => ("StartsWith", false),
        Operator::EndsWith => ("EndsWith", false),
        Operator::Gt => ("GreaterThan", false),
        Operator::Gte => ("GreaterThanOrEqual", false),
        Operator::Lt => ("LessThan", false),
        Operator::Lte => ("LessThanOrEqual", false),
        Operator::SemverEq => ("SemverEquals", false),
        Operator::SemverGt => ("SemverGreaterThan", false),
        Operator::SemverLt => ("SemverLessThan", false),
        Operator::Matches => ("MatchesRegex", false),
    }
}

fn condition(condition: &Condition) -> Value {
    let (name, every) = operator(condition.operator);
    let values =
        if every { &condition.values[..] } else { &condition.values[..condition.values.len().min(1)] };
    let attribute = if condition.attribute == "targetingKey" { "userId" } else { &condition.attribute };
    json!({"attribute": attribute, "operator": name, "values": values, "negate": false})
}

fn group(conditions: &[Condition]) -> Value {
    json!({"operator": "and", "conditions": conditions.iter().map(condition).collect::<Vec<_>>()})
}

fn rule(flag: &Flag, rule: &Rule, segments: &BTreeMap<String, Segment>) -> Value {
    let serve = match (&rule.serve.variant, &rule.serve.rollout) {
        (Some(variant), _) => json!({"type": "fixed", "variation": variant}),
        (None, shares) => json!({
            "type": "rollout",
            "bucketBy": "userId",
            "salt": flag.key,
            "variations": shares.iter().flatten()
                .map(|share| json!({"key": share.variant, "weight": share.weight}))
                .collect::<Vec<_>>(),
        }),
    };
    let mut groups = Vec::new();
    if !rule.conditions.is_empty() {
        groups.push(group(&rule.conditions));
    }
    let mut missing = None;
    for key in &rule.segments {
        match segments.get(key) {
            Some(segment) => groups.push(group(&segment.conditions)),
            None => missing = missing.or(Some(key)),
        }
    }
    let mut out =
        json!({"id": rule.id, "priority": rule.priority, "conditionGroups": groups, "serve": serve});
    if let Some(key) = missing {
        out["segmentKey"] = json!(key);
    }
    out
}

/// One flag in the SDK's `FlagConfiguration` shape.
pub fn flag(flag: &Flag, segments: &BTreeMap<String, Segment>) -> Value {
    json!({
        "key": flag.key,
        "version": flag.version,
        "type": flag_type(flag),
        "enabled": flag.enabled,
        "variations": flag.variants.iter().map(|(key, value)| json!({"key": key, "value": value})).collect::<Vec<_>>(),
        "rules": flag.rules.iter().map(|r| rule(flag, r, segments)).collect::<Vec<_>>(),
        "fallthrough": {"type": "fixed", "variation": flag.default_variant},
        "offVariation": flag.default_variant,
        "prerequisites": [],
    })
}

/// One segment in the SDK's shape (kept for completeness: rules carry its conditions inlined).
pub fn segment(segment: &Segment) -> Value {
    json!({
        "key": segment.key,
        "version": segment.version,
        "conditions": segment.conditions.iter().map(condition).collect::<Vec<_>>(),
        "conditionLogic": "and",
    })
}

/// The `GET /v1/sdk/flags` body (and the stream's `sync` event): `{"flags","segments"}`.
pub fn snapshot<'a>(
    flags: impl IntoIterator<Item = &'a Flag>,
    segments: &BTreeMap<String, Segment>,
) -> Value {
    json!({
        "flags": flags.into_iter().map(|f| flag(f, segments)).collect::<Vec<_>>(),
        "segments": segments.values().map(segment).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::model::{Serve, Weighted};

    fn cond(attribute: &str, operator: Operator, values: Value) -> Condition {
        Condition { attribute: attribute.into(), operator, values: serde_json::from_value(values).unwrap() }
    }

    fn sample() -> (Flag, BTreeMap<String, Segment>) {
        let beta = Segment {
            key: "beta".into(),
            environment: "prod".into(),
            name: "Beta".into(),
            conditions: vec![cond("plan", Operator::In, json!(["beta", "staff"]))],
            version: 4,
            created_at: String::new(),
            updated_at: String::new(),
        };
        let flag = Flag {
            key: "checkout".into(),
            environment: "prod".into(),
            name: "Checkout".into(),
            description: String::new(),
            enabled: true,
            variants: BTreeMap::from([("new".into(), json!("v2")), ("old".into(), json!("v1"))]),
            default_variant: "old".into(),
            tags: vec![],
            rules: vec![
                Rule {
                    id: "staff".into(),
                    priority: 1,
                    conditions: vec![
                        cond("targetingKey", Operator::Equals, json!(["u-1", "ignored"])),
                        cond("version", Operator::SemverGt, json!(["1.2.0"])),
                    ],
                    segments: vec!["beta".into()],
                    serve: Serve { variant: Some("new".into()), rollout: None },
                },
                Rule {
                    id: "half".into(),
                    priority: 2,
                    conditions: vec![],
                    segments: vec!["gone".into()],
                    serve: Serve {
                        variant: None,
                        rollout: Some(vec![
                            Weighted { variant: "new".into(), weight: 30 },
                            Weighted { variant: "old".into(), weight: 70 },
                        ]),
                    },
                },
            ],
            version: 9,
            created_at: String::new(),
            updated_at: String::new(),
        };
        (flag, BTreeMap::from([("beta".to_owned(), beta)]))
    }

    #[test]
    fn a_flag_translates_to_the_sdk_flag_configuration_field_by_field() {
        let (f, segments) = sample();
        assert_eq!(
            flag(&f, &segments),
            json!({
                "key": "checkout", "version": 9, "type": "string", "enabled": true,
                "variations": [{"key": "new", "value": "v2"}, {"key": "old", "value": "v1"}],
                "rules": [
                    {"id": "staff", "priority": 1, "serve": {"type": "fixed", "variation": "new"},
                     "conditionGroups": [
                        {"operator": "and", "conditions": [
                            {"attribute": "userId", "operator": "Equals", "values": ["u-1"], "negate": false},
                            {"attribute": "version", "operator": "SemverGreaterThan", "values": ["1.2.0"], "negate": false}]},
                        {"operator": "and", "conditions": [
                            {"attribute": "plan", "operator": "In", "values": ["beta", "staff"], "negate": false}]}]},
                    {"id": "half", "priority": 2, "conditionGroups": [], "segmentKey": "gone",
                     "serve": {"type": "rollout", "bucketBy": "userId", "salt": "checkout",
                               "variations": [{"key": "new", "weight": 30}, {"key": "old", "weight": 70}]}}
                ],
                "fallthrough": {"type": "fixed", "variation": "old"},
                "offVariation": "old",
                "prerequisites": [],
            })
        );
    }

    #[test]
    fn the_snapshot_holds_every_flag_and_segment() {
        let (f, segments) = sample();
        let body = snapshot([&f], &segments);
        assert_eq!(body["flags"].as_array().map(Vec::len), Some(1));
        assert_eq!(
            body["segments"],
            json!([{"key": "beta", "version": 4, "conditionLogic": "and",
                    "conditions": [{"attribute": "plan", "operator": "In", "values": ["beta", "staff"], "negate": false}]}])
        );
    }

    #[test]
    fn the_type_follows_the_variants() {
        let (mut f, _) = sample();
        assert_eq!(flag_type(&f), "string");
        f.variants = BTreeMap::from([("on".into(), json!(true))]);
        assert_eq!(flag_type(&f), "boolean");
        f.variants = BTreeMap::from([("n".into(), json!(1.5))]);
        assert_eq!(flag_type(&f), "number");
        f.variants = BTreeMap::from([("o".into(), json!({"a": 1}))]);
        assert_eq!(flag_type(&f), "json");
    }
}
