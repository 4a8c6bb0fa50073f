//! Validated names: tenants, environments, topics, topic patterns and collections.
//!
//! Each type can only be built through `parse`, so code that holds one never re-validates it and
//! no unchecked string reaches a channel name, a SQL parameter or a log line.

use std::fmt;
use std::sync::Arc;

/// Why a name was refused. The message names the kind of name and the rule it broke, never
/// echoes more than the caller sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind}: {reason}")]
pub struct NameError {
    /// Which kind of name ("tenant", "topic", ...).
    pub kind: &'static str,
    /// The rule that was broken.
    pub reason: String,
}

fn check(
    kind: &'static str,
    value: &str,
    max: usize,
    allowed: impl Fn(char) -> bool,
    rule: &str,
) -> Result<(), NameError> {
    if value.is_empty() {
        return Err(NameError { kind, reason: "must not be empty".into() });
    }
    if value.chars().count() > max {
        return Err(NameError { kind, reason: format!("must be at most {max} characters") });
    }
    if let Some(bad) = value.chars().find(|c| !allowed(*c)) {
        return Err(NameError { kind, reason: format!("character {bad:?} is not allowed; use {rule}") });
    }
    Ok(())
}

fn ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')
}

macro_rules! string_name {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// The validated name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), &*self.0)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
    };
}

string_name!(
    /// A tenant: 1–128 characters of `[A-Za-z0-9_.-]`.
    ///
    /// ```
    /// use changegate_core::TenantId;
    /// assert!(TenantId::parse("acme").is_ok());
    /// assert!(TenantId::parse("a'; drop").is_err());
    /// ```
    TenantId
);

impl TenantId {
    /// Validates a tenant id.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        check("tenant", s, 128, ident_char, "letters, digits, '_', '-', '.'")?;
        Ok(Self(s.into()))
    }
}

string_name!(
    /// An environment of a tenant (e.g. `production`): 1–128 characters of `[A-Za-z0-9_.-]`.
    EnvironmentId
);

impl EnvironmentId {
    /// Validates an environment id.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        check("environment", s, 128, ident_char, "letters, digits, '_', '-', '.'")?;
        Ok(Self(s.into()))
    }
}

fn topic_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')
}

string_name!(
    /// An application message topic: 1–255 characters of `[A-Za-z0-9._:-]`.
    ///
    /// ```
    /// use changegate_core::Topic;
    /// assert!(Topic::parse("order.created").is_ok());
    /// assert!(Topic::parse("order created").is_err());
    /// ```
    Topic
);

impl Topic {
    /// Validates a topic.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        check("topic", s, 255, topic_char, "letters, digits, '.', '_', ':', '-'")?;
        Ok(Self(s.into()))
    }
}

/// What a topic subscription matches: one exact topic, every topic under a prefix
/// (`order.*` matches `order.created` and `order.eu.shipped`, not `order`), or every topic (`*`).
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum TopicPattern {
    /// Exactly this topic.
    Exact(Topic),
    /// Every topic that starts with this text (which ends with the separator the user wrote).
    Prefix(Arc<str>),
    /// Every topic of the tenant.
    All,
}

impl TopicPattern {
    /// Parses `order.created`, `order.*` or `*`.
    ///
    /// ```
    /// use changegate_core::{Topic, TopicPattern};
    /// let p = TopicPattern::parse("order.*").unwrap();
    /// assert!(p.matches(&Topic::parse("order.created").unwrap()));
    /// assert!(!p.matches(&Topic::parse("orders").unwrap()));
    /// ```
    pub fn parse(s: &str) -> Result<Self, NameError> {
        if s == "*" {
            return Ok(Self::All);
        }
        match s.strip_suffix('*') {
            Some(prefix) => {
                Topic::parse(prefix).map_err(|e| NameError { kind: "topic pattern", ..e })?;
                Ok(Self::Prefix(prefix.into()))
            }
            None => Ok(Self::Exact(Topic::parse(s)?)),
        }
    }

