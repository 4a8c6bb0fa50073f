//! Flags, rules, segments — the FlagDto shape the API returns and dialect B streams — and the
//! inputs the management API accepts, with their validation.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::FlagError;

/// Keys of flags and segments, rule ids, tags: 1–128 of `[A-Za-z0-9_.-]`.
pub fn check_key(kind: &'static str, key: &str) -> Result<(), FlagError> {
    let ok = !key.is_empty()
        && key.len() <= 128
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(FlagError::Invalid(format!(
            "{kind} `{key}` must be 1–128 characters of letters, digits, '_', '-', '.'"
        )))
    }
}

/// How a condition compares a context attribute with its values.
#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "snake_case")]
pub enum Operator {
    /// Equal to the (single) value.
    Equals,
    /// Not equal to the (single) value.
    NotEquals,
    /// One of the values.
    In,
    /// None of the values.
    NotIn,
    /// A string containing the value.
    Contains,
    /// A string starting with the value.
    StartsWith,
    /// A string ending with the value.
    EndsWith,
    /// Numerically greater.
    Gt,
    /// Numerically greater or equal.
    Gte,
    /// Numerically less.
    Lt,
    /// Numerically less or equal.
    Lte,
    /// Semantic version equal.
    SemverEq,
    /// Semantic version greater.
    SemverGt,
    /// Semantic version less.
    SemverLt,
    /// Matches the (bounded) regular expression.
    Matches,
}

/// One test on the evaluation context.
#[derive(Serialize, Deserialize, Clone, PartialEq, Debug)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    /// The context attribute (`country`, `email`, `targetingKey`, …).
    pub attribute: String,
    /// The comparison.
    pub operator: Operator,
    /// What it compares with.
    #[serde(default)]
    pub values: Vec<Value>,
}

/// A share of a percentage rollout.
#[derive(Serialize, Deserialize, Clone, PartialEq, Debug)]
#[serde(deny_unknown_fields)]
pub struct Weighted {
    /// The variant served.
    pub variant: String,
    /// Its share, in percent.
    pub weight: u32,
}

/// What a matching rule serves: one variant, or a percentage rollout.
#[derive(Serialize, Deserialize, Clone, PartialEq, Debug)]
#[serde(deny_unknown_fields)]
pub struct Serve {
    /// A fixed variant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// A rollout whose weights add up to 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Vec<Weighted>>,
}

/// A targeting rule of a flag.
#[derive(Serialize, Deserialize, Clone, PartialEq, Debug)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Stable id within the flag.
    pub id: String,
    /// Lower runs first.
    #[serde(default)]
    pub priority: i32,
    /// All must hold.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The context must belong to every one of these segments.
    #[serde(default)]
    pub segments: Vec<String>,
    /// What it serves.
    pub serve: Serve,
}

/// A flag as the API returns it and dialect B streams it (the FlagDto).
#[derive(Serialize, Deserialize, Clone, PartialEq, Debug)]
#[serde(rename_all = "camelCase")]
pub struct Flag {
    /// The flag's key, unique in its environment.
    pub key: String,
    /// Its environment.
    pub environment: String,
    /// Human name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// A disabled flag serves its default variant.
    pub enabled: bool,
    /// Variant name → value; all values have one JSON type.
    pub variants: BTreeMap<String, Value>,
    /// The variant served when no rule matches (or the flag is disabled).
    pub default_variant: String,
    /// Labels.
    pub tags: Vec<String>,
    /// Rules, ordered by priority.
    pub rules: Vec<Rule>,
    /// Monotonic per key and environment, across deletions.
    pub version: u64,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
}

/// A named set of contexts, referenced by rules.
#[derive(Serialize, Deserialize, Clone, PartialEq, Debug)]
#[serde(rename_all = "camelCase")]
pub struct Segment {
    /// The segment's key, unique in its environment.
    pub key: String,
    /// Its environment.
    pub environment: String,
    /// Human name.
    pub name: String,
    /// A context belongs when all hold.
    pub conditions: Vec<Condition>,
    /// Monotonic per key and environment.
    pub version: u64,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
}

/// The editable part of a flag (`POST` adds `key`; `PUT` replaces it; `PATCH` merges into it).
#[derive(Serialize, Deserialize, Clone, PartialEq, Debug)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FlagSpec {
    /// Human name (defaults to the key).
    #[serde(default)]
    pub name: Option<String>,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Whether it is on.
    #[serde(default)]
    pub enabled: bool,
    /// Variant name → value (default: `on: true`, `off: false`).
    #[serde(default)]
    pub variants: Option<BTreeMap<String, Value>>,
    /// The default variant (default: `off` for the default variants).
    #[serde(default)]
    pub default_variant: Option<String>,
    /// Labels.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Rules (kept as they are when a `PUT` omits them).
    #[serde(default)]
    pub rules: Option<Vec<Rule>>,
}

/// `POST /v1/flags` body: `key` plus the [`FlagSpec`] fields.
#[derive(Clone, Debug)]
pub struct NewFlag {
    /// The new flag's key.
    pub key: String,
    /// Everything else.
    pub spec: FlagSpec,
}

