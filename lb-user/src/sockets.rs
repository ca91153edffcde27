//! The node's own connected UDP sockets whose backend is gone. The socket hooks translate a
//! connected socket's destination once, at `connect()`: from then on the kernel holds the
//! backend as the socket's peer (its route, the 4-tuple its answers are matched by), and no hook
//! sees its datagrams again, so no sync can move it. As Cilium does since its socket load
//! balancer learned to (`bpf_sock_destroy`), the agent resets such a socket once its backend
//! no longer serves: the application's next call on it fails (`ECONNABORTED` from a receive,
//! `EDESTADDRREQ` from a send), as a TCP application meets a reset, and its next `connect()`
//! reaches a live backend. TCP sockets are left alone: their connections stay on their
//! backend, as the datapath's flows do.
//!
//! Sockets are found and reset with `sock_diag`, as `ss -K` does (`NETLINK_SOCK_DIAG`:
//! `SOCK_DIAG_BY_FAMILY`, then `SOCK_DESTROY`; the kernel's `CONFIG_INET_DIAG_DESTROY`, and
//! `CAP_NET_ADMIN`), for each family: an IPv6 socket that dialled an IPv4-mapped address holds
//! its backend mapped (`::ffff:10.244.0.11`), and is IPv4's in the maps.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use lb_common::maps::PROTO_UDP;

use crate::{maps::KernelMaps, plan::MapEntries};

/// `linux/sock_diag.h`.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
/// A connected UDP socket's state, as `sock_diag` reports it.
const TCP_ESTABLISHED: u8 = 1;
const NLMSG_HEADER: usize = 16;
/// `struct inet_diag_sockid`: ports, addresses (16 bytes each, IPv4's in the first 4),
/// interface, cookie.
const SOCKID_LEN: usize = 48;
/// `struct inet_diag_req_v2`: family, protocol, extensions, padding, states, the socket id.
const REQUEST_LEN: usize = 8 + SOCKID_LEN;
/// `struct inet_diag_msg` up to the socket id's end: what is read of each.
const MESSAGE_LEN: usize = 4 + SOCKID_LEN;

/// A connected UDP socket of the node, as `sock_diag` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectedSocket {
    pub local: SocketAddr,
    pub peer: SocketAddr,
    /// `bpf_get_socket_cookie`'s value for it.
    pub cookie: u64,
    /// The kernel's `inet_diag_sockid`, which names it to `SOCK_DESTROY`.
    id: [u8; SOCKID_LEN],
}

/// Why the node's sockets could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening a sock_diag socket")]
    Open(#[source] io::Error),
    #[error("listing the node's UDP sockets")]
    List(#[source] io::Error),
}

/// What a pass of [`reset_stale`] did.
#[derive(Debug, Default)]
pub struct Reset {
    /// Sockets reset.
    pub reset: usize,
    /// Sockets that could not be, and why.
    pub failed: Vec<(ConnectedSocket, io::Error)>,
}

/// Resets the node's connected UDP sockets that dialled a frontend and whose backend is no
/// longer in `programmed` (it stopped serving, or left its Service). A socket that fails is
/// reported and the others are still reset; an error only when the sockets cannot be listed.
pub fn reset_stale(maps: &KernelMaps, programmed: &MapEntries) -> Result<Reset, Error> {
    let netlink = Netlink::open().map_err(Error::Open)?;
    let sockets = netlink.connected_udp().map_err(Error::List)?;
    let stale = stale(&sockets, programmed, |socket| {
        maps.dialled_backend(socket.cookie)
    });
    let mut done = Reset::default();
    for socket in stale {
        match netlink.destroy(socket) {
            Ok(()) => done.reset += 1,
            // Closed meanwhile: nothing left to reset.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => done.failed.push((socket.clone(), e)),
        }
    }
    Ok(done)
}

/// Of `sockets`, those that `dialled` a frontend, were given their peer as its backend, and
/// whose peer is no UDP backend `programmed`.
fn stale<'a>(
    sockets: &'a [ConnectedSocket],
    programmed: &MapEntries,
    dialled: impl Fn(&ConnectedSocket) -> Option<SocketAddr>,
) -> Vec<&'a ConnectedSocket> {
    let live: std::collections::HashSet<SocketAddr> = programmed
        .backends
        .values()
        .filter(|b| b.protocol == PROTO_UDP)
        .map(|b| SocketAddr::new(b.address, b.port))
        .collect();
    sockets
        .iter()
        .filter(|s| {
            // A mapped peer is the IPv4 backend it stands for.
            let peer = SocketAddr::new(s.peer.ip().to_canonical(), s.peer.port());
            !live.contains(&peer) && dialled(s) == Some(peer)
        })
        .collect()
}

