//! Flag evaluation: rules by priority, conditions on context attributes, segment membership,
//! and percentage rollouts with a stable hash.
//!
//! **Rollout bucket** (documented, stable across instances and restarts): the first 4 bytes of
//! `MD5("<flag key>:<targetingKey>")` as a little-endian `u32`, modulo 100; a rollout's shares
//! are laid out in order over 0‥100. It is Featureflip's formula (salt = the flag key), so its
//! SDK, which evaluates locally, puts every user in the same share as the server does.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use md5::{Digest, Md5};
use serde_json::{Map, Value};

use crate::model::{Condition, Flag, Operator, Rule, Segment};

/// Why a value was served (OpenFeature reasons).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Reason {
    /// The flag has no rules: its default variant.
    Static,
    /// A rule matched and served a fixed variant.
    TargetingMatch,
    /// A rule matched and served a rollout share.
    Split,
    /// The flag is disabled: its default variant.
    Disabled,
    /// Rules exist but none matched: the default variant.
    Default,
}

impl Reason {
    /// The OpenFeature name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Static => "STATIC",
            Self::TargetingMatch => "TARGETING_MATCH",
            Self::Split => "SPLIT",
            Self::Disabled => "DISABLED",
            Self::Default => "DEFAULT",
        }
    }
}

/// An evaluation's outcome.
#[derive(Clone, PartialEq, Debug)]
pub struct Resolution {
    /// The served value.
    pub value: Value,
    /// The served variant.
    pub variant: String,
    /// Why.
    pub reason: Reason,
}

/// Why a flag could not be evaluated (OpenFeature error codes).
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
pub enum EvalError {
    /// A rollout needs `targetingKey` and the context has none.
    #[error("TARGETING_KEY_MISSING: a percentage rollout needs `targetingKey` in the context")]
    TargetingKeyMissing,
}

/// The rollout bucket of `targeting_key` for `flag_key`, in 0‥100.
pub fn bucket(flag_key: &str, targeting_key: &str) -> u32 {
    let digest = Md5::new()
        .chain_update(flag_key.as_bytes())
        .chain_update(b":")
        .chain_update(targeting_key.as_bytes())
        .finalize();
    u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]]) % 100
}

/// Evaluates `flag` for `context` against the environment's `segments`.
pub fn evaluate(
    flag: &Flag,
    segments: &BTreeMap<String, Segment>,
    context: &Map<String, Value>,
) -> Result<Resolution, EvalError> {
    let serve = |variant: &str, reason| Resolution {
        value: flag.variants.get(variant).cloned().unwrap_or(Value::Null),
        variant: variant.to_owned(),
        reason,
    };
    if !flag.enabled {
        return Ok(serve(&flag.default_variant, Reason::Disabled));
    }
    if flag.rules.is_empty() {
        return Ok(serve(&flag.default_variant, Reason::Static));
    }
    // Rules are stored ordered by priority.
    for rule in &flag.rules {
        if !rule_matches(rule, segments, context) {
            continue;
        }
        if let Some(variant) = &rule.serve.variant {
            return Ok(serve(variant, Reason::TargetingMatch));
        }
        if let Some(shares) = &rule.serve.rollout {
            let key =
                context.get("targetingKey").and_then(Value::as_str).ok_or(EvalError::TargetingKeyMissing)?;
            let point = bucket(&flag.key, key);
            let mut upper = 0;
            for share in shares {
                upper += share.weight;
                if point < upper {
                    return Ok(serve(&share.variant, Reason::Split));
                }
            }
        }
    }
    Ok(serve(&flag.default_variant, Reason::Default))
}

fn rule_matches(rule: &Rule, segments: &BTreeMap<String, Segment>, context: &Map<String, Value>) -> bool {
    rule.conditions.iter().all(|c| holds(c, context))
        && rule.segments.iter().all(|key| {
            segments.get(key).is_some_and(|segment| segment.conditions.iter().all(|c| holds(c, context)))
        })
}

/// Whether one condition holds for `context`. A missing attribute never matches (also not
/// for the negative operators: "not in" of nothing is not a match to target on).
pub fn holds(condition: &Condition, context: &Map<String, Value>) -> bool {
    let Some(actual) = context.get(&condition.attribute) else { return false };
    let first = condition.values.first();
    let text = |v: &Value| v.as_str().map(str::to_owned);
    let number = |v: &Value| v.as_f64();
    match condition.operator {
        Operator::Equals => first == Some(actual),
        Operator::NotEquals => first.is_some_and(|v| v != actual),
        Operator::In => condition.values.contains(actual),
        Operator::NotIn => !condition.values.contains(actual),
        Operator::Contains => both(actual, first, text, |a, b| a.contains(b.as_str())),
        Operator::StartsWith => both(actual, first, text, |a, b| a.starts_with(b.as_str())),
        Operator::EndsWith => both(actual, first, text, |a, b| a.ends_with(b.as_str())),
        Operator::Gt => both(actual, first, number, |a, b| a > b),
        Operator::Gte => both(actual, first, number, |a, b| a >= b),
        Operator::Lt => both(actual, first, number, |a, b| a < b),
        Operator::Lte => both(actual, first, number, |a, b| a <= b),
        Operator::SemverEq => both(actual, first, version, |a, b| a == b),
        Operator::SemverGt => both(actual, first, version, |a, b| a > b),
        Operator::SemverLt => both(actual, first, version, |a, b| a < b),
        Operator::Matches => both(actual, first, text, |a, pattern| matches(&pattern, &a)),
    }
}

