//! How an error is written to a log: its message and every cause after it, in one line.
//!
//! Must not: decide what is logged; callers choose the level and the fields.

/// The error and its sources on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
