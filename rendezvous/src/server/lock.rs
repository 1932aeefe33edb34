//! Locking the server's tables.
//!
//! The store's and [`super::local`]'s mutexes guard plain map operations,
//! held for one call and never across an await. A panic while holding one
//! poisons it, but the maps are still consistent (no operation leaves them
//! half-done in a way a reader could see), so the server keeps serving
//! rather than failing every later request.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// The guard of `m`, poisoned or not.
pub(crate) fn unpoisoned<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