/// A `NETLINK_SOCK_DIAG` socket.
struct Netlink(OwnedFd);

impl Netlink {
    fn open() -> io::Result<Self> {
        // SAFETY: socket(2) has no memory arguments; a valid descriptor is owned from here on.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// The namespace's connected UDP sockets, of both families.
    fn connected_udp(&self) -> io::Result<Vec<ConnectedSocket>> {
        let mut sockets = self.connected_udp_of(libc::AF_INET)?;
        sockets.extend(self.connected_udp_of(libc::AF_INET6)?);
        Ok(sockets)
    }

    fn connected_udp_of(&self, family: i32) -> io::Result<Vec<ConnectedSocket>> {
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
        self.send(
            SOCK_DIAG_BY_FAMILY,
            flags,
            &request(family, 1 << TCP_ESTABLISHED, &[0; SOCKID_LEN]),
        )?;
        let mut sockets = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = self.recv(&mut buf)?;
            for message in messages(&buf[..n]) {
                match message? {
                    Message::Done => return Ok(sockets),
                    Message::Error(0) => {}
                    Message::Error(errno) => return Err(io::Error::from_raw_os_error(errno)),
                    Message::Diag(payload) => sockets.extend(connected_socket(payload)),
                }
            }
        }
    }

    fn destroy(&self, socket: &ConnectedSocket) -> io::Result<()> {
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
        let family = if socket.local.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        self.send(SOCK_DESTROY, flags, &request(family, u32::MAX, &socket.id))?;
        let mut buf = vec![0u8; 4096];
        let n = self.recv(&mut buf)?;
        for message in messages(&buf[..n]) {
            if let Message::Error(errno) = message? {
                return match errno {
                    0 => Ok(()),
                    errno => Err(io::Error::from_raw_os_error(errno)),
                };
            }
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "no acknowledgement",
        ))
    }

    fn send(&self, kind: u16, flags: u16, payload: &[u8]) -> io::Result<()> {
        let len = NLMSG_HEADER + payload.len();
        let mut message = Vec::with_capacity(len);
        message.extend_from_slice(&u32::try_from(len).expect("small").to_ne_bytes());
        message.extend_from_slice(&kind.to_ne_bytes());
        message.extend_from_slice(&flags.to_ne_bytes());
        message.extend_from_slice(&1u32.to_ne_bytes()); // sequence
        message.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
        message.extend_from_slice(payload);
        // SAFETY: the buffer is valid for its length; a netlink socket sends to the kernel
        // without an address.
        let sent = unsafe {
            libc::send(
                self.0.as_raw_fd(),
                message.as_ptr().cast(),
                message.len(),
                0,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: the buffer is valid and writable for its length.
        let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
}

/// An `inet_diag_req_v2` for UDP sockets of `family` in `states`, naming the socket `id`.
fn request(family: i32, states: u32, id: &[u8; SOCKID_LEN]) -> Vec<u8> {
    let mut request = Vec::with_capacity(REQUEST_LEN);
    request.extend_from_slice(&[family as u8, libc::IPPROTO_UDP as u8, 0, 0]);
    request.extend_from_slice(&states.to_ne_bytes());
    request.extend_from_slice(id);
    request
}

/// A netlink message `sock_diag` answers with.
#[derive(Debug, PartialEq, Eq)]
enum Message<'a> {
    /// An `inet_diag_msg`.
    Diag(&'a [u8]),
    /// An error, or with 0 an acknowledgement (positive errno).
    Error(i32),
    Done,
}

/// The netlink messages in `buf`, as the kernel lays them: each a header and a payload,
/// aligned to 4 bytes.
fn messages(buf: &[u8]) -> impl Iterator<Item = io::Result<Message<'_>>> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.len() < NLMSG_HEADER {
            return None;
        }
        let len = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes(rest[4..6].try_into().expect("2 bytes"));
        if len < NLMSG_HEADER || len > rest.len() {
            rest = &[];
            return Some(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a netlink message of {len} bytes in {} left", rest.len()),
            )));
        }
        let payload = &rest[NLMSG_HEADER..len];
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        Some(Ok(match i32::from(kind) {
            libc::NLMSG_DONE => Message::Done,
            libc::NLMSG_ERROR if payload.len() >= 4 => Message::Error(-i32::from_ne_bytes(
                payload[0..4].try_into().expect("4 bytes"),
            )),
            _ => Message::Diag(payload),
        }))
    })
}

