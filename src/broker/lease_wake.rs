//! Wakes broker instances of this process that wait for a refresh lease held by another
//! instance of this process on the same store.
//!
//! Across processes a waiter can only poll the store (10 ms, doubling). Inside one process,
//! instances sharing one store `Arc` would poll the same way, and with a fast IdP the whole
//! fan-in then lasts as long as the first pause. So the holder, after releasing the lease,
//! wakes the waiters registered here; the waiters still re-read the store, which stays the
//! only source of truth, and keep their timed pause as the fallback (a wake-up that comes
//! before a waiter registers is simply missed, costing one pause, as before).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::Notify;

use crate::ids::TokenKey;
use crate::store::TokenStore;

/// A store told apart by the address of its shared allocation. An address reused after a
/// store is dropped can only cause a spurious wake-up, which makes a waiter re-read early.
type Slot = (usize, TokenKey);

type Waiters = HashMap<Slot, Arc<Notify>, foldhash::fast::RandomState>;

fn waiters() -> &'static Mutex<Waiters> {
    static WAITERS: OnceLock<Mutex<Waiters>> = OnceLock::new();
    WAITERS.get_or_init(Default::default)
}

fn lock() -> std::sync::MutexGuard<'static, Waiters> {
    // Every critical section below is a single map operation: a poisoned map is consistent.
    waiters().lock().unwrap_or_else(|e| e.into_inner())
}

/// The identity of `store` for this registry.
pub(crate) fn store_id(store: &Arc<dyn TokenStore>) -> usize {
    Arc::as_ptr(store) as *const () as usize
}

/// Registers interest in `key`'s lease on `store`; pair with [`done_waiting`].
pub(crate) fn waiter(store: usize, key: &TokenKey) -> Arc<Notify> {
    Arc::clone(lock().entry((store, key.clone())).or_default())
}

/// Drops a registration, and the entry when nobody else waits on it.
pub(crate) fn done_waiting(store: usize, key: &TokenKey, notify: Arc<Notify>) {
    let mut map = lock();
    drop(notify);
    let slot = (store, key.clone());
    if map.get(&slot).is_some_and(|n| Arc::strong_count(n) == 1) {
        map.remove(&slot);
    }
}

/// Wakes everyone waiting on `key`'s lease on `store` (called after the lease is released).
pub(crate) fn wake(store: usize, key: &TokenKey) {
    let slot = (store, key.clone());
    if let Some(notify) = lock().remove(&slot) {
        notify.notify_waiters();
    }
}
