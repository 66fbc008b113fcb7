//! Listeners: binds each configured address and accepts connections until the server drains,
//! handing every connection to its own task (`conn::serve`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::conn;
use crate::forward::ConnCtx;
use crate::server::{ListenerRuntime, ServerShared};

/// Accepts until drain starts; the listening socket closes when this returns.
pub async fn accept_loop(tcp: TcpListener, rt: Arc<ListenerRuntime>, server: Arc<ServerShared>) {
    let mut drain = server.drain_rx();
    loop {
        let accepted = tokio::select! {
            r = tcp.accept() => r,
            _ = crate::server::drained(&mut drain) => return,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: back off briefly instead of spinning.
                tracing::warn!(listener = %rt.config.name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let local = stream
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let ls = rt.listener_stats.clone();
        ls.downstream_cx_total.inc();
        ls.downstream_cx_active.inc();
        let cx = Arc::new(ConnCtx {
            listener: rt.clone(),
            server: server.clone(),
            peer,
            local,
        });
        let track = server.track();
        tokio::spawn(async move {
            let _track = track;
            conn::serve(stream, cx).await;
            ls.downstream_cx_active.dec();
            ls.downstream_cx_destroy.inc();
        });
    }
}
