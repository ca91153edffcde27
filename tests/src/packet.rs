//! Crafted packets, for the per-packet benchmark and the datapath's packet tests: Ethernet,
//! IPv4 or IPv6 and TCP or UDP, checksums filled in.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_RST: u8 = 0x04;
/// Not a TCP flag: asks [`packet`] for a UDP datagram.
pub const UDP: u8 = 0;

/// Ethernet + IPv4 + TCP (20 bytes, `flags`) or UDP (8 bytes and 12 of payload), checksums
/// filled in.
pub fn packet(flags: u8, src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    let (protocol, mut l4) = segment(flags, sport, dport);
    let mut p = ipv4_frame(protocol, src, dst, l4.len());
    fill_l4_checksum(protocol, &mut l4, pseudo_header(&p));
    p[34..].copy_from_slice(&l4);
    p
}

/// IANA's numbers of the IPv6 extension headers [`packet6_through`] writes.
pub const IPV6_HOP_BY_HOP: u8 = 0;
pub const IPV6_DEST_OPTIONS: u8 = 60;

/// Ethernet + IPv6 + the TCP or UDP of [`packet`], checksums filled in.
pub fn packet6(flags: u8, src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16) -> Vec<u8> {
    packet6_through(&[], flags, src, dst, sport, dport)
}

/// [`packet6`] with an IPv6 extension header of each of `headers` (hop by hop, destination
/// options: 8 bytes each, one `PadN` option) before its datagram.
pub fn packet6_through(
    headers: &[u8],
    flags: u8,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    sport: u16,
    dport: u16,
) -> Vec<u8> {
    let (protocol, mut l4) = segment(flags, sport, dport);
    let mut extensions = Vec::new();
    for (i, _) in headers.iter().enumerate() {
        let next = headers.get(i + 1).copied().unwrap_or(protocol);
        extensions.extend([next, 0, 1, 4, 0, 0, 0, 0]);
    }
    let next_header = headers.first().copied().unwrap_or(protocol);
    let mut p = ipv6_header(next_header, src, dst, extensions.len() + l4.len());
    p.extend(extensions);
    // IPv6's pseudo-header: the addresses, the datagram's length and protocol.
    let pseudo = words(&p[22..54]) + l4.len() as u32 + u32::from(protocol);
    fill_l4_checksum(protocol, &mut l4, pseudo);
    p.extend(l4);
    p
}

/// Ethernet + an IPv6 header (hop limit 64) of `next_header` from `src` to `dst`, announcing
/// `payload_len` bytes after it, which the caller appends.
fn ipv6_header(next_header: u8, src: Ipv6Addr, dst: Ipv6Addr, payload_len: usize) -> Vec<u8> {
    let mut p = vec![0u8; 12];
    p.extend(0x86ddu16.to_be_bytes());
    p.extend([0x60, 0, 0, 0]);
    p.extend((payload_len as u16).to_be_bytes());
    p.extend([next_header, 64]);
    p.extend(src.octets());
    p.extend(dst.octets());
    p
}

/// A TCP segment (20 bytes, `flags`) or a UDP datagram (8 bytes and 12 of payload), its
/// checksum left 0: its protocol and its bytes.
fn segment(flags: u8, sport: u16, dport: u16) -> (u8, Vec<u8>) {
    let udp = flags == UDP;
    let mut l4 = vec![0u8; 20];
    l4[0..2].copy_from_slice(&sport.to_be_bytes());
    l4[2..4].copy_from_slice(&dport.to_be_bytes());
    if udp {
        l4[4..6].copy_from_slice(&20u16.to_be_bytes());
        (17, l4)
    } else {
        l4[4..8].copy_from_slice(&1u32.to_be_bytes());
        l4[12] = 5 << 4;
        l4[13] = flags;
        l4[14..16].copy_from_slice(&64_240u16.to_be_bytes());
        (6, l4)
    }
}

/// Fills in the checksum of `l4`, a [`segment`] of `protocol`, over the pseudo-header's `pseudo`.
fn fill_l4_checksum(protocol: u8, l4: &mut [u8], pseudo: u32) {
    let udp = protocol == 17;
    let checksum_at = if udp { 6 } else { 16 };
    let sum = match checksum(l4, pseudo) {
        // UDP's 0 means "no checksum": a sum of 0 is sent as all ones.
        0 if udp => 0xffff,
        sum => sum,
    };
    l4[checksum_at..checksum_at + 2].copy_from_slice(&sum.to_be_bytes());
}

