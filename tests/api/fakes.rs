//! Fake payment provider APIs on loopback (being written).
