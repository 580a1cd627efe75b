//! Private channels: what a subject may do on a topic, decided by the row-level security
//! policies on `realtime.messages` as Supabase Realtime decides it (`walcast.topic_access`,
//! migration 0004), and the replay of a private topic's recent database broadcasts.
//!
//! Owns: the two SQL calls and their errors. Must not: touch sockets or channel state, or log
//! message payloads.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use sqlx::PgPool;

use crate::auth::rls::Subject;
use crate::change::broadcast::{BroadcastMessage, BroadcastPayload};

/// The most messages one replay returns (Supabase's hard limit).
pub const MAX_REPLAY: i64 = 25;

/// What a subject may do on one private topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TopicAccess {
    pub broadcast_read: bool,
    pub broadcast_write: bool,
    pub presence_read: bool,
    pub presence_write: bool,
}

impl TopicAccess {
    /// Everything: public channels, and private ones when authentication is off.
    pub const ALL: TopicAccess = TopicAccess {
        broadcast_read: true,
        broadcast_write: true,
        presence_read: true,
        presence_write: true,
    };

    /// Whether a join may proceed: it may read broadcasts, or presence when presence is on.
    pub fn may_join(&self, presence_enabled: bool) -> bool {
        self.broadcast_read || (presence_enabled && self.presence_read)
    }

    /// Whether `self` withdraws a read right `before` granted.
    pub fn revokes_read(&self, before: &TopicAccess) -> bool {
        (before.broadcast_read && !self.broadcast_read) || (before.presence_read && !self.presence_read)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error("the channel's policies could not be checked")]
    Query(#[source] sqlx::Error),
    /// A policy raised, or the role does not exist.
    #[error("{0}")]
    Policy(String),
    #[error("Replay params are not valid")]
    InvalidReplay,
    #[error("Realtime was unable to replay messages")]
    Replay(#[source] sqlx::Error),
}

/// One replayed database broadcast.
#[derive(Debug, Clone)]
pub struct Replayed {
    pub id: Arc<str>,
    pub message: Arc<BroadcastMessage>,
}

/// `realtime.messages` as private channels see it.
pub struct TopicPolicies {
    pool: PgPool,
    /// Policy errors already logged (topic-independent: the message names the cause).
    logged: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for TopicPolicies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopicPolicies").finish_non_exhaustive()
    }
}

impl TopicPolicies {
    pub fn new(pool: PgPool) -> TopicPolicies {
        TopicPolicies { pool, logged: Mutex::new(HashSet::new()) }
    }

    /// What `subject` may do on `topic` (the channel name, without `realtime:`), in one round
    /// trip that leaves nothing behind.
    pub async fn access(&self, subject: &Subject, topic: &str) -> Result<TopicAccess, TopicError> {
        type Row = (Option<bool>, Option<bool>, Option<bool>, Option<bool>, Option<String>);
        let (br, bw, pr, pw, error): Row = sqlx::query_as(
            "SELECT broadcast_read, broadcast_write, presence_read, presence_write, error \
             FROM walcast.topic_access($1, $2, $3::jsonb)",
        )
        .bind(topic)
        .bind(&*subject.role)
        .bind(&*subject.claims)
        .fetch_one(&self.pool)
        .await
        .map_err(TopicError::Query)?;
        if let Some(message) = error {
            let first = {
                let mut logged = crate::locks::lock(&self.logged);
                logged.len() < 1_000 && logged.insert(message.clone())
            };
            if first {
                tracing::warn!(role = %subject.role, error = %message, "private channel check failed; denied");
            }
            return Err(TopicError::Policy(message));
        }
        let yes = |b: Option<bool>| b.unwrap_or(false);
        Ok(TopicAccess {
            broadcast_read: yes(br),
            broadcast_write: yes(bw),
            presence_read: yes(pr),
            presence_write: yes(pw),
        })
    }

    /// The newest `limit` (clamped to 1..=25) database broadcasts of private `topic` inserted at
    /// or after `since_ms` (Unix milliseconds), oldest first, each with `meta` =
    /// `{"replayed":true,"id":…}`.
    pub async fn replay(&self, topic: &str, since_ms: i64, limit: i64) -> Result<Vec<Replayed>, TopicError> {
        let limit = limit.clamp(1, MAX_REPLAY);
        type Row = (String, Option<String>, Option<String>, Option<Vec<u8>>);
        let mut rows: Vec<Row> = sqlx::query_as(
            "SELECT id::text, event, payload::text, binary_payload FROM realtime.messages \
             WHERE topic = $1 AND private IS TRUE AND extension = 'broadcast' \
               AND inserted_at >= (to_timestamp($2::float8 / 1000) AT TIME ZONE current_setting('TimeZone')) \
             ORDER BY inserted_at DESC LIMIT $3",
        )
        .bind(topic)
        .bind(since_ms as f64)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(TopicError::Replay)?;
        rows.reverse();
        Ok(rows
            .into_iter()
            .map(|(id, event, payload, binary)| {
                let payload = match binary {
                    Some(b) => BroadcastPayload::Binary(Bytes::from(b)),
                    None => BroadcastPayload::Json(Bytes::from(payload.unwrap_or_else(|| "null".into()))),
                };
                let meta = serde_json::json!({"replayed": true, "id": id}).to_string();
                Replayed {
                    message: Arc::new(BroadcastMessage {
                        event: event.unwrap_or_default(),
                        payload,
                        meta: Some(Bytes::from(meta)),
                        logged: None,
                    }),
                    id: id.into(),
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_and_revocation_rules() {
        let none = TopicAccess::default();
        let presence_only = TopicAccess { presence_read: true, ..none };
        assert!(TopicAccess::ALL.may_join(false));
        assert!(!none.may_join(true));
        assert!(!presence_only.may_join(false), "presence read counts only with presence on");
        assert!(presence_only.may_join(true));
        assert!(none.revokes_read(&presence_only));
        assert!(!presence_only.revokes_read(&none));
        let write_lost = TopicAccess { broadcast_write: false, ..TopicAccess::ALL };
        assert!(!write_lost.revokes_read(&TopicAccess::ALL), "losing write is not a read revocation");
    }
}
