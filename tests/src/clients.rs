//! Clients of the lab's Services, and what their answers say.

use std::{
    io::Write,
    net::IpAddr,
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{output, wait_output, wait_within};

/// Sends one datagram through `socat` (the command, ready to run); the answer.
pub fn udp_query(mut socat: Command) -> Result<String> {
    let mut child = socat
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child.stdin.take().context("stdin")?.write_all(b"query\n")?;
    let out = wait_output(child, Duration::from_secs(10))?;
    ensure!(
        out.status.success(),
        "socat failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// A TCP connection held open by `socat` in the client.
pub struct Connection {
    pub(crate) child: Child,
    pub(crate) stdin: ChildStdin,
    pub(crate) lines: mpsc::Receiver<std::io::Result<String>>,
}

impl Connection {
    /// Sends a line and returns the answer.
    pub fn ask(&mut self, line: &str) -> Result<String> {
        writeln!(self.stdin, "{line}")?;
        self.stdin.flush()?;
        Ok(self
            .lines
            .recv_timeout(Duration::from_secs(5))
            .context("no answer within 5 s")??)
    }
}

impl Connection {
    /// Waits for the server to close the connection: socat sees the end of the stream and
    /// exits cleanly (a reset makes it fail).
    pub fn wait_closed(&mut self) -> Result<()> {
        match self.lines.recv_timeout(Duration::from_secs(5)) {
            Err(mpsc::RecvTimeoutError::Disconnected) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => bail!("still open after 5 s"),
            Ok(line) => bail!("more after the close: {line:?}"),
        }
        let status = wait_within(&mut self.child, Duration::from_secs(5))
            .context("socat still running after the close")?;
        ensure!(
            status.success(),
            "socat failed ({status}): not a clean close"
        );
        Ok(())
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The pod named in a demoapp answer (`pod=NAME ...`).
pub fn pod_of(answer: &str) -> Option<&str> {
    answer
        .split_whitespace()
        .find_map(|w| w.strip_prefix("pod="))
}

/// The client address a demoapp answer reports (`client=IP:PORT`).
pub fn client_of(answer: &str) -> Option<&str> {
    answer
        .split_whitespace()
        .find_map(|w| w.strip_prefix("client="))
}

/// `address` (`host:port`, an IPv6 host in brackets) as Python's socket module takes it: the
/// family's name, the host and the port.
fn python_address(address: &str) -> Option<(&'static str, &str, &str)> {
    let (host, port) = address.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let family = if host.contains(':') {
        "AF_INET6"
    } else {
        "AF_INET"
    };
    Some((family, host, port))
}

/// One datagram of `size` bytes (`query`, padded) from a connected UDP socket to `address`
/// (`host:port`, an IPv6 host in brackets), which takes answers from that address only, as a
/// resolver: the answer's length and its first word (the pod), if one came. `run` makes the
/// command in the sender's namespace.
pub fn udp_exchange(
    run: impl FnOnce(&[&str]) -> Command,
    address: &str,
    query: &str,
    size: usize,
) -> Option<(usize, String)> {
    let (family, host, port) = python_address(address)?;
    let script = format!(
        "import socket\n\
         s = socket.socket(socket.{family}, socket.SOCK_DGRAM)\n\
         s.settimeout(2)\n\
         s.connect(({host:?}, {port}))\n\
         s.send({query:?}.encode().ljust({size}, b' '))\n\
         answer = s.recv(65535)\n\
         print(len(answer), answer.split()[0].decode())\n"
    );
    let out = output(&mut run(&["python3", "-c", &script])).ok()?;
    let (len, pod) = out.trim().split_once(' ')?;
    Some((len.parse().ok()?, pod.to_string()))
}

/// A 3,000-byte UDP datagram from `source`'s port 46000 to `address` (`host:port`, an IPv6
/// host in brackets), sent as three fragments last first (a raw socket, which writes the IP
/// header and, over IPv6, the fragment header: 1,480 or 1,448 bytes of the datagram each, as a
/// 1,500-byte link splits it), and the answer's source (as `address` is written) and pod, if
/// one came. `run` makes the command in the sender's namespace.
pub fn reversed_fragments(
    run: impl FnOnce(&[&str]) -> Command,
    source: IpAddr,
    address: &str,
) -> Option<String> {
    let (family, host, port) = python_address(address)?;
    let script = format!(
        "import socket, struct\n\
         fam, src, dst, sport, dport = socket.{family}, {source:?}, {host:?}, 46000, {port}\n\
         v6 = fam == socket.AF_INET6\n\
         a = lambda x: socket.inet_pton(fam, x)\n\
         def csum(b):\n    b += b'\\0' * (len(b) % 2)\n    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))\n    \
         while s >> 16:\n        s = (s & 0xffff) + (s >> 16)\n    return ~s & 0xffff\n\
         payload = b'hello'.ljust(3000, b' ')\n\
         length = 8 + len(payload)\n\
         pseudo = a(src) + a(dst) + (struct.pack('!IxxxB', length, 17) if v6 else struct.pack('!BBH', 0, 17, length))\n\
         check = csum(pseudo + struct.pack('!HHHH', sport, dport, length, 0) + payload) or 0xffff\n\
         datagram = struct.pack('!HHHH', sport, dport, length, check) + payload\n\
         rx = socket.socket(fam, socket.SOCK_DGRAM)\n\
         rx.bind(('::' if v6 else '0.0.0.0', sport))\n\
         rx.settimeout(2)\n\
         raw = socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_RAW)\n\
         size = 1448 if v6 else 1480\n\
         pieces = [datagram[i:i + size] for i in range(0, len(datagram), size)]\n\
         def header(i, p):\n    more = int(i < len(pieces) - 1)\n    \
         if v6:\n        return struct.pack('!IHBB16s16sBBHI', 0x60000000, 8 + len(p), 44, 64, a(src), a(dst), \
         17, 0, i * size // 8 << 3 | more, 0x77777777)\n    \
         return struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(p), 0x7777, more << 13 | i * size // 8, \
         64, 17, 0, a(src), a(dst))\n\
         for i, p in reversed(list(enumerate(pieces))):\n    raw.sendto(header(i, p) + p, (dst, 0))\n\
         data, peer = rx.recvfrom(65535)\n\
         print(('[%s]:%d' if v6 else '%s:%d') % peer[:2], data.split()[0].decode())\n",
        source = source.to_string(),
    );
    output(&mut run(&["python3", "-c", &script]))
        .ok()
        .map(|answer| answer.trim().to_string())
}

/// The size of an [`upload`].
pub const UPLOAD: usize = 1 << 20;

/// A 1 MiB POST to `url`: what the server says it received, if it answered. `run` makes the
/// command in the sender's namespace.
pub fn upload(run: impl FnOnce(&[&str]) -> Command, url: &str) -> Option<String> {
    let script = format!(
        "import urllib.request\n\
         req = urllib.request.Request({url:?}, data=b'x' * {UPLOAD}, method='POST')\n\
         print(urllib.request.urlopen(req, timeout=8).read().decode().strip())\n"
    );
    let answer = output(&mut run(&["python3", "-c", &script])).ok()?;
    answer
        .split_whitespace()
        .find_map(|w| w.strip_prefix("received="))
        .map(str::to_string)
}

/// Two UDP datagrams of 1,400 bytes (1,420 over IPv6) with DF to `address` (`host:port`, an IPv6 host in brackets)
/// from a connected socket, a moment apart: how the second send went (`EMSGSIZE` once an ICMP
/// error taught the socket the path's MTU), or why the script failed. `run` makes the command
/// in the sender's namespace.
pub fn df_datagrams(run: impl FnOnce(&[&str]) -> Command, address: &str) -> String {
    let Some((family, host, port)) = python_address(address) else {
        return format!("{address:?} has no port");
    };
    // IP_MTU_DISCOVER and IPV6_MTU_DISCOVER, each set to "do" (2): Python names none of them.
    let (level, option) = if family == "AF_INET6" {
        ("IPPROTO_IPV6", 23)
    } else {
        ("IPPROTO_IP", 10)
    };
    let script = format!(
        "import errno, socket, time\n\
         s = socket.socket(socket.{family}, socket.SOCK_DGRAM)\n\
         s.setsockopt(socket.{level}, {option}, 2)\n\
         s.connect(({host:?}, {port}))\n\
         s.send(b'x' * 1372)\n\
         time.sleep(0.5)\n\
         try:\n    s.send(b'x' * 1372)\n    print('sent')\n\
         except OSError as e:\n    print(errno.errorcode[e.errno])\n"
    );
    output(&mut run(&["python3", "-c", &script])).map_or_else(
        |e| format!("the DF datagrams to {address}: {e:#}"),
        |out| out.trim().to_string(),
    )
}

/// The dump's lines of counters, after the map entries.
pub const COUNTER_LINES: [&str; 3] = ["STATS: ", "EPOCH: ", "FLOWS: "];

/// A counter from one of an `lb-user dump`'s [`COUNTER_LINES`].
pub fn stat(dump: &str, name: &str) -> u64 {
    dump.lines()
        .filter_map(|l| COUNTER_LINES.iter().find_map(|p| l.strip_prefix(p)))
        .flat_map(str::split_whitespace)
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in dump:\n{dump}"))
}