fn both<T>(
    actual: &Value,
    expected: Option<&Value>,
    read: impl Fn(&Value) -> Option<T>,
    test: impl Fn(T, T) -> bool,
) -> bool {
    match (read(actual), expected.and_then(&read)) {
        (Some(a), Some(b)) => test(a, b),
        _ => false,
    }
}

fn version(value: &Value) -> Option<semver::Version> {
    let text = value.as_str()?;
    semver::Version::parse(text.strip_prefix('v').unwrap_or(text)).ok()
}

/// Patterns are bounded: at most 256 characters (checked when the flag is written) and a
/// compiled size of 64 KiB, so no rule can make evaluation slow or memory-hungry. Compiled
/// patterns are kept (at most 1 024; the set is emptied when full): compiling costs ~15 µs,
/// matching well under one.
fn matches(pattern: &str, text: &str) -> bool {
    static COMPILED: OnceLock<Mutex<HashMap<String, Option<Arc<regex::Regex>>>>> = OnceLock::new();
    let cache = COMPILED.get_or_init(Mutex::default);
    let known = cache.lock().unwrap_or_else(PoisonError::into_inner).get(pattern).cloned();
    let compiled = match known {
        Some(compiled) => compiled,
        None => {
            let compiled = regex::RegexBuilder::new(pattern)
                .size_limit(64 * 1024)
                .dfa_size_limit(64 * 1024)
                .build()
                .ok()
                .map(Arc::new);
            let mut cache = cache.lock().unwrap_or_else(PoisonError::into_inner);
            if cache.len() >= 1024 {
                cache.clear();
            }
            cache.insert(pattern.to_owned(), compiled.clone());
            compiled
        }
    };
    compiled.is_some_and(|re| re.is_match(text))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::model::{Serve, Weighted};

    fn ctx(value: Value) -> Map<String, Value> {
        value.as_object().cloned().unwrap()
    }

    fn condition(attribute: &str, operator: Operator, values: Vec<Value>) -> Condition {
        Condition { attribute: attribute.into(), operator, values }
    }

    #[test]
    fn every_operator_against_a_table_of_contexts() {
        use Operator::*;
        let context = ctx(
            json!({"country": "NL", "age": 42, "email": "ada@example.com", "version": "v2.3.4", "beta": true}),
        );
        let table = [
            (condition("country", Equals, vec![json!("NL")]), true),
            (condition("country", Equals, vec![json!("DE")]), false),
            (condition("beta", Equals, vec![json!(true)]), true),
            (condition("country", NotEquals, vec![json!("DE")]), true),
            (condition("country", NotEquals, vec![json!("NL")]), false),
            (condition("country", In, vec![json!("BE"), json!("NL")]), true),
            (condition("country", In, vec![json!("BE")]), false),
            (condition("country", NotIn, vec![json!("BE")]), true),
            (condition("country", NotIn, vec![json!("NL")]), false),
            (condition("email", Contains, vec![json!("@example")]), true),
            (condition("email", Contains, vec![json!("@other")]), false),
            (condition("email", StartsWith, vec![json!("ada")]), true),
            (condition("email", StartsWith, vec![json!("bob")]), false),
            (condition("email", EndsWith, vec![json!(".com")]), true),
            (condition("email", EndsWith, vec![json!(".org")]), false),
            (condition("age", Gt, vec![json!(41)]), true),
            (condition("age", Gt, vec![json!(42)]), false),
            (condition("age", Gte, vec![json!(42)]), true),
            (condition("age", Lt, vec![json!(43.5)]), true),
            (condition("age", Lte, vec![json!(41)]), false),
            (condition("age", Gt, vec![json!("41")]), false),
            (condition("version", SemverEq, vec![json!("2.3.4")]), true),
            (condition("version", SemverGt, vec![json!("2.3.3")]), true),
            (condition("version", SemverGt, vec![json!("2.10.0")]), false),
            (condition("version", SemverLt, vec![json!("2.10.0")]), true),
            (condition("version", SemverEq, vec![json!("not a version")]), false),
            (condition("email", Matches, vec![json!("^[a-z]+@example\\.com$")]), true),
            (condition("email", Matches, vec![json!("^bob")]), false),
            (condition("email", Matches, vec![json!("(unclosed")]), false),
            (condition("missing", NotIn, vec![json!("x")]), false),
            (condition("missing", Equals, vec![json!(null)]), false),
        ];
        for (condition, expected) in table {
            assert_eq!(holds(&condition, &context), expected, "{condition:?}");
        }
    }

    fn flag(rules: Vec<Rule>, enabled: bool) -> Flag {
        Flag {
            key: "checkout".into(),
            environment: "prod".into(),
            name: "checkout".into(),
            description: String::new(),
            enabled,
            variants: BTreeMap::from([
                ("a".into(), json!("A")),
                ("b".into(), json!("B")),
                ("off".into(), json!("OFF")),
            ]),
            default_variant: "off".into(),
            tags: vec![],
            rules,
            version: 1,
            created_at: String::new(),
            updated_at: String::new(),
        }
    }

    fn rollout(shares: &[(&str, u32)]) -> Rule {
        Rule {
            id: "r".into(),
            priority: 0,
            conditions: vec![],
            segments: vec![],
            serve: Serve {
                variant: None,
                rollout: Some(
                    shares.iter().map(|(v, w)| Weighted { variant: (*v).into(), weight: *w }).collect(),
                ),
            },
        }
    }

    #[test]
    fn reasons_follow_the_flag_and_its_rules() {
        let none = BTreeMap::new();
        let empty = Map::new();
        assert_eq!(evaluate(&flag(vec![], false), &none, &empty).unwrap().reason, Reason::Disabled);
        assert_eq!(evaluate(&flag(vec![], true), &none, &empty).unwrap().reason, Reason::Static);
        let mut nl = rollout(&[]);
        nl.conditions = vec![condition("country", Operator::Equals, vec![json!("NL")])];
        nl.serve = Serve { variant: Some("a".into()), rollout: None };
        let f = flag(vec![nl], true);
        let matched = evaluate(&f, &none, &ctx(json!({"country": "NL"}))).unwrap();
        assert_eq!(
            (matched.value, matched.variant.as_str(), matched.reason),
            (json!("A"), "a", Reason::TargetingMatch)
        );
        assert_eq!(evaluate(&f, &none, &ctx(json!({"country": "DE"}))).unwrap().reason, Reason::Default);
    }

    #[test]
    fn a_rollout_needs_a_targeting_key_and_splits_stably() {
        let none = BTreeMap::new();
        let f = flag(vec![rollout(&[("a", 50), ("b", 50)])], true);
        assert_eq!(evaluate(&f, &none, &Map::new()), Err(EvalError::TargetingKeyMissing));
        // Same input, same bucket — forever: these are the documented hash's values.
        assert_eq!(bucket("checkout", "user-1"), bucket("checkout", "user-1"));
        let fixed = [("user-1", bucket("checkout", "user-1")), ("user-2", bucket("checkout", "user-2"))];
        for (user, b) in fixed {
            let served = evaluate(&f, &none, &ctx(json!({"targetingKey": user}))).unwrap();
            assert_eq!(served.reason, Reason::Split);
            assert_eq!(served.variant, if b < 50 { "a" } else { "b" });
        }
        // Over many users the split is close to the weights.
        let a = (0..10_000)
            .filter(|i| {
                evaluate(&f, &none, &ctx(json!({"targetingKey": format!("u{i}")}))).unwrap().variant == "a"
            })
            .count();
        assert!((4_700..5_300).contains(&a), "{a} of 10 000 in a 50 % share");
    }

    #[test]
    fn the_bucket_hash_is_pinned() {
        // Changing the hash would move every user to another share. These values come from the
        // published Featureflip SDK's own `FlagEvaluator.compute_bucket("checkout", user)`.
        assert_eq!(bucket("checkout", "user-1"), 43);
        assert_eq!(bucket("checkout", "user-2"), 85);
        assert_eq!(bucket("checkout", "user-3"), 5);
    }

    #[test]
    fn segment_membership_requires_every_condition_of_every_segment() {
        let beta = Segment {
            key: "beta".into(),
            environment: "prod".into(),
            name: "beta".into(),
            conditions: vec![condition("plan", Operator::In, vec![json!("beta")])],
            version: 1,
            created_at: String::new(),
            updated_at: String::new(),
        };
        let segments = BTreeMap::from([("beta".to_owned(), beta)]);
        let mut rule = rollout(&[]);
        rule.segments = vec!["beta".into()];
        rule.serve = Serve { variant: Some("b".into()), rollout: None };
        let f = flag(vec![rule], true);
        assert_eq!(evaluate(&f, &segments, &ctx(json!({"plan": "beta"}))).unwrap().variant, "b");
        assert_eq!(evaluate(&f, &segments, &ctx(json!({"plan": "free"}))).unwrap().variant, "off");
    }
}