/// The connected socket an `inet_diag_msg` reports, if it is one.
fn connected_socket(message: &[u8]) -> Option<ConnectedSocket> {
    let family = i32::from(*message.first()?);
    if message.len() < MESSAGE_LEN
        || (family != libc::AF_INET && family != libc::AF_INET6)
        || message[1] != TCP_ESTABLISHED
    {
        return None;
    }
    let id: [u8; SOCKID_LEN] = message[4..MESSAGE_LEN].try_into().expect("the id's length");
    let port = |at: usize| u16::from_be_bytes([id[at], id[at + 1]]);
    let address = |at: usize| -> IpAddr {
        let octets: [u8; 16] = id[at..at + 16].try_into().expect("16 bytes");
        if family == libc::AF_INET {
            Ipv4Addr::new(octets[0], octets[1], octets[2], octets[3]).into()
        } else {
            Ipv6Addr::from(octets).into()
        }
    };
    let word = |at: usize| u64::from(u32::from_ne_bytes(id[at..at + 4].try_into().expect("4")));
    Some(ConnectedSocket {
        local: SocketAddr::new(address(4), port(0)),
        peer: SocketAddr::new(address(20), port(2)),
        // idiag_cookie[0] holds the low half.
        cookie: word(40) | word(44) << 32,
        id,
    })
}

#[cfg(test)]
mod tests {
    use lb_common::maps::PROTO_TCP;

    use super::*;
    use crate::plan::Backend;

    /// An `inet_diag_msg` of `state` from port 40000 of `local` to `peer`, cookie `cookie`.
    fn diag(state: u8, local: IpAddr, peer: SocketAddr, cookie: u64) -> Vec<u8> {
        let family = if peer.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        let octets = |address: IpAddr| {
            let mut field = [0; 16];
            match address {
                IpAddr::V4(v4) => field[..4].copy_from_slice(&v4.octets()),
                IpAddr::V6(v6) => field.copy_from_slice(&v6.octets()),
            }
            field
        };
        let mut message = vec![family as u8, state, 0, 0];
        message.extend_from_slice(&40000u16.to_be_bytes());
        message.extend_from_slice(&peer.port().to_be_bytes());
        message.extend_from_slice(&octets(local));
        message.extend_from_slice(&octets(peer.ip()));
        message.extend_from_slice(&0u32.to_ne_bytes()); // interface
        message.extend_from_slice(&(cookie as u32).to_ne_bytes());
        message.extend_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
        message.extend_from_slice(&[0; 20]); // expires, queues, uid, inode
        message
    }

    fn netlink(kind: u16, payload: &[u8]) -> Vec<u8> {
        let len = NLMSG_HEADER + payload.len();
        let mut message = Vec::new();
        message.extend_from_slice(&(len as u32).to_ne_bytes());
        message.extend_from_slice(&kind.to_ne_bytes());
        message.extend_from_slice(&[0; 10]);
        message.extend_from_slice(payload);
        message.resize(len.next_multiple_of(4), 0);
        message
    }

