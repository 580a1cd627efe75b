//! Row filters: the grammar realtime-js emits (`parse.rs`) and typed evaluation against a
//! change (`eval.rs`).

pub mod eval;
pub mod parse;

pub use eval::{CompileError, CompiledFilter, IndexKey};
pub use parse::{parse, Condition, Filter, Op, Operand, ParseError};
