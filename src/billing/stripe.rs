//! Stripe API client (being written).
