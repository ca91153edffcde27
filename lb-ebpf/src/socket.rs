//! Socket-level balancing for the node's own processes, whose packets cross no pod-facing
//! interface. At `connect()` (TCP, and UDP sockets that connect) and at each `sendmsg()` of an
//! unconnected UDP socket, a frontend destination is replaced by a backend, so the socket talks
//! to the backend directly and no packet needs rewriting; the socket remembers which frontend
//! it dialled (a connected one by its cookie until it is released, an unconnected one by
//! backend), so that `recvmsg()` reports the backend's datagrams as coming from the frontend
//! and `getpeername()` names the frontend, as applications and TLS libraries expect. Only
//! sockets of the node's network namespace are touched: pods are tc's.

use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::{SockAddrContext, SockContext},
};
use lb_common::maps::{
    Connected, FRONTEND_SOURCE_RANGES, FlowKey, FrontendKey, SCOPE_INTERNAL, SocketFrontend,
    SocketKey,
};

use crate::{
    clock::now_ns,
    maps::{self, CONNECTED, SOCKETS},
    select::select_backend,
    stats::count,
};

/// Let the call go on (to whichever address it now has).
pub const ALLOW: i32 = 1;
/// Fail it: the frontend has no backend to give.
pub const REFUSE: i32 = 0;

/// A `connect()`: the socket's peer becomes a backend.
#[inline(always)]
pub fn connect4(ctx: &SockAddrContext) -> i32 {
    to_backend(ctx, Remember::BySocket)
}

/// A `sendmsg()` on an unconnected UDP socket: this datagram goes to a backend.
#[inline(always)]
pub fn sendmsg4(ctx: &SockAddrContext) -> i32 {
    to_backend(ctx, Remember::ByBackend)
}

/// A `recvmsg()` or a `getpeername()`: a backend this socket was sent to reads as the
/// frontend it dialled.
#[inline(always)]
pub fn to_frontend(ctx: &SockAddrContext) -> i32 {
    if !of_this_node(ctx) {
        return ALLOW;
    }
    // SAFETY: the kernel hands a valid bpf_sock_addr for the program's lifetime.
    let addr = unsafe { &mut *ctx.sock_addr };
    let (backend_addr_be, backend_port_be) = (addr.user_ip4, addr.user_port as u16);
    // SAFETY: a helper call on the context the kernel gave.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // A connected socket may have been connected elsewhere since: only its backend reads as
    // the frontend.
    if let Some(connected) = maps::connected(cookie)
        && (connected.backend_addr_be, connected.backend_port_be)
            == (backend_addr_be, backend_port_be)
    {
        addr.user_ip4 = connected.frontend_addr_be;
        addr.user_port = u32::from(connected.frontend_port_be);
        return ALLOW;
    }
    let key = SocketKey {
        cookie,
        backend_addr_be,
        backend_port_be,
        _pad: 0,
    };
    if let Some(frontend) = maps::socket_frontend(key) {
        addr.user_ip4 = frontend.addr_be;
        addr.user_port = u32::from(frontend.port_be);
    }
    ALLOW
}

/// A socket is released: what it dialled goes with it.
#[inline(always)]
pub fn released(ctx: &SockContext) -> i32 {
    // Only the node's connected sockets have an entry; for the others (the pods' too), a
    // missing key costs one lookup.
    // SAFETY: a helper call on the context the kernel gave.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock.cast()) };
    let _ = CONNECTED.remove(cookie);
    ALLOW
}

/// Where a socket keeps the frontend it dialled.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Remember {
    /// A connected socket has one peer: by socket, until the socket is released, so that no
    /// other socket's churn evicts a long-lived one's entry.
    BySocket,
    /// An unconnected one sends to many: by backend, in the LRU map.
    ByBackend,
}

#[inline(always)]
fn of_this_node(ctx: &SockAddrContext) -> bool {
    // SAFETY: a helper call on the context the kernel gave.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    maps::config().is_some_and(|config| cookie == config.netns_cookie)
}

#[inline(always)]
fn to_backend(ctx: &SockAddrContext, remember: Remember) -> i32 {
    if !of_this_node(ctx) {
        return ALLOW;
    }
    // SAFETY: the kernel hands a valid bpf_sock_addr for the program's lifetime.
    let addr = unsafe { &mut *ctx.sock_addr };
    // `user_port` holds the port in network order in its low 16 bits.
    let port_be = addr.user_port as u16;
    let frontend_key = FrontendKey {
        addr_be: addr.user_ip4,
        port_be,
        protocol: addr.protocol as u8,
        scope: SCOPE_INTERNAL,
    };
    let Some(frontend) = maps::frontend(frontend_key) else {
        return ALLOW;
    };
    // The source is not chosen yet: the node's own address (kube-proxy's node IP) stands for
    // it before a load-balancer IP's source ranges.
    if frontend.flags & FRONTEND_SOURCE_RANGES != 0
        && !maps::config()
            .is_some_and(|c| maps::source_allowed(frontend.service_id, c.snat_addr_be))
    {
        count(|s| &mut s.dropped_source_range);
        return REFUSE;
    }
    if frontend.backend_count == 0 {
        return REFUSE;
    }
    // The source is not chosen yet: affinity and source hash see the node as one client.
    let key = FlowKey {
        src_addr_be: 0,
        dst_addr_be: addr.user_ip4,
        src_port_be: 0,
        dst_port_be: port_be,
        protocol: frontend_key.protocol,
        _pad: [0; 3],
    };
    let Some((_, backend)) = select_backend(frontend, &key, now_ns()) else {
        return REFUSE;
    };
    // SAFETY: a helper call on the context the kernel gave.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // Without the entry the answer reads as from the backend, which a resolver discards, and
    // getpeername() names the backend: the call still goes on, as a full map is the only way
    // this fails.
    match remember {
        Remember::BySocket => {
            let connected = Connected {
                frontend_addr_be: addr.user_ip4,
                backend_addr_be: backend.addr_be,
                frontend_port_be: port_be,
                backend_port_be: backend.port_be,
            };
            let _ = CONNECTED.insert(cookie, connected, 0);
        }
        Remember::ByBackend => {
            let socket = SocketKey {
                cookie,
                backend_addr_be: backend.addr_be,
                backend_port_be: backend.port_be,
                _pad: 0,
            };
            let frontend = SocketFrontend {
                addr_be: addr.user_ip4,
                port_be,
                _pad: 0,
            };
            let _ = SOCKETS.insert(socket, frontend, 0);
        }
    }
    addr.user_ip4 = backend.addr_be;
    addr.user_port = u32::from(backend.port_be);
    count(|s| &mut s.socket_rewrites);
    ALLOW
}