/// Ethernet + an IPv4 header (no options, TTL 64) of `protocol` from `src` to `dst`, its
/// checksum filled in, and `payload` zero bytes after it.
fn ipv4_frame(protocol: u8, src: Ipv4Addr, dst: Ipv4Addr, payload: usize) -> Vec<u8> {
    let mut p = vec![0u8; 14 + 20 + payload];
    p[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    p[14] = 0x45;
    p[16..18].copy_from_slice(&((20 + payload) as u16).to_be_bytes());
    p[22] = 64;
    p[23] = protocol;
    p[26..30].copy_from_slice(&src.octets());
    p[30..34].copy_from_slice(&dst.octets());
    fill_ip_checksum(&mut p);
    p
}

/// Computes the IPv4 header checksum of `p` (Ethernet + IPv4 without options) anew.
pub fn fill_ip_checksum(p: &mut [u8]) {
    p[24..26].fill(0);
    let sum = checksum(&p[14..34], 0);
    p[24..26].copy_from_slice(&sum.to_be_bytes());
}

pub fn pseudo_header(p: &[u8]) -> u32 {
    words(&p[26..34]) + u32::from(p[23]) + (p.len() as u32 - 34)
}

/// The sum of the 16-bit words of `bytes`, unfolded; an odd last byte is padded with a zero.
fn words(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w.get(1).copied().unwrap_or(0)])))
        .sum()
}

