//! Wakes the agent as soon as a manifest may have changed: inotify on the directories that hold
//! them, so that an edit is synced at once rather than at the next poll. The poll stays, as the
//! fallback for what inotify does not see (network filesystems, a watch limit reached).

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use tokio::io::{Interest, unix::AsyncFd};

/// What makes a file list or a file's content change: a write closed, an entry created,
/// deleted, renamed or touched, the directory itself moved or removed. Not `IN_MODIFY`: a file
/// is read once its writer is done.
const EVENTS: u32 = libc::IN_CLOSE_WRITE
    | libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_ATTRIB
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF;

pub struct Notifier {
    fd: AsyncFd<OwnedFd>,
}

impl Notifier {
    pub fn new() -> io::Result<Self> {
        // SAFETY: a plain syscall; the descriptor it returns is owned from here on.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns; owned by the `AsyncFd`, it
        // stays open and the same until that is dropped.
        let fd = unsafe {
            AsyncFd::register_with_interest(OwnedFd::from_raw_fd(fd), Interest::READABLE)
        }?;
        Ok(Self { fd })
    }

    /// Watches `directories`. Watching one again is harmless (the kernel keeps one watch per
    /// directory), and re-watches one that was removed and made again; one gone meanwhile is
    /// the next change's to find.
    pub fn watch(&mut self, directories: &[PathBuf]) -> io::Result<()> {
        for directory in directories {
            match add_watch(&self.fd, directory) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                result => result?,
            }
        }
        Ok(())
    }

    /// Returns once something changed in a watched directory, having read every event queued.
    pub async fn changed(&mut self) -> io::Result<()> {
        let mut buf = [0u8; 4096];
        loop {
            let mut ready = self.fd.readable().await?;
            if let Ok(read) = ready.try_io(|fd| read_events(fd.get_ref(), &mut buf)) {
                read?;
                // The rest of the burst goes with it.
                while let Ok(Ok(_)) = ready.try_io(|fd| read_events(fd.get_ref(), &mut buf)) {}
                return Ok(());
            }
        }
    }
}

/// Reads queued events into `buf`: which ones does not matter, only that there were some.
fn read_events(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: reads at most `buf.len()` bytes into `buf`.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

fn add_watch(fd: &AsyncFd<OwnedFd>, directory: &Path) -> io::Result<()> {
    let path = CString::new(directory.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: a NUL-terminated path and a valid inotify descriptor.
    let wd = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), EVENTS) };
    if wd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
