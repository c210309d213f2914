//! Listening sockets: for each listen address one `SO_REUSEPORT` socket per worker, all in one
//! reuseport group, kept open by the master for its whole life. Socket *i* of a group is the
//! *i*-th to call `listen`, so with the classic BPF program below, socket *i* — and so worker
//! *i* of every generation — always receives the same client addresses.

use anyhow::{Context, Result};
use socket2::{Domain, Socket, Type};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;

/// `SO_ATTACH_REUSEPORT_CBPF` (asm-generic/socket.h); not exported by libc for Linux.
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;
const BACKLOG: i32 = 4096;

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
    // `new_raw`, no CLOEXEC: workers are forked, not exec'd, and a binary upgrade hands these
    // fds on.
    let socket =
        Socket::new_raw(Domain::for_address(addr), Type::STREAM, None).context("socket")?;
    socket.set_reuse_address(true).context("SO_REUSEADDR")?;
    socket.set_reuse_port(true).context("SO_REUSEPORT")?;
    if addr.is_ipv6() {
        // IPv4-mapped clients would carry an IPv4 network header, which the IPv6 steering
        // program cannot read: like nginx, an IPv6 listener is IPv6 only.
        socket.set_only_v6(true).context("IPV6_V6ONLY")?;
    }
    socket.bind(&addr.into()).context("bind")?;
    socket.listen(BACKLOG).context("listen")?;
    Ok(socket.into())
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
    let len = std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t;
    // SAFETY: `fprog` and the program it points to outlive the call, and `len` is its size;
    // neither socket2 nor nix has this option.
    let r = unsafe {
        libc::setsockopt(
            first.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            &fprog as *const libc::sock_fprog as *const libc::c_void,
            len,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
