//! How one member receives one change: a `Decision` from what is known without a query
//! (authentication off, a cached answer for the role), or from the row check's verdict. The
//! only arm that delivers is an explicit yes for the row version the change carries.
//!
//! Must not: query the database or queue frames.

use std::sync::Arc;

use crate::auth::rls::{Access, Hidden, KeyOnlyDeletes, Subject, Verdict};
use crate::change::{Change, ChangeKind, ReplicaIdentity};
use crate::realtime::hub::Hub;

/// How one member receives one change.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Decision {
    Deliver {
        hidden: Hidden,
        strip_old: bool,
    },
    /// Not visible to it (a plain no).
    Withhold,
    /// Withheld because the answer was not a yes or a no (a check that failed, a table dropped
    /// or altered since the change): the member is told why, once.
    Fail(Arc<str>),
    /// Needs a row check first.
    Check,
}

pub(super) const DELIVER_ALL: Decision = Decision::Deliver { hidden: None, strip_old: false };

/// What can be decided without a query: no subject (authentication off) → everything; a cached
/// answer for the role that does not depend on the row.
pub(super) fn decide_cached(hub: &Hub, change: &Change, subject: Option<&Arc<Subject>>) -> Decision {
    let Some(rls) = hub.rls() else { return DELIVER_ALL };
    let Some(subject) = subject else { return DELIVER_ALL };
    match rls.cached(&change.relation, &subject.role) {
        Some(Access::Open(hidden)) => Decision::Deliver { hidden, strip_old: false },
        Some(Access::Denied) => Decision::Withhold,
        Some(Access::Failed(reason)) => Decision::Fail(reason),
        Some(Access::Rows(_)) | None => Decision::Check,
    }
}

/// The old row carries every column (REPLICA IDENTITY FULL), so a policy can be evaluated on it.
pub(super) fn has_full_old_row(change: &Change) -> bool {
    change.old.is_some() && change.relation.replica_identity == ReplicaIdentity::Full
}

