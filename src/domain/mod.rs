//! Domain types shared by every layer: money, accounts, request ids, token counts, invoice
//! parties and time.

mod credits;
mod ids;
mod party;
pub mod time;
mod usage;

pub use credits::{Credits, CreditsError, MICROS_PER_CREDIT};
pub use ids::{AccountId, InvalidAccountId, RequestId};
pub use party::Party;
pub use usage::TokenUsage;
