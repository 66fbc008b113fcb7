//! Listeners: accepts connections on a bound address until the listener or the server drains,
//! handing every connection to its own task (`conn::serve`) with the listener generation
//! current at accept time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;

use crate::conn;
use crate::forward::ConnCtx;
use crate::server::{ListenerRuntime, ServerShared};
use crate::stats::ListenerStats;

/// The address every connection accepted on a socket bound to `bound` has, unless it is a
/// wildcard (an IPv4-mapped one, `::ffff:0.0.0.0`, included).
fn one_address(bound: SocketAddr) -> Option<SocketAddr> {
    (!bound.ip().to_canonical().is_unspecified()).then_some(bound)
}

/// Accepts until drain starts; the listening socket closes when this returns (or is aborted,
/// which is how a listener removed by LDS stops accepting). Connections are spawned on the
/// runtime this runs on: with per-core workers, the worker whose socket accepted them.
/// `worker` is that worker's `listener.<address>.worker_<N>.` block (per-core workers only).
pub async fn accept_loop(
    tcp: TcpListener,
    slot: Arc<ArcSwap<ListenerRuntime>>,
    server: Arc<ServerShared>,
    worker: Option<Arc<ListenerStats>>,
) {
    let drain = slot.load().drain_rx();
    // A connection accepted on a socket bound to one address has that local address: asked
    // once here, not with a `getsockname` per connection (one syscall in six of a short
    // connection). Only a wildcard bind leaves it to each connection.
    let bound = tcp.local_addr().ok().and_then(one_address);
    // Accepted sockets inherit TCP_NODELAY from the listening socket on Linux: set once here,
    // it spares a `setsockopt` per connection (one syscall in ten of a short connection).
    let inherits_nodelay =
        cfg!(target_os = "linux") && socket2::SockRef::from(&tcp).set_tcp_nodelay(true).is_ok();
    // HAProxy's `tcp-smart-accept`: with quick ACKs off on the listening socket, which accepted
    // sockets inherit, the kernel does not acknowledge a new connection's first request on its
    // own; the response carries the ACK (or the delayed-ACK timer sends it, 40 ms at most).
    // One segment fewer per short connection, sent and received on this core and the client's.
    #[cfg(target_os = "linux")]
    let _ = socket2::SockRef::from(&tcp).set_tcp_quickack(false);
    // Shared by this socket's connections: a short connection's stream takes a timer already
    // registered with tokio instead of registering a new one, which wakes tokio's driver (an
    // eventfd write) whenever it is earlier than the driver's next wake-up.
    let timers = Arc::new(crate::stream_timer::TimerPool::default());
    // One wait for the whole loop: made anew per accept, it registered with the watch (a lock,
    // a list insert and removal) on every connection.
    let mut drained = Box::pin(crate::server::drained_owned(drain));
    loop {
        let accepted = tokio::select! {
            biased;
            _ = &mut drained => {
                // An update at the same address that replaced the connections' generation
                // drains the old one only: keep accepting for the new one.
                let current = slot.load();
                if *current.drain_rx().borrow() {
                    return;
                }
                drained.set(crate::server::drained_owned(current.drain_rx()));
                continue;
            }
            r = tcp.accept() => r,
        };
        let rt = slot.load_full();
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: back off briefly instead of spinning.
                tracing::warn!(listener = %rt.name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if !inherits_nodelay {
            let _ = stream.set_nodelay(true);
        }
        let local = bound.unwrap_or_else(|| {
            stream
                .local_addr()
                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
        });
        let ls = rt.listener_stats.clone();
        ls.downstream_cx_total.inc();
        ls.downstream_cx_active.inc();
        let ws = worker.clone();
        if let Some(w) = &ws {
            w.downstream_cx_total.inc();
            w.downstream_cx_active.inc();
        }
        let cx = Arc::new(ConnCtx {
            listener: rt,
            server: server.clone(),
            peer,
            local,
            timers: crate::stream_timer::ConnTimers::new(timers.clone()),
            write_stall: Default::default(),
        });
        let track = server.track();
        tokio::spawn(async move {
            let _track = track;
            // Boxed in place: the connection's future is several KB, and spawning copied it
            // whole five times on its way into the task (~1,700 instructions per connection).
            Box::into_pin(crate::boxed(|| conn::serve(stream, cx))).await;
            ls.downstream_cx_active.dec();
            ls.downstream_cx_destroy.inc();
            if let Some(w) = ws {
                w.downstream_cx_active.dec();
                w.downstream_cx_destroy.inc();
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::one_address;

    /// What `accept_loop` counts on: a socket accepted on a listening socket with TCP_NODELAY
    /// has it too.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn accepted_sockets_inherit_tcp_nodelay() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        socket2::SockRef::from(&l).set_tcp_nodelay(true).unwrap();
        let addr = l.local_addr().unwrap();
        let _c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        assert!(s.nodelay().unwrap());
    }

    /// Quick ACKs turned off on the listening socket are off on the sockets it accepts (so the
    /// kernel leaves a new connection's first request for the response to acknowledge).
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn accepted_sockets_inherit_quickack_off() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let _c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        assert!(
            socket2::SockRef::from(&s).tcp_quickack().unwrap(),
            "on by default"
        );
        socket2::SockRef::from(&l).set_tcp_quickack(false).unwrap();
        let _c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        assert!(!socket2::SockRef::from(&s).tcp_quickack().unwrap());
    }

    #[test]
    fn wildcards_leave_the_local_address_to_each_connection() {
        for wild in ["0.0.0.0:80", "[::]:80", "[::ffff:0.0.0.0]:80"] {
            let a = wild.parse().unwrap_or_else(|e| panic!("{wild}: {e}"));
            assert_eq!(one_address(a), None, "{wild}");
        }
        for one in ["127.0.0.1:80", "[::1]:80", "[::ffff:127.0.0.1]:80"] {
            let a = one.parse().unwrap_or_else(|e| panic!("{one}: {e}"));
            assert_eq!(one_address(a), Some(a), "{one}");
        }
    }
}