/// The Internet checksum of `bytes` over `sum`.
pub fn checksum(bytes: &[u8], mut sum: u32) -> u16 {
    sum += words(bytes);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Whether the IPv4 and L4 checksums of `p` verify (sum to all ones).
pub fn checksums_valid(p: &[u8]) -> bool {
    p.len() >= 54 && checksum(&p[14..34], 0) == 0 && checksum(&p[34..], pseudo_header(p)) == 0
}

/// Whether the TCP, UDP or ICMPv6 checksum of `p` (Ethernet + IPv6 without extension headers)
/// verifies over IPv6's pseudo-header.
pub fn checksum6_valid(p: &[u8]) -> bool {
    p.len() >= 62
        && checksum(
            &p[54..],
            words(&p[22..54]) + (p.len() as u32 - 54) + u32::from(p[20]),
        ) == 0
}

/// The IPv6 address at byte `at` of `p`.
pub fn addr6(p: &[u8], at: usize) -> Ipv6Addr {
    let octets: [u8; 16] = p[at..at + 16].try_into().expect("16 bytes");
    Ipv6Addr::from(octets)
}

/// The IPv4 address at byte `at` of `p`.
pub fn addr(p: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(p[at], p[at + 1], p[at + 2], p[at + 3])
}

/// The port at byte `at` of `p`.
pub fn port(p: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([p[at], p[at + 1]])
}

/// ICMP's type of "destination unreachable", and its code for "fragmentation needed".
pub const ICMP_UNREACHABLE: u8 = 3;
pub const ICMP_FRAGMENTATION_NEEDED: u8 = 4;
pub const ICMP_PORT_UNREACHABLE: u8 = 3;
pub const ICMP_TIME_EXCEEDED: u8 = 11;

/// Ethernet + IPv4 + an ICMP error of `kind` and `code` from `src` to `dst`, quoting
/// `quoted` (a [`packet`], whose IPv4 datagram it quotes whole, as Linux quotes up to 576
/// bytes), with `mtu` as the next hop's (for "fragmentation needed"); checksums filled in.
pub fn icmp_error(
    kind: u8,
    code: u8,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    mtu: u16,
    quoted: &[u8],
) -> Vec<u8> {
    let quote = &quoted[14..];
    let mut p = ipv4_frame(1, src, dst, 8 + quote.len());
    p[34] = kind;
    p[35] = code;
    p[40..42].copy_from_slice(&mtu.to_be_bytes());
    p[42..].copy_from_slice(quote);
    let icmp_checksum = checksum(&p[34..], 0);
    p[36..38].copy_from_slice(&icmp_checksum.to_be_bytes());
    p
}

/// ICMPv6's types of "destination unreachable", "packet too big" and "time exceeded" (RFC
/// 4443), and the first's code for "port unreachable".
pub const ICMPV6_DEST_UNREACHABLE: u8 = 1;
pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;
pub const ICMPV6_TIME_EXCEEDED: u8 = 3;
pub const ICMPV6_PORT_UNREACHABLE: u8 = 4;

/// Ethernet + IPv6 + an ICMPv6 error of `kind` and `code` from `src` to `dst`, quoting
/// `quoted` (a [`packet6`], its IPv6 datagram whole), with `mtu` as the link's (for "packet
/// too big"); its checksum over IPv6's pseudo-header filled in.
pub fn icmp6_error(
    kind: u8,
    code: u8,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    mtu: u32,
    quoted: &[u8],
) -> Vec<u8> {
    let quote = &quoted[14..];
    let len = 8 + quote.len();
    let mut p = ipv6_header(58, src, dst, len);
    p.extend([kind, code, 0, 0]);
    p.extend(mtu.to_be_bytes());
    p.extend(quote);
    let sum = checksum(&p[54..], words(&p[22..54]) + len as u32 + 58);
    p[56..58].copy_from_slice(&sum.to_be_bytes());
    p
}

/// A [`packet`] (TCP with `flags`, or [`UDP`]) carrying `payload` bytes (a pattern) after its
/// header, checksums filled in: a datagram to split into [`fragments`].
pub fn datagram(
    flags: u8,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    payload: usize,
) -> Vec<u8> {
    let (protocol, mut l4) = carrying(flags, sport, dport, payload);
    let mut p = ipv4_frame(protocol, src, dst, l4.len());
    fill_l4_checksum(protocol, &mut l4, pseudo_header(&p));
    p[34..].copy_from_slice(&l4);
    p
}

/// The IPv6 twin of [`datagram`]: a datagram to split into [`fragments6`].
pub fn datagram6(
    flags: u8,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    sport: u16,
    dport: u16,
    payload: usize,
) -> Vec<u8> {
    let (protocol, mut l4) = carrying(flags, sport, dport, payload);
    let mut p = ipv6_header(protocol, src, dst, l4.len());
    let pseudo = words(&p[22..54]) + l4.len() as u32 + u32::from(protocol);
    fill_l4_checksum(protocol, &mut l4, pseudo);
    p.extend(l4);
    p
}

/// A [`segment`]'s header carrying `payload` bytes (a pattern), its checksum left 0.
fn carrying(flags: u8, sport: u16, dport: u16, payload: usize) -> (u8, Vec<u8>) {
    let (protocol, mut l4) = segment(flags, sport, dport);
    let udp = protocol == 17;
    l4.truncate(if udp { 8 } else { 20 });
    l4.extend((0..payload).map(|i| (i % 251) as u8));
    if udp {
        let len = l4.len() as u16;
        l4[4..6].copy_from_slice(&len.to_be_bytes());
    }
    (protocol, l4)
}

/// `whole` (Ethernet + IPv4 without options) split into IPv4 fragments sharing IP id `id`,
/// each carrying at most `size` bytes of the datagram's payload (a multiple of 8), IPv4
/// checksums filled in.
pub fn fragments(whole: &[u8], id: u16, size: usize) -> Vec<Vec<u8>> {
    assert!(
        size.is_multiple_of(8),
        "fragment payloads are multiples of 8 bytes"
    );
    let payload = &whole[34..];
    let chunks: Vec<&[u8]> = payload.chunks(size).collect();
    let last = chunks.len() - 1;
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, chunk)| {
            let mut p = whole[..34].to_vec();
            p.extend_from_slice(chunk);
            p[16..18].copy_from_slice(&((20 + chunk.len()) as u16).to_be_bytes());
            p[18..20].copy_from_slice(&id.to_be_bytes());
            let more = if i < last { 0x2000 } else { 0 };
            let offset = (i * size / 8) as u16;
            p[20..22].copy_from_slice(&(more | offset).to_be_bytes());
            fill_ip_checksum(&mut p);
            p
        })
        .collect()
}

/// IANA's number of the IPv6 fragment header.
const IPV6_FRAGMENT: u8 = 44;

/// `whole` (Ethernet + IPv6 without extension headers) split into IPv6 fragments of
/// identification `id`, each carrying at most `size` bytes of the datagram (a multiple of 8)
/// after its fragment header.
pub fn fragments6(whole: &[u8], id: u32, size: usize) -> Vec<Vec<u8>> {
    assert!(
        size.is_multiple_of(8),
        "fragment payloads are multiples of 8 bytes"
    );
    let next_header = whole[20];
    let (src, dst) = (addr6(whole, 22), addr6(whole, 38));
    let chunks: Vec<&[u8]> = whole[54..].chunks(size).collect();
    let last = chunks.len() - 1;
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, chunk)| {
            let mut p = ipv6_header(IPV6_FRAGMENT, src, dst, 8 + chunk.len());
            let more = u16::from(i < last);
            let offset = (i * size / 8) as u16;
            p.extend([next_header, 0]);
            p.extend(((offset << 3) | more).to_be_bytes());
            p.extend(id.to_be_bytes());
            p.extend(chunk);
            p
        })
        .collect()
}
