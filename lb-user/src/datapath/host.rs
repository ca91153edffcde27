//! What the datapath asks of the host: bpffs and cgroup v2 mounted, its interfaces, the
//! network namespace's cookie, one agent per instance.

use std::{
    ffi::{CStr, CString},
    fs, io,
    path::{Path, PathBuf},
};

use tracing::info;

use super::error::{Error, Result, at, os};

const CGROUP2_MAGIC: i64 = 0x6367_7270;
/// Where cgroup v2 is mounted: alone, or beside v1 (hybrid).
const CGROUP2_MOUNTS: [&str; 2] = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"];
const BPFFS_MAGIC: i64 = 0xcafe_4a11;

/// Locks the instance's pin directory, so that a second agent on the same instance stops
/// before it touches anything: two would allocate ids each its own way in the same maps.
pub(super) fn lock_instance(pin_dir: &Path) -> Result<fs::File> {
    let dir = fs::File::open(pin_dir).map_err(at("opening", pin_dir))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&dir),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    } != 0
    {
        let error = io::Error::last_os_error();
        if error.kind() == io::ErrorKind::WouldBlock {
            return Err(Error::Locked(pin_dir.to_path_buf()));
        }
        return Err(at("locking", pin_dir)(error));
    }
    Ok(dir)
}

/// The datapath parses Ethernet frames: an L3 device (a tunnel, WireGuard) would be misread.
pub(super) fn ensure_ethernet(interface: &str) -> Result<()> {
    let socket =
        std::net::UdpSocket::bind("127.0.0.1:0").map_err(os("a socket for SIOCGIFHWADDR"))?;
    // SAFETY: ifreq is plain data; the name fits (IFNAMSIZ) and is NUL-terminated by zeroing.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = interface.as_bytes();
    if name.len() >= request.ifr_name.len() {
        return Err(Error::NameTooLong {
            interface: interface.to_string(),
        });
    }
    for (dst, src) in request.ifr_name.iter_mut().zip(name) {
        *dst = *src as libc::c_char;
    }
    let fd = std::os::fd::AsRawFd::as_raw_fd(&socket);
    // SAFETY: a socket this function owns, and an ifreq SIOCGIFHWADDR fills in.
    if unsafe { libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut request) } != 0 {
        return Err(os(format!("{interface}: SIOCGIFHWADDR"))(
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: SIOCGIFHWADDR filled in the hardware address member of the union.
    let family = unsafe { request.ifr_ifru.ifru_hwaddr.sa_family };
    if family != libc::ARPHRD_ETHER {
        return Err(Error::NotEthernet {
            interface: interface.to_string(),
            family,
        });
    }
    Ok(())
}

/// The interfaces of this network namespace, `(index, name)`. Asked of the kernel, not read
/// from /sys/class/net, which shows the namespace sysfs was mounted in.
pub(super) fn interfaces() -> Result<Vec<(u32, String)>> {
    // SAFETY: no argument; the list is freed below.
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return Err(os("listing interfaces")(io::Error::last_os_error()));
    }
    let mut names = Vec::new();
    let mut entry = list;
    // SAFETY: if_nameindex returns an array ending with a zeroed entry.
    unsafe {
        while (*entry).if_index != 0 {
            let name = CStr::from_ptr((*entry).if_name)
                .to_string_lossy()
                .into_owned();
            names.push(((*entry).if_index, name));
            entry = entry.add(1);
        }
        libc::if_freenameindex(list);
    }
    Ok(names)
}

/// The cookie of this process's network namespace, which the socket hooks compare with each
/// socket's.
pub fn netns_cookie() -> Result<u64> {
    let socket =
        std::net::UdpSocket::bind("127.0.0.1:0").map_err(os("a socket for the netns cookie"))?;
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket and a buffer of the length given.
    let ret = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if ret != 0 {
        return Err(os("SO_NETNS_COOKIE")(io::Error::last_os_error()));
    }
    Ok(cookie)
}

/// Where cgroup v2 is mounted.
pub fn cgroup2_root() -> Result<PathBuf> {
    CGROUP2_MOUNTS
        .iter()
        .map(PathBuf::from)
        .find(|path| fs_type(path).is_ok_and(|t| t == CGROUP2_MAGIC))
        .ok_or_else(|| Error::NoCgroup2(CGROUP2_MOUNTS.join(" or ")))
}

/// `path` as the C string a system call takes.
fn c_path(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| at("naming", path)(io::Error::new(io::ErrorKind::InvalidInput, e)))
}

fn fs_type(path: &Path) -> Result<i64> {
    let c_path = c_path(path)?;
    // SAFETY: statfs is plain data, valid zeroed; the path is NUL-terminated (CString) and
    // `stat` writable.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(c_path.as_ptr(), &raw mut stat) } != 0 {
        return Err(at("statfs", path)(io::Error::last_os_error()));
    }
    Ok(stat.f_type)
}

/// Mounts bpffs at `bpffs` unless it is there already (it is not at boot on every machine).
pub(super) fn mount_bpffs(bpffs: &Path) -> Result<()> {
    fs::create_dir_all(bpffs).map_err(at("creating", bpffs))?;
    if fs_type(bpffs)? == BPFFS_MAGIC {
        return Ok(());
    }
    let path = c_path(bpffs)?;
    let fstype = c"bpf";
    // SAFETY: NUL-terminated strings that outlive the call, no data.
    if unsafe {
        libc::mount(
            fstype.as_ptr(),
            path.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    } != 0
    {
        return Err(at("mounting bpffs at", bpffs)(io::Error::last_os_error()));
    }
    info!(path = %bpffs.display(), "mounted bpffs");
    Ok(())
}
