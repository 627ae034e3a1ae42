//! The HTTP/1 accept loop: TCP_NODELAY on every connection, connections closed without a
//! response where the simulator asks for it, and a bounded graceful shutdown.
//!
//! `axum::serve` cannot drop a connection mid-request, which is how the real server behaves
//! after a recovered panic, so connections are driven by hyper directly: a service error makes
//! hyper close the socket without writing anything.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, Response};
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::api::DropConnection;
use crate::config::SimConfig;
use crate::sim::Simulator;

/// How long in-flight requests get to finish once shutdown starts; hung requests are cut.
const GRACE: Duration = Duration::from_secs(2);

#[derive(Debug)]
struct Dropped;

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped by the simulator")
    }
}

impl std::error::Error for Dropped {}

#[derive(Clone)]
struct ConnService {
    router: Router,
}

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<Body>;
    type Error = Dropped;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Dropped>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let router = self.router.clone();
        Box::pin(async move {
            let resp = match router.oneshot(req).await {
                Ok(resp) => resp,
                Err(never) => match never {},
            };
            if resp.extensions().get::<DropConnection>().is_some() {
                return Err(Dropped);
            }
            Ok(resp)
        })
    }
}

/// Serves `router` on `listener` until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, router: Router, shutdown: CancellationToken) {
    let tracker = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Usually EMFILE; back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Without this, Nagle plus delayed ACK adds ~40 ms to small responses on loopback.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "set_nodelay failed");
        }
        let service = ConnService { router: router.clone() };
        let token = shutdown.clone();
        tracker.spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                _ = token.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    tokio::time::timeout(GRACE, conn.as_mut()).await.unwrap_or(Ok(()))
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection closed");
            }
        });
    }
    tracker.close();
    let _ = tokio::time::timeout(GRACE, tracker.wait()).await;
}

/// A simulator serving on a local port, stopped when dropped.
#[derive(Debug)]
pub struct SimHandle {
    pub addr: SocketAddr,
    pub sim: Simulator,
    /// Cancel to stop the server (dropping the handle does the same).
    pub shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl SimHandle {
    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting, lets in-flight requests finish (briefly) and waits for the server.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        self.sim.shutdown();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.sim.shutdown();
    }
}

/// Binds `addr` and serves a new simulator there in a background task.
pub async fn spawn_on(addr: SocketAddr, config: SimConfig) -> std::io::Result<SimHandle> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let sim = Simulator::new(config);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(serve(listener, sim.router(), shutdown.clone()));
    Ok(SimHandle { addr, sim, shutdown, task: Some(task) })
}

/// Starts a simulator on `127.0.0.1:0` for a test.
///
/// # Panics
/// If no loopback port can be bound, which leaves a test nothing to do anyway.
pub async fn spawn(config: SimConfig) -> SimHandle {
    let addr = SocketAddr::from(([127, 0, 0, 1], 0));
    match spawn_on(addr, config).await {
        Ok(handle) => handle,
        Err(e) => panic!("arrakis-sim: cannot bind 127.0.0.1:0: {e}"),
    }
}
