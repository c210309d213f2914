//! Listening sockets: for each listen address one `SO_REUSEPORT` socket per worker, all in one
//! reuseport group, kept open by the master for its whole life. Socket *i* of a group is the
//! *i*-th to call `listen`, so with the classic BPF program below, socket *i* — and so worker
//! *i* of every generation — always receives the same client addresses.

use anyhow::{Context, Result};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `SO_ATTACH_REUSEPORT_CBPF` (asm-generic/socket.h); not exported by libc for Linux.
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;
const BACKLOG: libc::c_int = 4096;

/// One listen address and its per-worker sockets.
pub struct ListenGroup {
    pub addr: SocketAddr,
    pub sockets: Vec<TcpListener>,
}

pub fn bind_group(addr: SocketAddr, count: usize) -> Result<ListenGroup> {
    let sockets = (0..count)
        .map(|_| bind_one(addr))
        .collect::<Result<Vec<_>>>()
        .with_context(|| format!("cannot listen on {addr}"))?;
    Ok(ListenGroup { addr, sockets })
}

fn bind_one(addr: SocketAddr) -> Result<TcpListener> {
    let domain = match addr {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    // No CLOEXEC: workers are forked, not exec'd, and a binary upgrade hands these fds on.
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("socket");
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    set_int(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1).context("SO_REUSEADDR")?;
    set_int(&fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1).context("SO_REUSEPORT")?;
    if domain == libc::AF_INET6 {
        // IPv4-mapped clients would carry an IPv4 network header, which the IPv6 steering
        // program cannot read: like nginx, an IPv6 listener is IPv6 only.
        set_int(&fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1).context("IPV6_V6ONLY")?;
    }
    let (storage, len) = sockaddr(addr);
    if unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &storage as *const _ as *const libc::sockaddr,
            len,
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error()).context("bind");
    }
    if unsafe { libc::listen(fd.as_raw_fd(), BACKLOG) } != 0 {
        return Err(std::io::Error::last_os_error()).context("listen");
    }
    Ok(TcpListener::from(fd))
}

fn set_int(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    setsockopt(fd.as_raw_fd(), level, name, &value)
}

fn setsockopt<T>(fd: i32, level: libc::c_int, name: libc::c_int, value: &T) -> std::io::Result<()> {
    let len = std::mem::size_of::<T>() as libc::socklen_t;
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            value as *const T as *const libc::c_void,
            len,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

/// The steering program: `hash(client address) % n`. The source address is read from the
/// network header (`SKF_NET_OFF`): at offset 0 a reuseport program sees the TCP payload.
fn steering_program(ipv6: bool, n: u32) -> Vec<libc::sock_filter> {
    use libc::*;
    let net = SKF_NET_OFF as u32;
    let ld_word = |off: u32| stmt(BPF_LD | BPF_W | BPF_ABS, net.wrapping_add(off));
    let mut prog = Vec::new();
    if ipv6 {
        // XOR the four words of the 128-bit source address (IPv6 header offset 8).
        prog.push(ld_word(8));
        for off in [12, 16, 20] {
            prog.push(stmt(BPF_MISC | BPF_TAX, 0));
            prog.push(ld_word(off));
            prog.push(stmt(BPF_ALU | BPF_XOR | BPF_X, 0));
        }
    } else {
        prog.push(ld_word(12)); // IPv4 source address
    }
    prog.push(stmt(BPF_ALU | BPF_MOD | BPF_K, n));
    prog.push(stmt(BPF_RET | BPF_A, 0));
    prog
}

/// Attaches the steering program to the group. An error leaves the kernel's own hash in force.
pub fn attach_cbpf(group: &ListenGroup) -> std::io::Result<()> {
    let Some(first) = group.sockets.first() else {
        return Ok(());
    };
    let mut prog = steering_program(group.addr.is_ipv6(), group.sockets.len() as u32);
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_mut_ptr(),
    };
    setsockopt(
        first.as_raw_fd(),
        libc::SOL_SOCKET,
        SO_ATTACH_REUSEPORT_CBPF,
        &fprog,
    )
}
