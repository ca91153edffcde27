//! Socket-level balancing for the node's own processes, whose packets cross no pod-facing
//! interface: at `connect()` (TCP, and UDP sockets that connect), a frontend destination is
//! replaced by a backend, so the socket talks to the backend directly and no packet needs
//! rewriting. Only sockets of the node's network namespace are touched.

use aya_ebpf::{helpers::bpf_get_netns_cookie, programs::SockAddrContext};
use lb_common::maps::{FlowKey, FrontendKey, SCOPE_INTERNAL};

use crate::{
    conntrack::{config, now_ns},
    maps::FRONTENDS,
    select::select_backend,
    stats::count,
};

/// Let the `connect()` go on (to whichever address it now has).
pub const ALLOW: i32 = 1;
/// Fail it: the frontend has no backend.
pub const REFUSE: i32 = 0;

#[inline(always)]
pub fn connect4(ctx: &SockAddrContext) -> i32 {
    let Some(config) = config() else {
        return ALLOW;
    };
    if unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) } != config.netns_cookie {
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
    let Some(frontend) = (unsafe { FRONTENDS.get(frontend_key) }) else {
        return ALLOW;
    };
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
        return ALLOW;
    };
    addr.user_ip4 = backend.addr_be;
    addr.user_port = u32::from(backend.port_be);
    count(|s| &mut s.socket_connects);
    ALLOW
}
