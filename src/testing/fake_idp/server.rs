//! The HTTP side of the fake: its routes, the serving task, and a listener whose connections a
//! handler can kill.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::connect_info::Connected;
use axum::routing::{get, post};
use axum::serve::{IncomingStream, Listener};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::authorize::authorize_handler;
use super::discovery::{discovery_handler, tenant_discovery_handler};
use super::keys::jwks_handler;
use super::modes::{tenant_authorize_handler, tenant_token_handler, user_handler};
use super::par::par_handler;
use super::state::Shared;
use super::token_endpoints::{introspect_handler, revoke_handler, token_handler};

/// Serves `shared` on `listener` until the returned sender fires or is dropped.
pub(super) fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
) -> (oneshot::Sender<()>, JoinHandle<()>) {
    let router = Router::new()
        .route("/authorize", get(authorize_handler))
        .route("/token", post(token_handler))
        .route("/revoke", post(revoke_handler))
        .route("/introspect", post(introspect_handler))
        .route("/par", post(par_handler))
        .route("/.well-known/openid-configuration", get(discovery_handler))
        .route("/jwks", get(jwks_handler))
        // Microsoft's tenant-scoped paths; they answer 404 in the other flavors.
        .route(
            "/{tenant}/v2.0/.well-known/openid-configuration",
            get(tenant_discovery_handler),
        )
        .route(
            "/{tenant}/oauth2/v2.0/authorize",
            get(tenant_authorize_handler),
        )
        .route("/{tenant}/oauth2/v2.0/token", post(tenant_token_handler))
        // Where the Google and Microsoft presets look for keys and send the browser, so a
        // preset rebased onto the fake (`with_base_url`) finds them.
        .route("/{tenant}/discovery/v2.0/keys", get(jwks_handler))
        .route("/oauth2/v3/certs", get(jwks_handler))
        .route("/o/oauth2/v2/auth", get(authorize_handler))
        .route("/login/oauth/authorize", get(authorize_handler))
        .route("/login/oauth/access_token", post(token_handler))
        // GitHub's API `/user`, where the GitHub preset asks whose tokens a login brought.
        .route("/user", get(user_handler))
        .with_state(shared);
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        // Errors of the accept loop are retried inside `Listener::accept`; `serve` only
        // returns on shutdown.
        let _ = axum::serve(
            KillableListener(listener),
            router.into_make_service_with_connect_info::<ConnTag>(),
        )
        .with_graceful_shutdown(async move {
            // Resolves on `shutdown()` or when the sender is dropped with the last clone.
            let _ = rx.await;
        })
        .await;
    });
    (tx, task)
}

struct KillableListener(TcpListener);

/// Connection info handed to handlers: the peer address and the connection's kill switch.
#[derive(Clone, Debug)]
pub(super) struct ConnTag {
    // Only read through `Debug` (axum logs it).
    #[allow(dead_code)]
    pub(super) peer: SocketAddr,
    pub(super) kill: Arc<AtomicBool>,
}

impl Listener for KillableListener {
    type Io = KillableStream;
    type Addr = ConnTag;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.0.accept().await {
                Ok((stream, peer)) => {
                    let kill = Arc::new(AtomicBool::new(false));
                    let io = KillableStream {
                        inner: stream,
                        kill: Arc::clone(&kill),
                    };
                    return (io, ConnTag { peer, kill });
                }
                // E.g. too many open files: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(ConnTag {
            peer: self.0.local_addr()?,
            kill: Arc::new(AtomicBool::new(false)),
        })
    }
}

impl Connected<IncomingStream<'_, KillableListener>> for ConnTag {
    fn connect_info(stream: IncomingStream<'_, KillableListener>) -> Self {
        stream.remote_addr().clone()
    }
}

struct KillableStream {
    inner: TcpStream,
    kill: Arc<AtomicBool>,
}

impl KillableStream {
    fn killed(&self) -> bool {
        self.kill.load(Ordering::SeqCst)
    }
}

fn killed_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "fake IdP dropped the connection",
    )
}

impl AsyncRead for KillableStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.killed() {
            return Poll::Ready(Err(killed_error()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for KillableStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.killed() {
            return Poll::Ready(Err(killed_error()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.killed() {
            return Poll::Ready(Err(killed_error()));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