/// The decision for one subscriber once its verdict is known. The version a subscriber must be
/// able to see is the one the change carries: the new row of INSERT and UPDATE, the old row of
/// DELETE (`new_row`/`old_row`: their places in the checked rows, 0 = not checked). An UPDATE's `old_record` is withheld unless the old version was visible too.
pub(super) fn resolve(
    change: &Change,
    [new_row, old_row]: [u32; 2],
    v: &Verdict,
    key_only_deletes: KeyOnlyDeletes,
) -> Decision {
    let hidden = match &v.access {
        Access::Open(h) => return Decision::Deliver { hidden: h.clone(), strip_old: false },
        Access::Rows(h) => h.clone(),
        Access::Denied => return Decision::Withhold,
        Access::Failed(reason) => return Decision::Fail(Arc::clone(reason)),
    };
    match change.kind {
        ChangeKind::Insert | ChangeKind::Update => {
            if new_row == 0 || !v.sees(new_row) {
                return Decision::Withhold;
            }
            let strip_old = change.old.is_some() && (old_row == 0 || !v.sees(old_row));
            Decision::Deliver { hidden, strip_old }
        }
        ChangeKind::Delete => {
            if old_row > 0 {
                if v.sees(old_row) {
                    Decision::Deliver { hidden, strip_old: false }
                } else {
                    Decision::Withhold
                }
            } else if key_only_deletes == KeyOnlyDeletes::Deliver {
                Decision::Deliver { hidden, strip_old: false }
            } else {
                Decision::Withhold
            }
        }
        ChangeKind::Truncate => Decision::Withhold,
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::change::{Column, Relation};
    use crate::replication::lsn::Lsn;
    use crate::replication::pgoutput::{Tuple, Value};
    use crate::replication::values::TypeCatalog;

    fn change(kind: ChangeKind, identity: ReplicaIdentity) -> Change {
        let cat = TypeCatalog::default();
        let column = |name: &str, key: bool| Column {
            name: name.into(),
            ty: Arc::clone(cat.get(20).expect("int8")),
            is_key: key,
            in_primary_key: key,
        };
        let relation =
            Relation::new(1, "public", "t", identity, vec![column("id", true), column("n", false)]);
        let row = || Some(Tuple(vec![Value::Text(Bytes::from_static(b"1")), Value::Null]));
        Change {
            relation: Arc::new(relation),
            kind,
            new: (kind != ChangeKind::Delete).then(row).flatten(),
            old: (kind != ChangeKind::Insert).then(row).flatten(),
            commit_lsn: Lsn(1),
            commit_ts: 0,
            seq: 0,
            xid: 0,
            snapshot: false,
        }
    }

    fn rows(visible: &[u32]) -> Verdict {
        Verdict { access: Access::Rows(None), visible: visible.to_vec() }
    }

    const ALL: Decision = Decision::Deliver { hidden: None, strip_old: false };
    const NO_OLD: Decision = Decision::Deliver { hidden: None, strip_old: true };

    #[test]
    fn inserts_and_updates_need_the_new_row_seen() {
        let insert = change(ChangeKind::Insert, ReplicaIdentity::Default);
        let kod = KeyOnlyDeletes::Withhold;
        assert_eq!(resolve(&insert, [1, 0], &rows(&[1]), kod), ALL);
        assert_eq!(resolve(&insert, [1, 0], &rows(&[]), kod), Decision::Withhold);
        // A row that was not checked is never taken as seen.
        assert_eq!(resolve(&insert, [0, 0], &rows(&[1]), kod), Decision::Withhold);
        let update = change(ChangeKind::Update, ReplicaIdentity::Full);
        assert_eq!(resolve(&update, [1, 2], &rows(&[1, 2]), kod), ALL);
        // The old version unseen (or unchecked): delivered without `old_record`.
        assert_eq!(resolve(&update, [1, 2], &rows(&[1]), kod), NO_OLD);
        assert_eq!(resolve(&update, [1, 0], &rows(&[1]), kod), NO_OLD);
        assert_eq!(resolve(&update, [1, 2], &rows(&[2]), kod), Decision::Withhold);
    }

    #[test]
    fn deletes_need_the_whole_old_row_unless_opted_in() {
        let full = change(ChangeKind::Delete, ReplicaIdentity::Full);
        assert_eq!(resolve(&full, [0, 1], &rows(&[1]), KeyOnlyDeletes::Withhold), ALL);
        assert_eq!(resolve(&full, [0, 1], &rows(&[]), KeyOnlyDeletes::Deliver), Decision::Withhold);
        let keys = change(ChangeKind::Delete, ReplicaIdentity::Default);
        assert!(!has_full_old_row(&keys) && has_full_old_row(&full));
        assert_eq!(resolve(&keys, [0, 0], &rows(&[]), KeyOnlyDeletes::Withhold), Decision::Withhold);
        assert_eq!(resolve(&keys, [0, 0], &rows(&[]), KeyOnlyDeletes::Deliver), ALL);
    }

    #[test]
    fn only_an_explicit_yes_delivers() {
        let insert = change(ChangeKind::Insert, ReplicaIdentity::Default);
        let kod = KeyOnlyDeletes::Deliver;
        let hidden: Hidden = Some(Arc::from([Arc::from("n")]));
        let open = Verdict { access: Access::Open(hidden.clone()), visible: Vec::new() };
        assert_eq!(resolve(&insert, [0, 0], &open, kod), Decision::Deliver { hidden, strip_old: false });
        let denied = Verdict { access: Access::Denied, visible: vec![1] };
        assert_eq!(resolve(&insert, [1, 0], &denied, kod), Decision::Withhold);
        let failed = Verdict { access: Access::Failed("policy raised".into()), visible: vec![1] };
        assert_eq!(resolve(&insert, [1, 0], &failed, kod), Decision::Fail("policy raised".into()));
        let truncate = change(ChangeKind::Truncate, ReplicaIdentity::Default);
        assert_eq!(resolve(&truncate, [0, 0], &rows(&[1]), kod), Decision::Withhold);
    }
}
