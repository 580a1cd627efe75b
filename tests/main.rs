//! The integration tests: one binary, real PostgreSQL, real clients.

mod cases;
mod support;
