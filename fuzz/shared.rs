//! What the targets that drive connections share: one runtime, one hub and one verifier for
//! every input (connections come and go on them, as on a gateway).

use std::sync::OnceLock;

use walcast::realtime::{Hub, Limits};

pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime"))
}

pub fn hub() -> &'static Hub {
    static HUB: OnceLock<Hub> = OnceLock::new();
    HUB.get_or_init(|| Hub::with_limits(Limits::default()))
}

pub fn verifier() -> &'static walcast::auth::Verifier {
    static V: OnceLock<walcast::auth::Verifier> = OnceLock::new();
    V.get_or_init(|| walcast::auth::Verifier::with_secret("fuzz-secret-fuzz-secret-fuzz-secret"))
}
