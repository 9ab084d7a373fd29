//! A future that finishes even when its caller stops waiting for it.
//!
//! A refresh must never be cut off between the provider's answer and the store write: the
//! provider has already retired the old refresh token, so dropping the new one loses the link.
//! Spawning every refresh as its own task guarantees that, at the price of a task hand-off per
//! refresh (a wake-up of the reader, which on a current-thread runtime is a system call). A
//! [`Detached`] future instead runs inside the reader's own task, and only when the reader
//! drops it unfinished is the rest spawned onto the runtime.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// Runs `F` in place; spawns what is left of it if dropped before completion.
pub(crate) struct Detached<F: Future<Output = ()> + Send + 'static> {
    future: Option<Pin<Box<F>>>,
    /// Set while `future` is being polled: a drop that finds it set is the unwinding of a panic
    /// inside the future, which must not be polled again.
    polling: bool,
}

impl<F: Future<Output = ()> + Send + 'static> Detached<F> {
    pub(crate) fn new(future: F) -> Self {
        Detached {
            future: Some(Box::pin(future)),
            polling: false,
        }
    }
}

impl<F: Future<Output = ()> + Send + 'static> Future for Detached<F> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // `Detached` is `Unpin`: the inner future is boxed.
        let this = &mut *self;
        let Some(future) = this.future.as_mut() else {
            return Poll::Ready(());
        };
        this.polling = true;
        let poll = future.as_mut().poll(cx);
        this.polling = false;
        if poll.is_ready() {
            this.future = None;
        }
        poll
    }
}

impl<F: Future<Output = ()> + Send + 'static> Drop for Detached<F> {
    fn drop(&mut self) {
        if self.polling {
            return;
        }
        if let Some(future) = self.future.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(future);
                }
                // No runtime to finish on (it is shutting down): as with a spawned task then.
                Err(_) => {
                    tracing::warn!(target: "tokenbroker", "a refresh was dropped outside a runtime before it finished");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[tokio::test]
    async fn finishes_in_place_or_in_a_task_when_dropped() {
        // In place.
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        Detached::new(async move { d.store(true, Ordering::SeqCst) }).await;
        assert!(done.load(Ordering::SeqCst));

        // Dropped half-way: the rest runs in a task.
        let done = Arc::new(AtomicBool::new(false));
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let d = done.clone();
        let mut detached = Box::pin(Detached::new(async move {
            wait.await.unwrap();
            d.store(true, Ordering::SeqCst);
        }));
        assert!(
            futures_poll_once(detached.as_mut()).is_pending(),
            "waits for the signal"
        );
        drop(detached);
        go.send(()).unwrap();
        for _ in 0..100 {
            if done.load(Ordering::SeqCst) {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("the dropped future did not finish in a task");
    }

    fn futures_poll_once<F: Future>(f: Pin<&mut F>) -> Poll<F::Output> {
        let waker = std::task::Waker::noop();
        f.poll(&mut Context::from_waker(waker))
    }
}
