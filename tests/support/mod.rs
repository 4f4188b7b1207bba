//! Test support shared by the integration test binaries (through `tests/api/helpers.rs`) and the
//! library's unit tests (through `src/lib.rs`): no dependency on the gateway's own code.

pub mod services;
pub mod time_limit;
