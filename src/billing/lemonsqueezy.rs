//! Lemon Squeezy API client (being written).
