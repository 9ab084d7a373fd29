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
use std::sync::atomic::{AtomicUsize, Ordering};
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

/// Registrations alive, so that a holder releasing a lease nobody waits for (the common case)
/// skips the registry's lock. A waiter that registers just after the check is missed, as any
/// wake-up that comes before a registration is.
static WAITING: AtomicUsize = AtomicUsize::new(0);

/// Interest in one key's lease on one store, for as long as it lives: dropped (a wait that
/// ended, or a reader that gave up), it leaves the registry as it found it.
pub(crate) struct Waiter {
    slot: Slot,
    notify: Option<Arc<Notify>>,
}

impl Waiter {
    /// Registers interest in `key`'s lease on `store`.
    pub(crate) fn register(store: usize, key: &TokenKey) -> Self {
        WAITING.fetch_add(1, Ordering::SeqCst);
        let slot = (store, key.clone());
        let notify = Arc::clone(lock().entry(slot.clone()).or_default());
        Waiter {
            slot,
            notify: Some(notify),
        }
    }

    /// What the lease holder signals.
    pub(crate) fn notify(&self) -> &Notify {
        self.notify
            .as_deref()
            .expect("present until the waiter is dropped")
    }
}

impl Drop for Waiter {
    /// Drops the registration, and the entry when nobody else waits on it.
    fn drop(&mut self) {
        let mut map = lock();
        drop(self.notify.take());
        if map
            .get(&self.slot)
            .is_some_and(|n| Arc::strong_count(n) == 1)
        {
            map.remove(&self.slot);
        }
        drop(map);
        WAITING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Wakes everyone waiting on `key`'s lease on `store` (called after the lease is released).
pub(crate) fn wake(store: usize, key: &TokenKey) {
    if WAITING.load(Ordering::SeqCst) == 0 {
        return;
    }
    let slot = (store, key.clone());
    if let Some(notify) = lock().remove(&slot) {
        notify.notify_waiters();
    }
}
