//! The command line's parts: arguments, progress display, listings.

pub mod args;
pub mod listing;
pub mod progress;
