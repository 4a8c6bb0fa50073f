//! Credentials and what they allow: API key syntax and scopes, key hashes, and the
//! [`Principal`] a request acts as once authenticated.
//!
//! Keys are secrets: [`ApiKey`] never prints itself, stores keep only a [`KeyHash`], and hashes
//! are compared in constant time.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::names::{EnvironmentId, TenantId};

/// What an API key may do.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Scope {
    /// Subscribe to collections and topics; read-only, may travel in a query string.
    Anon,
    /// Flag streams and evaluation (SDKs); read-only.
    Sdk,
    /// Flag streams; read-only.
    Stream,
    /// Publish application messages.
    Publish,
    /// Everything in its tenant, including management. Header only.
    Service,
}

impl Scope {
    /// Every scope, in documentation order.
    pub const ALL: [Scope; 5] = [Self::Anon, Self::Sdk, Self::Stream, Self::Publish, Self::Service];

    /// The scope's name as it appears in keys (`flc_<scope>_…`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Anon => "anon",
            Self::Sdk => "sdk",
            Self::Stream => "stream",
            Self::Publish => "publish",
            Self::Service => "service",
        }
    }

    /// Read-only scopes are the only ones that may be sent in a URL (`?apikey=`), because URLs
    /// end up in logs and browser history.
    pub const fn is_read_only(self) -> bool {
        matches!(self, Self::Anon | Self::Sdk | Self::Stream)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A scope name that changegate does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown scope; expected one of anon, sdk, stream, publish, service")]
pub struct UnknownScope;

impl FromStr for Scope {
    type Err = UnknownScope;

    fn from_str(s: &str) -> Result<Self, UnknownScope> {
        Self::ALL.into_iter().find(|scope| scope.as_str() == s).ok_or(UnknownScope)
    }
}

/// A text that is not a well-formed changegate API key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed API key; expected flc_<scope>_<random>")]
pub struct MalformedKey;

/// An API key, `flc_<scope>_<random>`. The random part is 20–128 ASCII letters or digits;
/// generated keys carry 160 bits. `Debug` and `Display` never show the secret.
///
/// ```
/// use changegate_core::{ApiKey, Scope};
/// let key = ApiKey::generate(Scope::Anon);
/// assert!(key.expose().starts_with("flc_anon_"));
/// assert_eq!(ApiKey::parse(key.expose()).unwrap().scope(), Scope::Anon);
/// assert!(!format!("{key:?}").contains(&key.expose()[9..]));
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey {
    text: String,
    scope: Scope,
}

impl ApiKey {
    /// Parses a key, checking its shape and scope. Says nothing about whether it exists.
    pub fn parse(text: &str) -> Result<Self, MalformedKey> {
        let rest = text.strip_prefix("flc_").ok_or(MalformedKey)?;
        let (scope, random) = rest.split_once('_').ok_or(MalformedKey)?;
        let scope = scope.parse::<Scope>().map_err(|_| MalformedKey)?;
        let shaped = (20..=128).contains(&random.len()) && random.bytes().all(|b| b.is_ascii_alphanumeric());
        if !shaped {
            return Err(MalformedKey);
        }
        Ok(Self { text: text.to_owned(), scope })
    }

    /// A new random key with 160 bits from the operating system's generator.
    ///
    /// # Panics
    /// If the operating system has no random source: issuing a guessable key would be worse.
    pub fn generate(scope: Scope) -> Self {
        let mut bytes = [0u8; 20];
        #[allow(clippy::expect_used)]
        getrandom::fill(&mut bytes).expect("the operating system's random source is unavailable");
        let random: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Self { text: format!("flc_{}_{random}", scope.as_str()), scope }
    }

    /// The scope written in the key.
    pub fn scope(&self) -> Scope {
        self.scope
    }

    /// The secret text. Call only to hand the key to its owner once, or to hash it.
    pub fn expose(&self) -> &str {
        &self.text
    }

    /// The hash stores keep instead of the key.
    pub fn hash(&self) -> KeyHash {
        KeyHash(Sha256::digest(self.text.as_bytes()).into())
    }

    /// A short, non-secret prefix for listings: `flc_anon_1a2b3c…`.
    pub fn display_prefix(&self) -> String {
        let head = self.scope.as_str().len() + 5 + 6;
        format!("{}…", &self.text[..head])
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey({})", self.display_prefix())
    }
}

/// SHA-256 of a key. Keys are long random strings, so a fast unsalted hash is the right tool:
/// there is nothing to brute-force.
#[derive(Clone, Copy, Eq, Debug)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    /// A stable, non-secret id derived from the hash (`key_` + 12 hex digits), for listings
    /// and revocation.
    pub fn id(&self) -> String {
        let hex: String = self.0[..6].iter().map(|b| format!("{b:02x}")).collect();
        format!("key_{hex}")
    }
}

impl std::hash::Hash for KeyHash {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl PartialEq for KeyHash {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

/// A stored key: whose it is and what it may do.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyRecord {
    /// A stable, non-secret id (for listings and revocation).
    pub id: String,
    /// The hash of the key.
    pub hash: KeyHash,
    /// The key's tenant.
    pub tenant: TenantId,
    /// The environment the key is limited to, if any.
    pub environment: Option<EnvironmentId>,
    /// The key's scope.
    pub scope: Scope,
    /// Whether the key was revoked (it then authenticates nothing).
    pub revoked: bool,
}

/// How a principal authenticated.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Role {
    /// An API key of this scope.
    Key(Scope),
    /// A signed JWT: tenant-scoped, every environment, every action.
    Token,
}

