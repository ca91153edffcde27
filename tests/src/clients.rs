//! Clients of the lab's Services, and what their answers say.

use std::{
    io::Write,
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{wait_output, wait_within};

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