impl NewFlag {
    /// Reads a `POST /v1/flags` body, refusing unknown fields.
    pub fn from_value(mut body: Value) -> Result<Self, FlagError> {
        let key = match body.as_object_mut().and_then(|o| o.remove("key")) {
            Some(Value::String(key)) => key,
            Some(_) => return Err(FlagError::Invalid("`key` must be a string".into())),
            None => return Err(FlagError::Invalid("a flag needs a `key`".into())),
        };
        let spec =
            serde_json::from_value(body).map_err(|e| FlagError::Invalid(format!("invalid flag: {e}")))?;
        Ok(Self { key, spec })
    }
}

/// The editable part of a segment.
#[derive(Serialize, Deserialize, Clone, PartialEq, Debug)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SegmentSpec {
    /// Its key (required on `POST`; must match the path on `PUT`).
    #[serde(default)]
    pub key: Option<String>,
    /// Human name.
    #[serde(default)]
    pub name: Option<String>,
    /// Membership conditions.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Checks a flag against itself and the environment's segments.
pub fn validate(flag: &Flag, segment_exists: impl Fn(&str) -> bool) -> Result<(), FlagError> {
    check_key("flag key", &flag.key)?;
    if flag.variants.is_empty() {
        return Err(FlagError::Invalid("a flag needs at least one variant".into()));
    }
    let mut types = flag.variants.values().map(json_type);
    let first = types.next().unwrap_or("null");
    if let Some(other) = types.find(|t| *t != first) {
        return Err(FlagError::Invalid(format!(
            "variants must all have one type; found {first} and {other}"
        )));
    }
    for name in flag.variants.keys() {
        check_key("variant", name)?;
    }
    let known = |v: &str| flag.variants.contains_key(v);
    if !known(&flag.default_variant) {
        return Err(FlagError::Invalid(format!(
            "default variant `{}` is not a variant",
            flag.default_variant
        )));
    }
    for tag in &flag.tags {
        check_key("tag", tag)?;
    }
    let mut ids = std::collections::BTreeSet::new();
    for rule in &flag.rules {
        check_key("rule id", &rule.id)?;
        if !ids.insert(rule.id.as_str()) {
            return Err(FlagError::Invalid(format!("rule id `{}` appears twice", rule.id)));
        }
        match (&rule.serve.variant, &rule.serve.rollout) {
            (Some(v), None) if known(v) => {}
            (Some(v), None) => {
                return Err(FlagError::Invalid(format!("rule `{}` serves unknown variant `{v}`", rule.id)));
            }
            (None, Some(shares)) => {
                if let Some(w) = shares.iter().find(|w| !known(&w.variant)) {
                    return Err(FlagError::Invalid(format!(
                        "rule `{}` rolls out unknown variant `{}`",
                        rule.id, w.variant
                    )));
                }
                if shares.iter().map(|w| w.weight).sum::<u32>() != 100 {
                    return Err(FlagError::Invalid(format!(
                        "rule `{}`: rollout weights must add up to 100",
                        rule.id
                    )));
                }
            }
            _ => {
                return Err(FlagError::Invalid(format!(
                    "rule `{}` must serve exactly one of `variant` or `rollout`",
                    rule.id
                )));
            }
        }
        if let Some(missing) = rule.segments.iter().find(|s| !segment_exists(s)) {
            return Err(FlagError::Invalid(format!("rule `{}` uses unknown segment `{missing}`", rule.id)));
        }
        for condition in &rule.conditions {
            check_condition(condition)?;
        }
    }
    Ok(())
}

/// Checks one condition's shape.
pub fn check_condition(condition: &Condition) -> Result<(), FlagError> {
    if condition.attribute.is_empty() || condition.attribute.len() > 128 {
        return Err(FlagError::Invalid("a condition's attribute must be 1–128 characters".into()));
    }
    let single = matches!(
        condition.operator,
        Operator::Equals
            | Operator::NotEquals
            | Operator::Contains
            | Operator::StartsWith
            | Operator::EndsWith
            | Operator::Gt
            | Operator::Gte
            | Operator::Lt
            | Operator::Lte
            | Operator::SemverEq
            | Operator::SemverGt
            | Operator::SemverLt
            | Operator::Matches
    );
    if single && condition.values.len() != 1 {
        return Err(FlagError::Invalid(format!(
            "operator {:?} on `{}` takes exactly one value",
            condition.operator, condition.attribute
        )));
    }
    if condition.operator == Operator::Matches
        && condition.values.first().and_then(Value::as_str).is_none_or(|p| p.len() > 256)
    {
        return Err(FlagError::Invalid(
            "a `matches` pattern must be a string of at most 256 characters".into(),
        ));
    }
    if !single && condition.values.is_empty() {
        return Err(FlagError::Invalid(format!(
            "operator {:?} needs at least one value",
            condition.operator
        )));
    }
    Ok(())
}

impl Flag {
    /// The segments this flag's rules use.
    pub fn uses_segment(&self, key: &str) -> bool {
        self.rules.iter().any(|r| r.segments.iter().any(|s| s == key))
    }
}
