//! A pod's server for the lab, like the `demoapp` of Kubernetes training material: every answer
//! names the pod, its address and the client's address as the pod saw it.
//!
//! - HTTP on 8080: one answer per request, then the connection closes; a request's body is
//!   read whole first, and its length answered (`received=N`), for uploads.
//! - TCP on 9000: answers each line, for long-lived connections; after answering `close`, closes
//!   the connection (a server ending its connections as it terminates).
//! - UDP on 5353: answers each datagram; one that reads `size=N` gets an answer of N bytes
//!   (padded with dots), as a resolver's large answer.
//!
//! Prints `ready` once all three listen.

use std::{
    env,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    thread,
    time::Duration,
};

const HTTP_PORT: u16 = 8080;
const ECHO_PORT: u16 = 9000;
const UDP_PORT: u16 = 5353;
const MAX_REQUEST: usize = 8192;
/// The largest UDP answer: what fits one IPv4 datagram.
const MAX_ANSWER: usize = 65_507;

fn main() -> std::io::Result<()> {
    let name = env::args().nth(1).expect("usage: demoapp POD-NAME");
    // Both families on one socket each (IPv4 as mapped addresses, named back as IPv4).
    let http = TcpListener::bind(("::", HTTP_PORT))?;
    let echo = TcpListener::bind(("::", ECHO_PORT))?;
    let udp = UdpSocket::bind(("::", UDP_PORT))?;

    let pod = name.clone();
    thread::spawn(move || serve(&http, &pod, answer_http));
    let pod = name.clone();
    thread::spawn(move || serve(&echo, &pod, answer_lines));
    println!("ready");
    let mut buf = vec![0u8; 65_536];
    loop {
        // A datagram that cannot be answered is the client's loss, not the server's end.
        let Ok((len, peer)) = udp.recv_from(&mut buf) else {
            continue;
        };
        let client = canonical(peer);
        let mut answer = format!("pod={name} client={client} received={len}\n").into_bytes();
        if let Some(size) = std::str::from_utf8(&buf[..len])
            .ok()
            .and_then(|query| query.trim().strip_prefix("size="))
            .and_then(|size| size.parse::<usize>().ok())
        {
            answer.resize(size.clamp(answer.len(), MAX_ANSWER), b'.');
        }
        // An unconnected socket does not know which of its addresses the datagram reached.
        let _ = udp.send_to(&answer, peer);
    }
}

fn identity(pod: &str, local: SocketAddr, peer: SocketAddr) -> String {
    format!(
        "pod={pod} ip={} client={}\n",
        local.ip().to_canonical(),
        canonical(peer)
    )
}

/// `address`, an IPv4 one as IPv4 rather than as a mapped IPv6 address.
fn canonical(address: SocketAddr) -> SocketAddr {
    SocketAddr::new(address.ip().to_canonical(), address.port())
}

fn serve(listener: &TcpListener, pod: &str, answer: fn(TcpStream, &str) -> std::io::Result<()>) {
    for stream in listener.incoming().flatten() {
        let pod = pod.to_string();
        thread::spawn(move || answer(stream, &pod));
    }
}

fn answer_http(mut stream: TcpStream, pod: &str) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < MAX_REQUEST {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        request.extend_from_slice(&buf[..n]);
    }
    let mut body = identity(pod, stream.local_addr()?, stream.peer_addr()?);
    let head_len = request
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(request.len(), |at| at + 4);
    if let Some(length) = content_length(&request[..head_len]) {
        let mut received = request.len() - head_len;
        while received < length {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                break;
            }
            received += n;
        }
        body = format!("{} received={received}\n", body.trim_end());
    }
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// A request head's `Content-Length`, if it has one.
fn content_length(head: &[u8]) -> Option<usize> {
    String::from_utf8_lossy(head).lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        if name.eq_ignore_ascii_case("content-length") {
            value.trim().parse().ok()
        } else {
            None
        }
    })
}

fn answer_lines(stream: TcpStream, pod: &str) -> std::io::Result<()> {
    let who = identity(pod, stream.local_addr()?, stream.peer_addr()?);
    let mut writer = stream.try_clone()?;
    for line in BufReader::new(stream).lines() {
        let line = line?;
        writer.write_all(format!("{line} {who}").as_bytes())?;
        if line == "close" {
            break;
        }
    }
    Ok(())
}
