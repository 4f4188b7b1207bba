//! Selling credits: the credit packages on offer and the payment providers' webhook signatures.

pub mod invoice;
pub mod packages;
pub mod signatures;
