//! Socket-level balancing for the node's own processes, whose packets cross no pod-facing
//! interface. At `connect()` (TCP, and UDP sockets that connect) and at each `sendmsg()` of an
//! unconnected UDP socket, a frontend destination is replaced by a backend, so the socket talks
//! to the backend directly and no packet needs rewriting; the socket remembers which frontend
//! it dialled (a connected one by its cookie until it is released, an unconnected one by
//! backend), so that `recvmsg()` reports the backend's datagrams as coming from the frontend
//! and `getpeername()` names the frontend, as applications and TLS libraries expect. Only
//! sockets of the node's network namespace are touched: pods are tc's. Both families: an IPv6
//! socket that dials an IPv4-mapped address (`::ffff:10.96.0.10`, as a dual-stack socket
//! reaches an IPv4 Service) is balanced over IPv4's maps, its backend handed back mapped.

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::{SockAddrContext, SockContext},
};
use lb_common::maps::{
    Connected, FRONTEND_SOURCE_RANGES, FlowKey, FrontendKey, Ipv6Be, SCOPE_INTERNAL,
    SocketFrontend, SocketKey,
};

use crate::{
    clock::now_ns,
    family::Family,
    maps::{self, CONNECTED, CONNECTED6},
    select::select_backend,
    stats::count,
};

/// Let the call go on (to whichever address it now has).
pub const ALLOW: i32 = 1;
/// Fail it: the frontend has no backend to give.
pub const REFUSE: i32 = 0;

/// Where a hook's address lies in its `bpf_sock_addr`, and the family it is balanced in.
trait UserAddr {
    type Family: Family;
    fn get(addr: &bpf_sock_addr) -> Self::Family;
    fn set(addr: &mut bpf_sock_addr, value: Self::Family);
}

/// An IPv4 socket's address.
struct Ip4;
/// An IPv6 socket's address.
struct Ip6;
/// An IPv4-mapped address of an IPv6 socket (`::ffff:a.b.c.d`): IPv4's, in its last word.
struct Mapped;

impl UserAddr for Ip4 {
    type Family = u32;
    fn get(addr: &bpf_sock_addr) -> u32 {
        addr.user_ip4
    }
    fn set(addr: &mut bpf_sock_addr, value: u32) {
        addr.user_ip4 = value;
    }
}

/// Word by word: the verifier takes context fields at fixed offsets only, not copied whole.
impl UserAddr for Ip6 {
    type Family = Ipv6Be;
    fn get(addr: &bpf_sock_addr) -> Ipv6Be {
        let words = &addr.user_ip6;
        [words[0], words[1], words[2], words[3]]
    }
    fn set(addr: &mut bpf_sock_addr, value: Ipv6Be) {
        let words = &mut addr.user_ip6;
        (words[0], words[1], words[2], words[3]) = (value[0], value[1], value[2], value[3]);
    }
}

impl UserAddr for Mapped {
    type Family = u32;
    fn get(addr: &bpf_sock_addr) -> u32 {
        addr.user_ip6[3]
    }
    fn set(addr: &mut bpf_sock_addr, value: u32) {
        addr.user_ip6[3] = value;
    }
}

/// Whether an IPv6 hook's address is IPv4-mapped.
#[inline(always)]
fn mapped(ctx: &SockAddrContext) -> bool {
    // SAFETY: the kernel hands a valid bpf_sock_addr for the program's lifetime.
    let addr = unsafe { &*ctx.sock_addr };
    addr.user_ip6[0] == 0 && addr.user_ip6[1] == 0 && addr.user_ip6[2] == 0xffff_u32.to_be()
}

/// A `connect()`: the socket's peer becomes a backend.
#[inline(always)]
pub fn connect4(ctx: &SockAddrContext) -> i32 {
    to_backend::<Ip4>(ctx, Remember::BySocket)
}

/// An IPv6 socket's `connect()`.
#[inline(always)]
pub fn connect6(ctx: &SockAddrContext) -> i32 {
    if mapped(ctx) {
        to_backend::<Mapped>(ctx, Remember::BySocket)
    } else {
        to_backend::<Ip6>(ctx, Remember::BySocket)
    }
}

/// A `sendmsg()` on an unconnected UDP socket: this datagram goes to a backend.
#[inline(always)]
pub fn sendmsg4(ctx: &SockAddrContext) -> i32 {
    to_backend::<Ip4>(ctx, Remember::ByBackend)
}