/// What a route needs a principal to be allowed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Action {
    /// Read collection changes and topic messages.
    Subscribe,
    /// Publish messages.
    Publish,
    /// Read flag streams and evaluate flags.
    ReadFlags,
    /// Create and change flags, rules, segments and environments.
    ManageFlags,
}

/// Who a request acts as: always exactly one tenant.
#[derive(Clone, PartialEq, Debug)]
pub struct Principal {
    /// The only tenant whose events this principal can see or write.
    pub tenant: TenantId,
    /// The environment a key is limited to.
    pub environment: Option<EnvironmentId>,
    /// How it authenticated.
    pub role: Role,
    /// The key id, for closing streams of a revoked key (`None` for JWTs).
    pub key_id: Option<String>,
}

impl Principal {
    /// Whether the principal may perform `action`.
    ///
    /// ```
    /// use changegate_core::{Principal, Role, Scope, TenantId, auth::Action};
    /// let anon = Principal { tenant: TenantId::parse("t").unwrap(), environment: None,
    ///                        role: Role::Key(Scope::Anon), key_id: None };
    /// assert!(anon.may(Action::Subscribe));
    /// assert!(!anon.may(Action::Publish));
    /// ```
    pub fn may(&self, action: Action) -> bool {
        matches!(
            (self.role, action),
            (Role::Token | Role::Key(Scope::Service), _)
                | (Role::Key(Scope::Anon), Action::Subscribe)
                | (Role::Key(Scope::Publish), Action::Publish)
                | (Role::Key(Scope::Sdk | Scope::Stream), Action::ReadFlags)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_back_with_their_scope() {
        for scope in Scope::ALL {
            let key = ApiKey::generate(scope);
            let parsed = ApiKey::parse(key.expose()).unwrap();
            assert_eq!(parsed.scope(), scope);
            assert_eq!(parsed.hash(), key.hash());
            assert_eq!(key.expose().len(), 4 + scope.as_str().len() + 1 + 40);
        }
    }

    #[test]
    fn two_generated_keys_differ() {
        assert_ne!(ApiKey::generate(Scope::Anon), ApiKey::generate(Scope::Anon));
    }

    #[test]
    fn malformed_keys_are_refused() {
        let random = "a".repeat(20);
        for bad in [
            String::new(),
            format!("flc_root_{random}"),
            format!("flx_anon_{random}"),
            "flc_anon_short".to_owned(),
            format!("flc_anon_{random}!"),
            format!("flc_anon_{}", "a".repeat(129)),
            format!("flc__{random}"),
            format!("flc_anon{random}"),
        ] {
            assert_eq!(ApiKey::parse(&bad), Err(MalformedKey), "{bad:?}");
        }
    }

    #[test]
    fn keys_never_print_their_secret() {
        let key = ApiKey::generate(Scope::Service);
        let secret_tail = &key.expose()[20..];
        assert!(!format!("{key:?}").contains(secret_tail));
        assert!(!key.display_prefix().contains(secret_tail));
    }

    #[test]
    fn only_anon_sdk_and_stream_are_read_only() {
        let ro: Vec<_> = Scope::ALL.into_iter().filter(|s| s.is_read_only()).collect();
        assert_eq!(ro, [Scope::Anon, Scope::Sdk, Scope::Stream]);
    }

    #[test]
    fn scopes_allow_exactly_their_actions() {
        let p =
            |role| Principal { tenant: TenantId::parse("t").unwrap(), environment: None, role, key_id: None };
        let table = [
            (Role::Key(Scope::Anon), [true, false, false, false]),
            (Role::Key(Scope::Sdk), [false, false, true, false]),
            (Role::Key(Scope::Stream), [false, false, true, false]),
            (Role::Key(Scope::Publish), [false, true, false, false]),
            (Role::Key(Scope::Service), [true, true, true, true]),
            (Role::Token, [true, true, true, true]),
        ];
        let actions = [Action::Subscribe, Action::Publish, Action::ReadFlags, Action::ManageFlags];
        for (role, allowed) in table {
            for (action, allowed) in actions.into_iter().zip(allowed) {
                assert_eq!(p(role).may(action), allowed, "{role:?} {action:?}");
            }
        }
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn parsing_any_text_never_panics_and_never_accepts_a_wrong_shape(s in "\\PC{0,200}") {
            if let Ok(key) = ApiKey::parse(&s) {
                let expected_prefix = format!("flc_{}_", key.scope());
                prop_assert!(s.starts_with(&expected_prefix));
                prop_assert!(s.is_ascii());
            }
        }

        #[test]
        fn well_formed_keys_parse_with_their_scope(scope in 0usize..5, random in "[A-Za-z0-9]{20,128}") {
            let scope = Scope::ALL[scope];
            let key = ApiKey::parse(&format!("flc_{scope}_{random}")).unwrap();
            prop_assert_eq!(key.scope(), scope);
        }
    }
}
