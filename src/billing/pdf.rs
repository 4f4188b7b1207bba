//! Invoice PDF rendering (being written).
