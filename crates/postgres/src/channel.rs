//! NOTIFY channel names: the per-tenant feed identity shared by the trigger and the gateway.

use changegate_core::{Feed, FeedKey};
use md5::{Digest, Md5};

/// The relation name published messages use in their channel.
pub const MESSAGES: &str = "realtime.messages";

/// The relation name flag and configuration events use in their channel.
pub const FLAGS: &str = "realtime.flags";

/// `flc_rt_` + md5 of `'<schema>.<table>:<tenant>'` — the same text `realtime.channel()`
/// computes in SQL. Collection feeds must carry the canonical `schema.table` name.
///
/// ```
/// use changegate_core::{CollectionName, Feed, FeedKey, SourceKind, TenantId};
/// let key = FeedKey {
///     tenant: TenantId::parse("acme").unwrap(),
///     feed: Feed::Collection { source: SourceKind::Postgres, name: CollectionName::parse("public.todos").unwrap() },
/// };
/// // md5('public.todos:acme')
/// assert_eq!(changegate_postgres::channel(&key), "flc_rt_9211f24eaed6c31d96b822af39171124");
/// ```
pub fn channel(key: &FeedKey) -> String {
    let relation = match &key.feed {
        Feed::Messages => MESSAGES,
        Feed::Flags => FLAGS,
        Feed::Collection { name, .. } => name.as_str(),
    };
    let digest = Md5::digest(format!("{relation}:{}", key.tenant).as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("flc_rt_{hex}")
}
