"""A bounded asyncio load generator: many concurrent SMTP sessions, some slow, some with STARTTLS.

Every message carries a unique marker in its Subject so the receiving side can
check that each message answered 250 arrived exactly once.
"""

from __future__ import annotations

import asyncio
import random
import ssl
import time
import uuid
from dataclasses import dataclass, field


@dataclass
class LoadStats:
    sessions: int = 0
    accepted: set[str] = field(default_factory=set)
    refused: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)


async def _read_reply(reader: asyncio.StreamReader) -> int:
    code = 0
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed")
        code = int(line[:3])
        if line[3:4] != b"-":
            return code


async def _session(host: str, port: int, deadline: float, stats: LoadStats, *, slow: bool, tls: bool,
                   rcpt: str, rng: random.Random) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    while time.monotonic() < deadline:
        writer = None
        try:
            reader, writer = await asyncio.open_connection(host, port)
            if await _read_reply(reader) != 220:
                stats.refused += 1
                await asyncio.sleep(0.2)
                continue

            async def cmd(line: bytes) -> int:
                if slow:
                    await asyncio.sleep(rng.uniform(0.2, 1.0))
                writer.write(line + b"\r\n")
                await writer.drain()
                return await _read_reply(reader)

            await cmd(b"EHLO load.test")
            if tls:
                if await cmd(b"STARTTLS") != 220:
                    raise ConnectionError("no STARTTLS")
                await writer.start_tls(ctx, server_hostname="mx.gw.test")
                await cmd(b"EHLO load.test")
            marker = uuid.uuid4().hex
            started = time.perf_counter()
            if await cmd(b"MAIL FROM:<load@sender.test>") != 250 or await cmd(f"RCPT TO:<{rcpt}>".encode()) != 250:
                stats.refused += 1
                continue
            if await cmd(b"DATA") != 354:
                stats.refused += 1
                continue
            body = (f"Subject: load {marker}\r\nFrom: load@sender.test\r\nTo: {rcpt}\r\n\r\n" +
                    "load test line\r\n" * 50).encode()
            if slow:  # a slow sender trickles the message
                for i in range(0, len(body), 200):
                    writer.write(body[i:i + 200])
                    await writer.drain()
                    await asyncio.sleep(rng.uniform(0.05, 0.3))
            else:
                writer.write(body)
            writer.write(b".\r\n")
            await writer.drain()
            if await _read_reply(reader) == 250:
                stats.accepted.add(marker)
                stats.latencies_ms.append((time.perf_counter() - started) * 1000)
            else:
                stats.refused += 1
            writer.write(b"QUIT\r\n")
            await writer.drain()
        except (ConnectionError, OSError, ssl.SSLError, asyncio.IncompleteReadError, ValueError):
            stats.errors += 1
            await asyncio.sleep(0.1)
        finally:
            if writer is not None:
                writer.close()
        stats.sessions += 1


async def run_load(port: int, *, sessions: int, duration: float, slow_fraction: float = 0.1,
                   tls_fraction: float = 0.5, rcpt: str = "alice@example.com", host: str = "127.0.0.1",
                   seed: int = 5) -> LoadStats:
    """``sessions`` concurrent clients, each sending one message per connection until ``duration`` s pass."""
    rng = random.Random(seed)
    stats = LoadStats()
    deadline = time.monotonic() + duration
    tasks = [asyncio.create_task(_session(host, port, deadline, stats, slow=rng.random() < slow_fraction,
                                          tls=rng.random() < tls_fraction, rcpt=rcpt, rng=random.Random(i)))
             for i in range(sessions)]
    await asyncio.wait(tasks, timeout=duration + 60)
    for t in tasks:
        t.cancel()
    return stats
