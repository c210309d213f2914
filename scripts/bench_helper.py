#!/usr/bin/env python3
"""Measuring helpers for scripts/bench.sh (standard library only).

    bench_helper.py tree PID          PID and all its descendants, one a line
    bench_helper.py cpu PID           utime+stime of PID and all its descendants, in µs
    bench_helper.py pss PID           Pss of PID and all its descendants, in KiB
    bench_helper.py hold PORT N TLS PATH
                                      opens N connections to 127.0.0.1:PORT (TLS: 1 or 0),
                                      each sends one GET PATH and reads the whole response,
                                      prints "ready OPEN FAILED", then holds them until killed
    bench_helper.py sniff PORT SECS   counts the TLS ServerHellos sent from PORT on `lo` for
                                      SECS seconds; prints "FULL RESUMED"

The tree walks read /proc once, so a server's master, workers and health checker are all
counted, whatever the server forks.
"""

import asyncio
import os
import resource
import signal
import socket
import ssl
import struct
import sys
import time


def tree(root):
    """root and every process below it, from one scan of /proc."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # exited while we looked
        # The command name may hold spaces and parentheses: fields start after the last ')'.
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def cpu_us(root):
    ticks = 0
    for pid in tree(root):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # Fields 14 and 15 of stat(5) (utime, stime); fields[0] here is field 3.
        ticks += int(fields[11]) + int(fields[12])
    return ticks * 1_000_000 // os.sysconf("SC_CLK_TCK")


def pss_kib(root):
    total = 0
    for pid in tree(root):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


async def open_one(port, ctx, path, limit):
    async with limit:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        await reader.readexactly(length)
        return writer


async def hold(port, count, tls, path):
    ctx = None
    if tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    # Enough at once to be quick, few enough not to trip a listen backlog.
    limit = asyncio.Semaphore(100)
    results = await asyncio.gather(
        *(open_one(port, ctx, path, limit) for _ in range(count)), return_exceptions=True
    )
    held = [r for r in results if not isinstance(r, BaseException)]
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        print(f"first error: {errors[0]!r}", file=sys.stderr)
    print(f"ready {len(held)} {len(errors)}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


def server_hello(payload):
    """(is TLS 1.3, resumed) for a TCP payload starting with a ServerHello record, else None."""
    if len(payload) < 44 or payload[0] != 0x16 or payload[5] != 0x02:
        return None
    try:
        at = 5 + 4 + 2 + 32  # record header, handshake header, legacy_version, random
        at += 1 + payload[at]  # session id
        at += 2 + 1  # cipher suite, compression
        end = at + 2 + struct.unpack_from(">H", payload, at)[0]
        at += 2
        extensions = set()
        while at + 4 <= end:
            kind, size = struct.unpack_from(">HH", payload, at)
            extensions.add(kind)
            at += 4 + size
    except (IndexError, struct.error):
        return None
    if 0x002B in extensions:  # supported_versions: TLS 1.3
        return True, 0x0029 in extensions  # pre_shared_key: the server took a resumption
    # TLS 1.2: a full handshake sends its Certificate (type 11) right after the ServerHello.
    hello_end = 5 + 4 + struct.unpack_from(">I", b"\0" + payload[6:9])[0]
    rest = payload[hello_end:]
    full = len(rest) > 5 and rest[0] == 0x16 and rest[5] == 11
    return False, not full


def sniff(port, seconds):
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    sock.bind(("lo", 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
    sock.settimeout(0.2)
    full = resumed = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            frame, addr = sock.recvfrom(65536)
        except socket.timeout:
            continue
        if addr[2] == socket.PACKET_OUTGOING:
            continue  # loopback shows each packet twice: count the incoming copy
        ip = frame[14:]
        if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 6:
            continue
        tcp = ip[(ip[0] & 0x0F) * 4:]
        if len(tcp) < 20 or struct.unpack_from(">H", tcp, 0)[0] != port:
            continue
        hello = server_hello(tcp[(tcp[12] >> 4) * 4:])
        if hello is not None:
            if hello[1]:
                resumed += 1
            else:
                full += 1
    print(full, resumed)


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "tree":
        print("\n".join(map(str, tree(int(args[0])))))
    elif cmd == "cpu":
        print(cpu_us(int(args[0])))
    elif cmd == "pss":
        print(pss_kib(int(args[0])))
    elif cmd == "hold":
        want = int(args[1]) + 100
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
        asyncio.run(hold(int(args[0]), int(args[1]), args[2] == "1", args[3]))
    elif cmd == "sniff":
        sniff(int(args[0]), float(args[1]))
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