    const NODE: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));

    #[test]
    fn a_dump_reads_as_the_connected_sockets_it_lists() {
        let peer = "10.244.0.11:5353".parse().unwrap();
        let mut dump = netlink(
            SOCK_DIAG_BY_FAMILY,
            &diag(TCP_ESTABLISHED, NODE, peer, 0x1_0000_0002),
        );
        // An unconnected socket (state TCP_CLOSE): not one.
        dump.extend(netlink(SOCK_DIAG_BY_FAMILY, &diag(7, NODE, peer, 3)));
        dump.extend(netlink(libc::NLMSG_DONE as u16, &0i32.to_ne_bytes()));
        let read: Vec<Message> = messages(&dump).map(Result::unwrap).collect();
        assert_eq!(read.len(), 3);
        assert_eq!(read[2], Message::Done);
        let Message::Diag(first) = read[0] else {
            panic!("{read:?}")
        };
        let socket = connected_socket(first).expect("connected");
        assert_eq!(socket.peer, peer);
        assert_eq!(socket.local, "10.0.0.1:40000".parse().unwrap());
        assert_eq!(socket.cookie, 0x1_0000_0002);
        let Message::Diag(second) = read[1] else {
            panic!("{read:?}")
        };
        assert_eq!(connected_socket(second), None);
        // A truncated message is an error, not a panic.
        assert!(messages(&dump[..20]).next().unwrap().is_err());
    }

    #[test]
    fn an_ipv6_socket_reads_with_its_whole_addresses() {
        let peer = "[fd00::10:244:0:11]:5353".parse().unwrap();
        let local = "fd00::10:0:0:1".parse().unwrap();
        let socket = connected_socket(&diag(TCP_ESTABLISHED, local, peer, 9)).expect("connected");
        assert_eq!(socket.peer, peer);
        assert_eq!(socket.local, SocketAddr::new(local, 40000));
        // Another family's message is not a socket's.
        let mut other = diag(TCP_ESTABLISHED, local, peer, 9);
        other[0] = libc::AF_UNIX as u8;
        assert_eq!(connected_socket(&other), None);
    }

    #[test]
    fn stale_sockets_dialled_a_frontend_and_lost_their_backend() {
        let socket = |peer: &str, cookie: u64| {
            let peer: SocketAddr = peer.parse().unwrap();
            let local = if peer.is_ipv4() {
                NODE
            } else {
                "fd00::10:0:0:1".parse().unwrap()
            };
            connected_socket(&diag(TCP_ESTABLISHED, local, peer, cookie)).unwrap()
        };
        let backend = |address: &str, protocol| Backend {
            address: address.parse().unwrap(),
            port: 5353,
            protocol,
            flags: 0,
        };
        let mut programmed = MapEntries::default();
        programmed
            .backends
            .insert(1, backend("10.244.0.11", PROTO_UDP));
        // Only a TCP backend at .12: its UDP one is gone.
        programmed
            .backends
            .insert(2, backend("10.244.0.12", PROTO_TCP));
        programmed
            .backends
            .insert(3, backend("fd00::10:244:0:11", PROTO_UDP));
        let sockets = [
            socket("10.244.0.11:5353", 1),          // its backend serves
            socket("10.244.0.12:5353", 2),          // gone
            socket("10.244.0.13:5353", 3), // gone, but dialled directly, not through a frontend
            socket("10.244.0.14:5353", 4), // gone, but connected elsewhere since it dialled
            socket("[fd00::10:244:0:11]:5353", 5), // its IPv6 backend serves
            socket("[fd00::10:244:0:12]:5353", 6), // gone
            socket("[::ffff:10.244.0.12]:5353", 7), // an IPv6 socket's mapped peer, gone
            socket("[::ffff:10.244.0.11]:5353", 8), // mapped, its backend serves
        ];
        // By cookie, the backend each was given when it dialled.
        let given = |cookie: u64| -> Option<SocketAddr> {
            let backend = match cookie {
                1 | 4 | 8 => "10.244.0.11:5353",
                2 | 7 => "10.244.0.12:5353",
                5 => "[fd00::10:244:0:11]:5353",
                6 => "[fd00::10:244:0:12]:5353",
                _ => return None,
            };
            Some(backend.parse().unwrap())
        };
        let stale = stale(&sockets, &programmed, |s| given(s.cookie));
        assert_eq!(stale, [&sockets[1], &sockets[5], &sockets[6]]);
    }
}
