//! Every store in the crate keeps the `TokenStore` contract: the public conformance suite, run
//! on each. (SQL and encrypted stores run it in their own test files.)

mod memory {
    use std::sync::Arc;
    use tokenbroker::{MemoryStore, TokenStore};

    tokenbroker::store_conformance_tests!(async {
        Arc::new(MemoryStore::new()) as Arc<dyn TokenStore>
    });
}

/// The forwarding impls (`Arc<S>`, `Box<S>`) must forward every method, scan and leases
/// included.
mod forwarding {
    use std::sync::Arc;
    use tokenbroker::{MemoryStore, TokenStore};

    tokenbroker::store_conformance_tests!(async {
        let boxed: Box<dyn TokenStore> = Box::new(Arc::new(MemoryStore::new()));
        Arc::new(boxed) as Arc<dyn TokenStore>
    });
}

/// `run_all` is what a host calls on its own store; one shared store serves every check.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_all_on_one_shared_memory_store() {
    let store: tokenbroker::testing::store_conformance::SharedStore =
        std::sync::Arc::new(tokenbroker::MemoryStore::new());
    tokenbroker::testing::store_conformance::run_all(&store).await;
    tokenbroker::testing::store_conformance::run_all(&store).await;
}

/// The suite must catch broken stores, or passing it means nothing. Each broken store below
/// wraps a `MemoryStore` and breaks one rule of the contract.
mod catches_broken_stores {
    use std::collections::HashMap;
    use std::future::Future;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use async_trait::async_trait;
    use tokenbroker::store::{
        Lease, LeaseAttempt, LeaseHolder, LeaseToken, Record, ScanCursor, ScanPage, StoreError,
        StoredRecord, Version,
    };
    use tokenbroker::testing::store_conformance::{self, SharedStore};
    use tokenbroker::{MemoryStore, Realm, Subject, TokenKey, TokenStore};

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Flaw {
        /// `compare_and_swap` ignores the expected version (last writer wins).
        CasIgnoresVersion,
        /// Versions restart at 1 after a delete, as a per-row counter would.
        VersionsRestart,
        /// The holder of a lease may take it again.
        ReentrantLease,
        /// `scan` hands out a cursor after a page's first link, not its last: links come back
        /// more than once in a pass.
        ScanRepeats,
        /// `scan` hands out a cursor one link past the page: a link per page is never returned.
        ScanSkips,
        /// `scan` reads a cursor it did not make as "from the start".
        ScanRestartsOnForeignCursor,
        /// `release_lease` frees the key's lease when the holder id matches, whatever the
        /// token (leases before fencing).
        ReleaseByHolder,
        /// `compare_and_swap` ignores its fence.
        FenceIgnored,
        /// `extend_lease` extends the key's current lease, whatever the token.
        ExtendByKey,
        /// `extend_lease` reports a later expiry but changes nothing.
        ExtendDoesNothing,
        /// An expired lease's token stops working even though nobody took the lease over.
        ExpiredTokenDropped,
    }

    /// `MemoryStore` counts its versions.
    fn number(v: &Version) -> u64 {
        v.number().expect("MemoryStore versions are numbers")
    }

    #[derive(Debug)]
    struct Broken {
        inner: MemoryStore,
        flaw: Flaw,
        restart: AtomicU64,
        /// The last lease acquired on each key.
        leases: Mutex<HashMap<TokenKey, Lease>>,
    }

    impl Broken {
        fn shared(flaw: Flaw) -> SharedStore {
            Arc::new(Broken {
                inner: MemoryStore::new(),
                flaw,
                restart: AtomicU64::new(0),
                leases: Mutex::new(HashMap::new()),
            })
        }

        fn current_lease(&self, key: &TokenKey) -> Option<Lease> {
            self.leases.lock().unwrap().get(key).cloned()
        }

        /// Whether `token` is the key's last lease and that lease has expired.
        fn expired(&self, key: &TokenKey, token: &LeaseToken) -> bool {
            self.current_lease(key).is_some_and(|l| {
                &l.token == token && l.expires_at <= time::OffsetDateTime::now_utc()
            })
        }
    }

