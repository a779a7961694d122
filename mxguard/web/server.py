"""uvicorn inside the gateway's event loop: the console shares the process and loop with SMTP.

The listening socket is bound here (so a busy port is a clear ``ConfigError``
naming ``web.listen``, and port 0 works), and uvicorn serves on it with the
gateway's reloadable TLS context, so a certificate upload applies to HTTPS and
STARTTLS alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl

import structlog
import uvicorn

from mxguard.errors import ConfigError
from mxguard.netaddr import parse_host_port

log = structlog.get_logger("mxguard.web")


# An idle keep-alive connection is closed after this long. Clients (httpx,
# browsers) forget theirs after about 5 s; closing at the same moment races a
# reused connection into "server disconnected", so the server waits longer.
KEEP_ALIVE_SECONDS = 20

class _EmbeddedServer(uvicorn.Server):
    # The gateway owns SIGTERM/SIGINT (loop.add_signal_handler); uvicorn must not replace them.
    @contextlib.contextmanager
    def capture_signals(self):
        yield


class WebServer:
    """The console's HTTP(S) listener.

    Args:
        app: the ASGI application.
        listen: ``HOST:PORT`` (port 0 picks a free port).
        tls_context: server context for HTTPS; ``None`` serves plain HTTP
            (only behind a TLS-terminating proxy).
        setting: the settings key ``listen`` came from (named in errors).
        default_port: the port when ``listen`` has none.
        label: what the listener is, in log lines and the task name.
    """

    def __init__(self, app, listen: str, tls_context: ssl.SSLContext | None, *, setting: str = "web.listen",
                 default_port: int = 8443, label: str = "console"):
        self.app = app
        self.listen = listen
        self.tls_context = tls_context
        self.setting = setting
        self.default_port = default_port
        self.label = label
        self.port = 0
        self.host = ""
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.tls_context is not None else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/"

    async def start(self) -> None:
        """Bind and start serving.

        Raises:
            ConfigError: the listen setting is invalid or the address is in use (the message names the key).
        """
        try:
            host, port = parse_host_port(self.listen, default_port=self.default_port, allow_zero=True)
        except ValueError as exc:
            raise ConfigError(f"{self.setting}: {exc}") from None
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise ConfigError(f"{self.setting}: cannot listen on {self.listen}: {exc.strerror or exc}") from None
        sock.setblocking(False)
        self.host, self.port = host, sock.getsockname()[1]
        plain = self.tls_context is None
        config = uvicorn.Config(self.app, log_config=None, lifespan="off", access_log=False,
                                proxy_headers=plain, server_header=False, date_header=True,
                                timeout_graceful_shutdown=5, timeout_keep_alive=KEEP_ALIVE_SECONDS)
        config.load()
        config.ssl = self.tls_context
        self._server = _EmbeddedServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name=f"web-{self.label}")
        deadline = asyncio.get_running_loop().time() + 30
        while not self._server.started:
            if asyncio.get_running_loop().time() > deadline:
                await self.stop()
                raise ConfigError(f"{self.setting}: the {self.label} did not start on {self.listen} within 30 s")
            if self._task.done():
                self._task.result()
                raise ConfigError(f"{self.setting}: the {self.label} did not start on {self.listen}")
            await asyncio.sleep(0.01)
        log.info(f"{self.label} listening", url=self.url)

    async def stop(self, grace: float = 1.0) -> None:
        """Stop accepting, give open requests ``grace`` seconds, then drop what is left and close.

        Idle keep-alive TLS connections would otherwise hold shutdown until the
        client answers the close_notify.
        """
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace)
        except asyncio.TimeoutError:
            for connection in list(self._server.server_state.connections):
                transport = getattr(connection, "transport", None)
                if transport is not None:
                    transport.abort()
            try:
                await asyncio.wait_for(asyncio.shield(self._task), 5)
            except asyncio.TimeoutError:
                self._server.force_exit = True
                await asyncio.wait_for(self._task, 5)
        self._server = None
        self._task = None