    /// Whether a published topic belongs to this pattern.
    pub fn matches(&self, topic: &Topic) -> bool {
        match self {
            Self::Exact(t) => t == topic,
            Self::Prefix(p) => topic.as_str().starts_with(&**p),
            Self::All => true,
        }
    }
}

impl fmt::Display for TopicPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(t) => write!(f, "{t}"),
            Self::Prefix(p) => write!(f, "{p}*"),
            Self::All => f.write_str("*"),
        }
    }
}

string_name!(
    /// A collection as a subscriber names it: a table (`todos`, `public.todos`) or a MongoDB
    /// collection. 1–127 characters, no control characters, no whitespace at either end. The
    /// name is only a lookup key: sources resolve it against their catalog and never splice it
    /// into a query.
    CollectionName
);

impl CollectionName {
    /// Validates a collection name.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        check("collection", s, 127, |c| !c.is_control(), "printable characters")?;
        if s.trim() != s {
            return Err(NameError {
                kind: "collection",
                reason: "must not start or end with whitespace".into(),
            });
        }
        Ok(Self(s.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_ids_refuse_everything_but_the_safe_alphabet() {
        for bad in ["", "a b", "a'b", "a;b", "ä", "a\nb", &"x".repeat(129)] {
            assert!(TenantId::parse(bad).is_err(), "{bad:?} was accepted");
        }
        for good in ["acme", "t-1", "t_1.eu", &"x".repeat(128)] {
            assert_eq!(TenantId::parse(good).unwrap().as_str(), good);
        }
    }

    #[test]
    fn topics_allow_the_documented_alphabet_up_to_255_characters() {
        assert!(Topic::parse("order.created:v1_x-y").is_ok());
        assert!(Topic::parse(&"a".repeat(255)).is_ok());
        assert!(Topic::parse(&"a".repeat(256)).is_err());
        assert!(Topic::parse("order/created").is_err());
        assert!(Topic::parse("").is_err());
    }

    #[test]
    fn a_prefix_pattern_matches_below_the_prefix_only() {
        let p = TopicPattern::parse("order.*").unwrap();
        let t = |s| Topic::parse(s).unwrap();
        assert!(p.matches(&t("order.created")));
        assert!(p.matches(&t("order.eu.shipped")));
        assert!(!p.matches(&t("order")));
        assert!(!p.matches(&t("orders.created")));
        assert!(TopicPattern::parse("*").unwrap().matches(&t("anything")));
        assert!(TopicPattern::parse("order.**").is_err());
        assert!(TopicPattern::parse("or der.*").is_err());
        assert_eq!(p.to_string(), "order.*");
    }

    #[test]
    fn collection_names_refuse_control_characters_and_padding() {
        assert!(CollectionName::parse("public.todos").is_ok());
        assert!(CollectionName::parse("tâches").is_ok());
        assert!(CollectionName::parse("a\0b").is_err());
        assert!(CollectionName::parse(" todos").is_err());
        assert!(CollectionName::parse("").is_err());
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn parsing_any_text_never_panics_and_accepts_only_the_alphabet(s in "\\PC{0,300}") {
            let topic_ok = !s.is_empty() && s.len() <= 255 && s.chars().all(topic_char);
            prop_assert_eq!(Topic::parse(&s).is_ok(), topic_ok);
            let tenant_ok = !s.is_empty() && s.len() <= 128 && s.chars().all(ident_char);
            prop_assert_eq!(TenantId::parse(&s).is_ok(), tenant_ok);
            let _ = TopicPattern::parse(&s);
            let _ = CollectionName::parse(&s);
        }

        #[test]
        fn a_prefix_pattern_matches_exactly_the_topics_that_start_with_it(
            prefix in "[a-z.]{1,10}", topic in "[a-z.]{1,20}"
        ) {
            let pattern = TopicPattern::parse(&format!("{prefix}*")).unwrap();
            let topic = Topic::parse(&topic).unwrap();
            prop_assert_eq!(pattern.matches(&topic), topic.as_str().starts_with(&prefix));
        }
    }
}
