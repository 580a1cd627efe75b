//! The dispatcher task: takes changes in commit order, finds matching channels through the
//! index, renders `data` once per change (once per distinct `select`), frames it once per
//! (topic prefix, ids) and pushes the shared bytes to each socket's queue without waiting.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio_util::sync::CancellationToken;

use crate::change::{Change, ChangeEvent};
use crate::fanout::index::Subscription;
use crate::fanout::{ChannelSink, Fanout};

use crate::replication::pgoutput::Value;

/// Runs until the replication side closes the channel or `shutdown` fires.
pub async fn run_dispatcher(
    fanout: Fanout,
    mut rx: mpsc::Receiver<ChangeEvent>,
    max_record_bytes: usize,
    shutdown: CancellationToken,
) {
    let mut scratch = Scratch::default();
    loop {
        let event = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            e = rx.recv() => match e {
                Some(e) => e,
                None => return,
            },
        };
        match event {
            ChangeEvent::Change(change) => {
                dispatch(&fanout, &change, max_record_bytes, &mut scratch);
                fanout.metrics.changes_dispatched.fetch_add(1, Ordering::Relaxed);
            }
            ChangeEvent::Commit { end_lsn, .. } => {
                fanout.dispatched.fetch_max(end_lsn.0, Ordering::Release);
            }
        }
    }
}

/// Buffers reused across changes so matching allocates little in the steady state.
#[derive(Default)]
pub struct Scratch {
    /// Rendered `data` objects of the current change, by `select` (address of the column list).
    data: Vec<(Option<usize>, Vec<u8>)>,
    /// Frames of the current change, by (topic prefix, ids, select).
    frames: HashMap<(usize, Vec<u32>, Option<usize>), Utf8Bytes>,
    ids: Vec<u32>,
}

/// Matches and delivers one change. Returns the number of frames queued.
pub fn dispatch(fanout: &Fanout, change: &Change, max_record_bytes: usize, scratch: &mut Scratch) -> usize {
    let Ok(index) = fanout.index.read() else {
        return 0;
    };
    if index.is_empty() {
        return 0;
    }
    let mut matched: Vec<&Arc<Subscription>> = Vec::new();
    index.matching(change, |sub| matched.push(sub));
    if matched.is_empty() {
        return 0;
    }
    // One push per channel, with all of its matching binding ids.
    if matched.len() > 1 {
        matched.sort_unstable_by_key(|s| (Arc::as_ptr(&s.channel) as usize, s.binding.id));
        matched.dedup_by_key(|s| (Arc::as_ptr(&s.channel) as usize, s.binding.id));
    }
    scratch.data.clear();
    scratch.frames.clear();
    let mut delivered = 0;
    let mut i = 0;
    while i < matched.len() {
        let sub = matched[i];
        let channel = &sub.channel;
        scratch.ids.clear();
        while i < matched.len() && Arc::ptr_eq(&matched[i].channel, channel) {
            scratch.ids.push(matched[i].binding.id);
            i += 1;
        }
        let select = sub.binding.select.as_ref().map(|s| Arc::as_ptr(s) as *const Arc<str> as usize);
        let data_at = match scratch.data.iter().position(|(k, _)| *k == select) {
            Some(at) => at,
            None => {
                scratch
                    .data
                    .push((select, render_data(change, sub.binding.select.as_deref(), max_record_bytes)));
                scratch.data.len() - 1
            }
        };
        let data = &scratch.data[data_at].1;
        let prefix_key = channel.prefix.as_ptr() as usize ^ channel.prefix.len();
        // Most changes reach one channel per topic: build directly, cache only when it can repeat.
        let frame = if matched.len() == 1 {
            build_frame(channel, &scratch.ids, data)
        } else {
            let frame_key = (prefix_key, scratch.ids.clone(), select);
            scratch
                .frames
                .entry(frame_key)
                .or_insert_with(|| build_frame(channel, &scratch.ids, data))
                .clone()
        };
        match channel.tx.try_send(frame) {
            Ok(()) => delivered += 1,
            Err(TrySendError::Full(_)) => {
                if !channel.kill.is_cancelled() {
                    fanout.metrics.slow_client_disconnects.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("client outbound queue full; disconnecting slow client");
                    channel.kill.cancel();
                }
            }
            Err(TrySendError::Closed(_)) => {}
        }
    }
    fanout.metrics.frames_delivered.fetch_add(delivered as u64, Ordering::Relaxed);
    delivered
}

fn build_frame(channel: &ChannelSink, ids: &[u32], data: &[u8]) -> Utf8Bytes {
    let mut f = Vec::with_capacity(channel.prefix.len() + data.len() + 16 + ids.len() * 11);
    f.extend_from_slice(&channel.prefix);
    for (n, id) in ids.iter().enumerate() {
        if n > 0 {
            f.push(b',');
        }
        f.extend_from_slice(id.to_string().as_bytes());
    }
    f.extend_from_slice(b"],\"data\":");
    f.extend_from_slice(data);
    f.extend_from_slice(channel.suffix);
    // The frame is built from JSON fragments that are all valid UTF-8.
    Utf8Bytes::from(String::from_utf8(f).unwrap_or_default())
}

/// The `data` object of a `postgres_changes` push. A record over `max_record_bytes` is sent with
/// only its small values and `errors: ["Error 413: Payload Too Large"]`.
pub fn render_data(change: &Change, select: Option<&[Arc<str>]>, max_record_bytes: usize) -> Vec<u8> {
    let rel = &change.relation;
    let keep = |name: &str| {
        select.is_none_or(|cols| {
            cols.iter().any(|c| &**c == name) || rel.column_index(name).is_some_and(|i| rel.columns[i].is_key)
        })
    };
    let mut out = Vec::with_capacity(256);
    out.push(b'{');
    let pred: &dyn Fn(&str) -> bool = &keep;
    change.write_data_fields(&mut out, select.map(|_| pred));
    if out.len() <= max_record_bytes {
        out.extend_from_slice(b",\"errors\":null}");
        return out;
    }
    // Too large: keep only small values.
    let small = |name: &str| {
        keep(name)
            && rel.column_index(name).is_some_and(|i| {
                let len = |t: Option<&crate::replication::pgoutput::Tuple>| match t.and_then(|t| t.0.get(i)) {
                    Some(Value::Text(b)) => b.len(),
                    _ => 0,
                };
                len(change.new.as_ref()) <= 64 && len(change.old.as_ref()) <= 64
            })
    };
    out.clear();
    out.push(b'{');
    change.write_data_fields(&mut out, Some(&small));
    out.extend_from_slice(b",\"errors\":[\"Error 413: Payload Too Large\"]}");
    out
}
