//! Domain types shared by every layer: money, accounts, request ids, token counts and time.

mod credits;
mod ids;
pub mod time;
mod usage;

pub use credits::{Credits, CreditsError, MICROS_PER_CREDIT};
pub use ids::{AccountId, InvalidAccountId, RequestId};
pub use usage::TokenUsage;
