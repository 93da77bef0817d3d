"""A TCP proxy on loopback that a test can cut, to make one process lose a server.

The real server keeps running for every other test; only connections through the proxy
see the fault. ``cut()`` closes every proxied connection and refuses new ones (as a
server that went away); ``restore()`` accepts again. ``stall()`` keeps the connections
open but forwards nothing (a server that hangs) until ``flow()``. ``black_hole()`` accepts
new connections and never answers on them, not even after ``restore()`` (a server that
takes connections while it cannot serve them, as a broker does while it boots).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import urllib.parse


class Proxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port: int = s.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing: asyncio.Event | None = None
        self._swallowing = False
        self._swallowed: list[asyncio.StreamWriter] = []

    def url(self, scheme_url: str, server_port: int) -> str:
        """``scheme_url`` (a server URL) with the server's port replaced by the proxy's."""
        return scheme_url.replace(f":{server_port}", f":{self.port}", 1)

    @classmethod
    def before(cls, server_url: str) -> tuple[Proxy, str]:
        """A started proxy to the server of ``server_url`` (loopback, with a port), and
        the URL that goes through it."""
        port = urllib.parse.urlsplit(server_url).port
        assert port is not None, server_url
        proxy = cls(port).start()
        return proxy, proxy.url(server_url, port)

    def start(self) -> Proxy:
        self._thread.start()
        self.restore()
        return self

    def _call(self, coro: object) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)  # type: ignore[arg-type]

    def restore(self) -> None:
        self._swallowing = False
        self._call(self._listen())

    def black_hole(self) -> None:
        self._swallowing = True
        self._call(self._listen())

    def cut(self) -> None:
        self._call(self._cut())

    def stall(self) -> None:
        self._call(self._set_flowing(False))

    def flow(self) -> None:
        self._call(self._set_flowing(True))

    async def _set_flowing(self, flowing: bool) -> None:
        assert self._flowing is not None
        if flowing:
            self._flowing.set()
        else:
            self._flowing.clear()

    def close(self) -> None:
        self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    async def _listen(self) -> None:
        if self._flowing is None:
            self._flowing = asyncio.Event()
            self._flowing.set()
        if self._server is None:
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def _cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in [*self._writers, *self._swallowed]:
            writer.transport.abort()
        self._swallowed.clear()
        for task in list(self._pipes):
            task.cancel()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._swallowing:
            self._swallowed.append(writer)  # open, and silent for good
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                assert self._flowing is not None
                await self._flowing.wait()
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(dst)
            with contextlib.suppress(Exception):
                dst.transport.abort()