/// An unconnected IPv6 UDP socket's `sendmsg()`.
#[inline(always)]
pub fn sendmsg6(ctx: &SockAddrContext) -> i32 {
    if mapped(ctx) {
        to_backend::<Mapped>(ctx, Remember::ByBackend)
    } else {
        to_backend::<Ip6>(ctx, Remember::ByBackend)
    }
}

/// A `recvmsg()` or a `getpeername()`: a backend this socket was sent to reads as the
/// frontend it dialled.
#[inline(always)]
pub fn to_frontend4(ctx: &SockAddrContext) -> i32 {
    to_frontend::<Ip4>(ctx)
}

/// An IPv6 socket's `recvmsg()` or `getpeername()`.
#[inline(always)]
pub fn to_frontend6(ctx: &SockAddrContext) -> i32 {
    if mapped(ctx) {
        to_frontend::<Mapped>(ctx)
    } else {
        to_frontend::<Ip6>(ctx)
    }
}

/// A socket is released: what it dialled goes with it.
#[inline(always)]
pub fn released(ctx: &SockContext) -> i32 {
    // Only the node's connected sockets have an entry, in one family's map; for the others (the
    // pods' too), a missing key costs a lookup in each.
    // SAFETY: a helper call on the context the kernel gave.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock.cast()) };
    if CONNECTED.remove(cookie).is_err() {
        let _ = CONNECTED6.remove(cookie);
    }
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
fn to_frontend<U: UserAddr>(ctx: &SockAddrContext) -> i32 {
    if !of_this_node(ctx) {
        return ALLOW;
    }
    // SAFETY: the kernel hands a valid bpf_sock_addr for the program's lifetime.
    let addr = unsafe { &mut *ctx.sock_addr };
    let (backend_addr_be, backend_port_be) = (U::get(addr), addr.user_port as u16);
    // SAFETY: a helper call on the context the kernel gave.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // A connected socket may have been connected elsewhere since: only its backend reads as
    // the frontend.
    if let Some(connected) = maps::connected::<U::Family>(cookie)
        && (connected.backend_addr_be, connected.backend_port_be)
            == (backend_addr_be, backend_port_be)
    {
        U::set(addr, connected.frontend_addr_be);
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
        U::set(addr, frontend.addr_be);
        addr.user_port = u32::from(frontend.port_be);
    }
    ALLOW
}

#[inline(always)]
fn to_backend<U: UserAddr>(ctx: &SockAddrContext, remember: Remember) -> i32 {
    if !of_this_node(ctx) {
        return ALLOW;
    }
    // SAFETY: the kernel hands a valid bpf_sock_addr for the program's lifetime.
    let addr = unsafe { &mut *ctx.sock_addr };
    let frontend_addr = U::get(addr);
    // `user_port` holds the port in network order in its low 16 bits.
    let port_be = addr.user_port as u16;
    let frontend_key = FrontendKey {
        addr_be: frontend_addr,
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
            .and_then(U::Family::snat_addr)
            .is_some_and(|node| maps::source_allowed(frontend.service_id, node))
    {
        count(|s| &mut s.dropped_source_range);
        return REFUSE;
    }
    if frontend.backend_count == 0 {
        return REFUSE;
    }
    // The source is not chosen yet: affinity and source hash see the node as one client.
    let key = FlowKey {
        src_addr_be: U::Family::default(),
        dst_addr_be: frontend_addr,
        src_port_be: 0,
        dst_port_be: port_be,
        protocol: frontend_key.protocol,
        _pad: [0; 3],
    };
    let Some((_, backend)) = select_backend(frontend, &key, now_ns(), false) else {
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
                frontend_addr_be: frontend_addr,
                backend_addr_be: backend.addr_be,
                frontend_port_be: port_be,
                backend_port_be: backend.port_be,
            };
            let _ = U::Family::connected().insert(cookie, connected, 0);
        }
        Remember::ByBackend => {
            let socket = SocketKey {
                cookie,
                backend_addr_be: backend.addr_be,
                backend_port_be: backend.port_be,
                _pad: 0,
            };
            let frontend = SocketFrontend {
                addr_be: frontend_addr,
                port_be,
                _pad: 0,
            };
            let _ = U::Family::sockets().insert(socket, frontend, 0);
        }
    }
    U::set(addr, backend.addr_be);
    addr.user_port = u32::from(backend.port_be);
    count(|s| &mut s.socket_rewrites);
    ALLOW
}
