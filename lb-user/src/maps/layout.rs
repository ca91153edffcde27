//! The plan's entries in the datapath's layout: each family's keys and values for its own maps,
//! addresses and ports in network order, and back.

use std::net::IpAddr;

use lb_common::{
    addr::{ipv4_be, ipv4_from_be, ipv6_be, ipv6_from_be},
    maps::{self as kernel, Ipv6Be},
};

use crate::plan::{Backend, FrontendKey, RangeKey};

/// An address of the datapath's: `u32` for IPv4, [`Ipv6Be`] for IPv6.
pub trait Address: Copy {
    fn ip(self) -> IpAddr;
}

impl Address for u32 {
    fn ip(self) -> IpAddr {
        ipv4_from_be(self).into()
    }
}

impl Address for Ipv6Be {
    fn ip(self) -> IpAddr {
        ipv6_from_be(self).into()
    }
}

/// One value or key in each family's layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ByFamily<V4, V6> {
    V4(V4),
    V6(V6),
}

pub type KernelFrontendKey = ByFamily<kernel::FrontendKey, kernel::FrontendKey<Ipv6Be>>;
pub type KernelBackend = ByFamily<kernel::Backend, kernel::Backend<Ipv6Be>>;
pub type KernelRangeKey = ByFamily<kernel::SourceRangeKey, kernel::SourceRangeKey<Ipv6Be>>;

pub fn address(ip: IpAddr) -> ByFamily<u32, Ipv6Be> {
    match ip {
        IpAddr::V4(v4) => ByFamily::V4(ipv4_be(v4)),
        IpAddr::V6(v6) => ByFamily::V6(ipv6_be(v6)),
    }
}

pub fn frontend_key(key: &FrontendKey) -> KernelFrontendKey {
    fn of<A>(addr_be: A, key: &FrontendKey) -> kernel::FrontendKey<A> {
        kernel::FrontendKey {
            addr_be,
            port_be: key.port.to_be(),
            protocol: key.protocol,
            scope: key.scope,
        }
    }
    match address(key.address) {
        ByFamily::V4(addr_be) => ByFamily::V4(of(addr_be, key)),
        ByFamily::V6(addr_be) => ByFamily::V6(of(addr_be, key)),
    }
}

pub fn plan_frontend_key<A: Address>(key: &kernel::FrontendKey<A>) -> FrontendKey {
    FrontendKey {
        address: key.addr_be.ip(),
        port: u16::from_be(key.port_be),
        protocol: key.protocol,
        scope: key.scope,
    }
}

pub fn backend(backend: &Backend) -> KernelBackend {
    fn of<A>(addr_be: A, backend: &Backend) -> kernel::Backend<A> {
        kernel::Backend {
            addr_be,
            port_be: backend.port.to_be(),
            protocol: backend.protocol,
            flags: backend.flags,
        }
    }
    match address(backend.address) {
        ByFamily::V4(addr_be) => ByFamily::V4(of(addr_be, backend)),
        ByFamily::V6(addr_be) => ByFamily::V6(of(addr_be, backend)),
    }
}

pub fn plan_backend<A: Address>(backend: &kernel::Backend<A>) -> Backend {
    Backend {
        address: backend.addr_be.ip(),
        port: u16::from_be(backend.port_be),
        protocol: backend.protocol,
        flags: backend.flags,
    }
}

/// The trie key of a source range, and its prefix length: the service id's bits, then the
/// range's.
pub fn range_key(key: &RangeKey) -> (u32, KernelRangeKey) {
    let prefix_len = kernel::SOURCE_RANGE_ID_BITS + u32::from(key.prefix_len);
    let service_id = key.service_id;
    let data = match address(key.address) {
        ByFamily::V4(addr_be) => ByFamily::V4(kernel::SourceRangeKey {
            service_id,
            addr_be,
        }),
        ByFamily::V6(addr_be) => ByFamily::V6(kernel::SourceRangeKey {
            service_id,
            addr_be,
        }),
    };
    (prefix_len, data)
}

pub fn plan_range_key<A: Address>(prefix_len: u32, data: &kernel::SourceRangeKey<A>) -> RangeKey {
    RangeKey {
        service_id: data.service_id,
        prefix_len: u8::try_from(prefix_len.saturating_sub(kernel::SOURCE_RANGE_ID_BITS))
            .unwrap_or(u8::MAX),
        address: data.addr_be.ip(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use lb_common::maps::{BACKEND_LOCAL, PROTO_TCP, PROTO_UDP, SCOPE_EXTERNAL, SCOPE_INTERNAL};

    use super::*;

    fn bytes<T>(value: &T) -> &[u8] {
        // SAFETY: the map types are repr(C) integers with explicit padding.
        unsafe { std::slice::from_raw_parts(std::ptr::from_ref::<T>(value).cast(), size_of::<T>()) }
    }

    #[test]
    fn entries_are_encoded_as_the_datapath_reads_them() {
        let v4 = FrontendKey {
            address: Ipv4Addr::new(10, 96, 0, 10).into(),
            port: 80,
            protocol: PROTO_TCP,
            scope: SCOPE_INTERNAL,
        };
        let ByFamily::V4(kernel_v4) = frontend_key(&v4) else {
            panic!("an IPv4 key in the IPv6 layout");
        };
        assert_eq!(
            bytes(&kernel_v4),
            [10, 96, 0, 10, 0, 80, PROTO_TCP, SCOPE_INTERNAL]
        );
        assert_eq!(plan_frontend_key(&kernel_v4), v4);

        let v6 = FrontendKey {
            address: "fd00::10:96:0:10".parse::<Ipv6Addr>().unwrap().into(),
            port: 53,
            protocol: PROTO_UDP,
            scope: SCOPE_EXTERNAL,
        };
        let ByFamily::V6(kernel_v6) = frontend_key(&v6) else {
            panic!("an IPv6 key in the IPv4 layout");
        };
        let mut wanted = vec![0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0x96, 0, 0, 0, 0x10];
        wanted.extend([0, 53, PROTO_UDP, SCOPE_EXTERNAL]);
        assert_eq!(bytes(&kernel_v6), wanted);
        assert_eq!(plan_frontend_key(&kernel_v6), v6);

        let be = Backend {
            address: Ipv4Addr::new(10, 244, 0, 11).into(),
            port: 8080,
            protocol: PROTO_TCP,
            flags: BACKEND_LOCAL,
        };
        let ByFamily::V4(kernel_be) = backend(&be) else {
            panic!("an IPv4 backend in the IPv6 layout");
        };
        assert_eq!(
            bytes(&kernel_be),
            [10, 244, 0, 11, 0x1f, 0x90, PROTO_TCP, BACKEND_LOCAL]
        );
        assert_eq!(plan_backend(&kernel_be), be);

        let range = RangeKey {
            service_id: 7,
            prefix_len: 64,
            address: "fd00:1::".parse::<Ipv6Addr>().unwrap().into(),
        };
        let (prefix_len, ByFamily::V6(data)) = range_key(&range) else {
            panic!("an IPv6 range in the IPv4 layout");
        };
        assert_eq!(prefix_len, 32 + 64);
        assert_eq!(plan_range_key(prefix_len, &data), range);
    }
}