    #[async_trait]
    impl TokenStore for Broken {
        async fn load(&self, key: &TokenKey) -> Result<Option<StoredRecord>, StoreError> {
            let loaded = self.inner.load(key).await?;
            if self.flaw == Flaw::VersionsRestart {
                return Ok(loaded.map(|r| {
                    let v = Version::from_number(
                        number(&r.version) - self.restart.load(Ordering::SeqCst),
                    );
                    StoredRecord::new(r.record, v)
                }));
            }
            Ok(loaded)
        }
        async fn insert(&self, key: &TokenKey, record: &Record) -> Result<Version, StoreError> {
            let v = self.inner.insert(key, record).await?;
            if self.flaw == Flaw::VersionsRestart {
                // Pretend this row's counter starts at 1.
                self.restart.store(number(&v) - 1, Ordering::SeqCst);
                return Ok(Version::from_number(1));
            }
            Ok(v)
        }
        async fn compare_and_swap(
            &self,
            key: &TokenKey,
            expected: Version,
            record: &Record,
            fence: Option<&LeaseToken>,
        ) -> Result<Version, StoreError> {
            match self.flaw {
                Flaw::FenceIgnored => {
                    return self
                        .inner
                        .compare_and_swap(key, expected, record, None)
                        .await;
                }
                Flaw::ExpiredTokenDropped if fence.is_some_and(|f| self.expired(key, f)) => {
                    return Err(StoreError::Conflict { key: key.clone() });
                }
                _ => {}
            }
            match self.flaw {
                Flaw::CasIgnoresVersion => {
                    let current = self.inner.load(key).await?;
                    let Some(current) = current else {
                        return Err(StoreError::Conflict { key: key.clone() });
                    };
                    self.inner
                        .compare_and_swap(key, current.version, record, fence)
                        .await
                }
                Flaw::VersionsRestart => {
                    let offset = self.restart.load(Ordering::SeqCst);
                    let v = self
                        .inner
                        .compare_and_swap(
                            key,
                            Version::from_number(number(&expected) + offset),
                            record,
                            fence,
                        )
                        .await?;
                    Ok(Version::from_number(number(&v) - offset))
                }
                _ => {
                    self.inner
                        .compare_and_swap(key, expected, record, fence)
                        .await
                }
            }
        }
        async fn delete(
            &self,
            key: &TokenKey,
            expected: Option<Version>,
        ) -> Result<bool, StoreError> {
            let offset = if self.flaw == Flaw::VersionsRestart {
                self.restart.load(Ordering::SeqCst)
            } else {
                0
            };
            self.inner
                .delete(
                    key,
                    expected.map(|v| Version::from_number(number(&v) + offset)),
                )
                .await
        }
        async fn list(
            &self,
            realm: &Realm,
            subject: &Subject,
        ) -> Result<Vec<TokenKey>, StoreError> {
            self.inner.list(realm, subject).await
        }
        async fn scan(
            &self,
            cursor: Option<&tokenbroker::store::ScanCursor>,
            limit: usize,
        ) -> Result<tokenbroker::store::ScanPage, StoreError> {
            if self.flaw == Flaw::ScanRestartsOnForeignCursor
                && cursor.is_some_and(|c| c.key().is_err())
            {
                return self.inner.scan(None, limit).await;
            }
            let page = self.inner.scan(cursor, limit).await?;
            match self.flaw {
                Flaw::ScanRepeats if page.links.len() > 1 && page.next.is_some() => {
                    let first = ScanCursor::after_key(&page.links[0].key);
                    Ok(ScanPage::new(page.links, Some(first)))
                }
                Flaw::ScanSkips if page.next.is_some() => {
                    let skipped = self.inner.scan(page.next.as_ref(), 1).await?;
                    let next = skipped.links.first().map(|l| ScanCursor::after_key(&l.key));
                    Ok(ScanPage::new(page.links, next))
                }
                _ => Ok(page),
            }
        }
        async fn try_lease(
            &self,
            key: &TokenKey,
            holder: &LeaseHolder,
            ttl: Duration,
        ) -> Result<LeaseAttempt, StoreError> {
            match self.inner.try_lease(key, holder, ttl).await? {
                LeaseAttempt::Busy if self.flaw == Flaw::ReentrantLease => {
                    Ok(LeaseAttempt::Acquired(Lease::new(
                        key.clone(),
                        holder.clone(),
                        LeaseToken::random(),
                        time::OffsetDateTime::now_utc() + ttl,
                    )))
                }
                LeaseAttempt::Acquired(lease) => {
                    self.leases
                        .lock()
                        .unwrap()
                        .insert(key.clone(), lease.clone());
                    Ok(LeaseAttempt::Acquired(lease))
                }
                other => Ok(other),
            }
        }
        async fn release_lease(&self, lease: &Lease) -> Result<(), StoreError> {
            match self.current_lease(&lease.key) {
                Some(current)
                    if self.flaw == Flaw::ReleaseByHolder && current.holder == lease.holder =>
                {
                    self.inner.release_lease(&current).await
                }
                _ => self.inner.release_lease(lease).await,
            }
        }
        async fn extend_lease(
            &self,
            lease: &Lease,
            ttl: Duration,
        ) -> Result<Option<Lease>, StoreError> {
            match self.flaw {
                Flaw::ExtendByKey => match self.current_lease(&lease.key) {
                    Some(current) => self.inner.extend_lease(&current, ttl).await,
                    None => Ok(None),
                },
                Flaw::ExtendDoesNothing => {
                    let mut claimed = lease.clone();
                    claimed.expires_at = time::OffsetDateTime::now_utc() + ttl;
                    Ok(Some(claimed))
                }
                Flaw::ExpiredTokenDropped if self.expired(&lease.key, &lease.token) => Ok(None),
                _ => self.inner.extend_lease(lease, ttl).await,
            }
        }

