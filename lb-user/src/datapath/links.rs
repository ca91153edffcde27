//! The BPF link calls aya 0.14 does not expose on a pinned link: open it, ask what it is
//! attached to, and swap its program in place. Adopting the links an earlier agent pinned is
//! what keeps the datapath forwarding, with no gap, across a restart or an upgrade.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// What a link is attached to, from `bpf_link_info`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub program_id: u32,
    /// The interface index (tcx, XDP; 0 once the interface is gone) or the cgroup id.
    pub target: u64,
}

/// Opens the object pinned at `path`.
pub fn open_pinned(path: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut attr = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// What the link `link` is attached to.
pub fn info(link: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    let mut info = RawLinkInfo {
        link_type: 0,
        id: 0,
        prog_id: 0,
        target: Target { cgroup_id: 0 },
        _rest: [0; 12],
    };
    let mut attr = InfoAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: size_of::<RawLinkInfo>() as u32,
        info: (&raw mut info) as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(LinkInfo {
        program_id: info.prog_id,
        // SAFETY: both variants are plain integers, the union zero-initialised.
        target: unsafe {
            if info.link_type == BPF_LINK_TYPE_CGROUP {
                info.target.cgroup_id
            } else {
                u64::from(info.target.ifindex)
            }
        },
    })
}

/// Replaces the program of `link` by `program`, atomically: every packet meets one or the other.
pub fn update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(BPF_LINK_UPDATE, &mut attr)?;
    Ok(())
}

/// `union bpf_attr` for `BPF_OBJ_GET`.
#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// `union bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `union bpf_attr` for `BPF_LINK_UPDATE`.
#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// `struct bpf_link_info`, up to the first field of its union; the rest is room for the
/// kernel's larger variants.
#[repr(C)]
struct RawLinkInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
    target: Target,
    _rest: [u64; 12],
}

#[repr(C)]
#[derive(Clone, Copy)]
union Target {
    /// tcx and XDP.
    ifindex: u32,
    cgroup_id: u64,
}

const BPF_LINK_TYPE_CGROUP: u32 = 3;

fn bpf<T>(command: libc::c_long, attr: &mut T) -> io::Result<i32> {
    // SAFETY: `attr` is a bpf_attr of the size given, alive for the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            std::ptr::from_mut(attr),
            size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ret as i32)
}
