"""A TCP proxy on loopback between some clients and Redis that cuts, delays or blackholes the link.

Run it as its own process (``python -m tests.faults.proxy --target 127.0.0.1:6379``); it
prints ``listen=<port> control=<port>`` on its first line and serves until killed.
:class:`tests.faults.link.Link` starts it and drives it by PID. Commands, one line each on
the control port (answered ``ok ...``):

* ``pass`` / ``heal`` — forward bytes as they come. Connections a blackhole dropped bytes
  of are closed (their streams are broken for good: a real partition ends the same way,
  with a reset); bytes a delay still holds are delivered, in order, first.
* ``cut`` — close every connection and refuse new ones (accept, then close at once).
* ``delay <seconds>`` — forward each chunk that many seconds after it arrived, both ways.
* ``blackhole`` — keep every connection open and accept new ones, but drop every byte.
* ``stats`` — ``ok open=<connections> accepted=<total> forwarded=<bytes>``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

CHUNK = 65536


@dataclass(eq=False)
class _Pipe:
    """One client connection and its connection to the target."""

    writers: list[asyncio.StreamWriter]
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    damaged: bool = False
    """A blackhole dropped bytes of it: it can never carry a consistent stream again."""

    def close(self) -> None:
        for writer in self.writers:
            with contextlib.suppress(Exception):
                writer.transport.abort()
        for task in self.tasks:
            task.cancel()


class Proxy:
    """Forwards loopback connections to ``target``, with the fault the last command set."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.mode = "pass"
        self.delay_s = 0.0
        self.pipes: set[_Pipe] = set()
        self.accepted = 0
        self.forwarded = 0

    async def serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.accepted += 1
        if self.mode == "cut":
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        pipe = _Pipe([writer, up_writer], damaged=self.mode == "blackhole")
        self.pipes.add(pipe)
        pipe.tasks = [
            asyncio.create_task(self._pump(pipe, reader, up_writer)),
            asyncio.create_task(self._pump(pipe, up_reader, writer)),
        ]
        await asyncio.gather(*pipe.tasks, return_exceptions=True)
        pipe.close()
        self.pipes.discard(pipe)

    async def _pump(
        self, pipe: _Pipe, source: asyncio.StreamReader, sink: asyncio.StreamWriter
    ) -> None:
        """Copy one direction; a delay holds each chunk back, in order, by a sender task."""
        held: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        sender = asyncio.create_task(self._send_held(held, sink))
        try:
            while data := await source.read(CHUNK):
                if self.mode == "blackhole":
                    pipe.damaged = True
                    continue
                held.put_nowait((time.monotonic() + self.delay_s, data))
            held.put_nowait(None)
            await sender
        finally:
            sender.cancel()
            pipe.close()

    async def _send_held(
        self, held: asyncio.Queue[tuple[float, bytes] | None], sink: asyncio.StreamWriter
    ) -> None:
        while (item := await held.get()) is not None:
            due, data = item
            await asyncio.sleep(max(due - time.monotonic(), 0.0))
            sink.write(data)
            await sink.drain()
            self.forwarded += len(data)

    def command(self, line: str) -> str:
        """Apply one control command; returns the answer line."""
        words = line.split()
        verb = words[0] if words else ""
        if verb in ("pass", "heal"):
            self.mode, self.delay_s = "pass", 0.0
            self._close(lambda pipe: pipe.damaged)
        elif verb == "cut":
            self.mode, self.delay_s = "cut", 0.0
            self._close(lambda pipe: True)
        elif verb == "delay" and len(words) == 2:
            self.mode, self.delay_s = "delay", float(words[1])
        elif verb == "blackhole":
            self.mode, self.delay_s = "blackhole", 0.0
        elif verb == "stats":
            return f"ok open={len(self.pipes)} accepted={self.accepted} forwarded={self.forwarded}"
        else:
            return f"error unknown command {line.strip()!r}"
        return f"ok {self.mode}"

    def _close(self, which: Callable[[_Pipe], bool]) -> None:
        for pipe in list(self.pipes):
            if which(pipe):
                pipe.close()
                self.pipes.discard(pipe)

    async def serve_control(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while line := await reader.readline():
            writer.write((self.command(line.decode()) + "\n").encode())
            await writer.drain()
        writer.close()


async def main(target: str) -> None:
    host, port = target.rsplit(":", 1)
    proxy = Proxy(host, int(port))
    listener = await asyncio.start_server(proxy.serve_client, "127.0.0.1", 0)
    control = await asyncio.start_server(proxy.serve_control, "127.0.0.1", 0)
    listen_port = listener.sockets[0].getsockname()[1]
    control_port = control.sockets[0].getsockname()[1]
    print(f"listen={listen_port} control={control_port}", flush=True)
    async with listener, control:
        await asyncio.gather(listener.serve_forever(), control.serve_forever())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="host:port of the server to proxy")
    arguments = parser.parse_args()
    if not arguments.target.startswith("127.0.0.1:"):
        parser.error("the fault proxy only forwards to 127.0.0.1")
    asyncio.run(main(arguments.target))
