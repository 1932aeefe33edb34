//! placeholder
pub mod schedule;
pub mod stream;
pub mod verdict;