        // The revocation outbox is passed through untouched.
        async fn delete_and_enqueue_revocation(
            &self,
            key: &tokenbroker::TokenKey,
            expected: Option<tokenbroker::store::Version>,
            revocation: &tokenbroker::store::PendingRevocation,
        ) -> Result<bool, tokenbroker::StoreError> {
            self.inner
                .delete_and_enqueue_revocation(key, expected, revocation)
                .await
        }
        async fn enqueue_revocation(
            &self,
            revocation: &tokenbroker::store::PendingRevocation,
        ) -> Result<(), tokenbroker::StoreError> {
            self.inner.enqueue_revocation(revocation).await
        }
        async fn claim_revocations(
            &self,
            now: time::OffsetDateTime,
            until: time::OffsetDateTime,
            limit: usize,
        ) -> Result<Vec<tokenbroker::store::PendingRevocation>, tokenbroker::StoreError> {
            self.inner.claim_revocations(now, until, limit).await
        }
        async fn reschedule_revocation(
            &self,
            claimed: &tokenbroker::store::PendingRevocation,
            due_at: time::OffsetDateTime,
        ) -> Result<bool, tokenbroker::StoreError> {
            self.inner.reschedule_revocation(claimed, due_at).await
        }
        async fn remove_revocation(
            &self,
            id: &tokenbroker::store::RevocationId,
        ) -> Result<(), tokenbroker::StoreError> {
            self.inner.remove_revocation(id).await
        }
    }

    async fn suite_panics(flaw: Flaw) -> bool {
        let store = Broken::shared(flaw);
        tokio::spawn(async move { store_conformance::run_all(&store).await })
            .await
            .is_err_and(|e| e.is_panic())
    }

    /// Whether `check` alone panics on a store with `flaw`.
    async fn check_panics<F, Fut>(flaw: Flaw, check: F) -> bool
    where
        F: FnOnce(SharedStore) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        tokio::spawn(check(Broken::shared(flaw)))
            .await
            .is_err_and(|e| e.is_panic())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn every_flaw_is_caught() {
        for flaw in [
            Flaw::CasIgnoresVersion,
            Flaw::VersionsRestart,
            Flaw::ReentrantLease,
            Flaw::ScanRepeats,
            Flaw::ScanSkips,
            Flaw::ScanRestartsOnForeignCursor,
            Flaw::ReleaseByHolder,
            Flaw::FenceIgnored,
            Flaw::ExtendByKey,
            Flaw::ExtendDoesNothing,
            Flaw::ExpiredTokenDropped,
        ] {
            assert!(
                suite_panics(flaw).await,
                "the suite passed a store with {flaw:?}"
            );
        }
    }

    /// Each fencing flaw is caught by the check written for it, not only by some other check
    /// on the way through `run_all`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn fencing_flaws_are_caught_by_their_checks() {
        macro_rules! caught {
            ($flaw:expr, $check:ident) => {
                assert!(
                    check_panics(
                        $flaw,
                        |s| async move { store_conformance::$check(&s).await }
                    )
                    .await,
                    "{} passed a store with {:?}",
                    stringify!($check),
                    $flaw
                );
            };
        }
        caught!(Flaw::ReleaseByHolder, stale_lease_token_is_fenced_out);
        caught!(Flaw::ExtendByKey, stale_lease_token_is_fenced_out);
        caught!(Flaw::FenceIgnored, stale_lease_token_is_fenced_out);
        caught!(Flaw::FenceIgnored, released_lease_token_cannot_write);
        caught!(Flaw::FenceIgnored, fenced_write_with_current_token_succeeds);
        caught!(Flaw::ExtendDoesNothing, extend_lease_moves_expiry);
        caught!(
            Flaw::ExpiredTokenDropped,
            expired_lease_not_taken_over_stays_current
        );
        caught!(Flaw::ScanRepeats, scan_visits_every_link_once);
        caught!(Flaw::ScanSkips, scan_visits_every_link_once);
        caught!(Flaw::ScanRepeats, scan_during_writes_returns_survivors_once);
        caught!(Flaw::ScanSkips, scan_during_writes_returns_survivors_once);
        caught!(
            Flaw::ScanRestartsOnForeignCursor,
            scan_rejects_a_foreign_cursor
        );
    }
}

/// Encryption changes the payload on the way in and out; the contract must still hold.
#[cfg(feature = "encryption")]
mod encrypted_memory {
    use std::sync::Arc;
    use tokenbroker::store::{EncryptedStore, KeyId, StaticKeyring};
    use tokenbroker::{MemoryStore, TokenStore};

    tokenbroker::store_conformance_tests!(async {
        let keyring = StaticKeyring::new(KeyId::new("k1").expect("key id"), [7u8; 32]);
        Arc::new(EncryptedStore::new(MemoryStore::new(), Arc::new(keyring))) as Arc<dyn TokenStore>
    });
}
