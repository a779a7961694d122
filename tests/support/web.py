"""Helpers for console and API tests: users and keys on a running gateway, HTTPS clients, form tokens."""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from pathlib import Path

import httpx

from mxguard.services import apikeys, orgs, users
from tests.support.gateway import ThreadedGateway

PASSWORD = "correct horse battery staple"
# Forget an idle connection well before the console closes it
# (mxguard.web.server.KEEP_ALIVE_SECONDS), so a reused one is never half-closed.
_LIMITS = httpx.Limits(keepalive_expiry=2.0)
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def gateway_tls_context(cert_file: Path) -> ssl.SSLContext:
    """Trust exactly the gateway's self-signed certificate (the tests reach it as 127.0.0.1)."""
    ctx = ssl.create_default_context(cafile=str(cert_file))
    ctx.check_hostname = False
    return ctx


def csrf_token(html: str) -> str:
    """The CSRF token of the first form in a page."""
    match = _CSRF.search(html)
    assert match, "no csrf_token field in the page"
    return match.group(1)


@dataclass
class Tenant:
    """An organization with an org-admin, and that admin's API key."""

    org: str
    email: str
    key: str


class WebGateway:
    """A running gateway with the console, plus helpers to make users, keys and clients."""

    def __init__(self, gw: ThreadedGateway, cert_file: Path):
        self.gw = gw
        self.cert_file = cert_file
        self.url = gw.web_url
        self.clients: list[httpx.Client] = []

    def close(self) -> None:
        for client in self.clients:
            client.close()

    def run(self, coro):
        return self.gw.run(coro)

    def add_org(self, name: str) -> None:
        self.run(orgs.add_org(self.gw.store, name))

    def add_user(self, email: str, role: str = "admin", org: str | None = None, password: str = PASSWORD) -> None:
        self.run(users.add_user(self.gw.store, email, role, org=org, password=password))

    def api_key(self, email: str) -> str:
        key, _ = self.run(apikeys.create_api_key(self.gw.store, email))
        return key

    def tenant(self, org: str, email: str) -> Tenant:
        self.add_org(org)
        self.add_user(email, "org-admin", org)
        return Tenant(org, email, self.api_key(email))

    def client(self, **kwargs) -> httpx.Client:
        """An HTTPS client to the console that keeps cookies."""
        client = httpx.Client(base_url=self.url, verify=gateway_tls_context(self.cert_file), timeout=30,
                              follow_redirects=False, limits=_LIMITS, **kwargs)
        self.clients.append(client)
        return client

    def api(self, key: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        client = httpx.Client(base_url=self.url + "/api/v1", verify=gateway_tls_context(self.cert_file), timeout=60,
                              headers=headers, limits=_LIMITS)
        self.clients.append(client)
        return client

    def login(self, email: str, password: str = PASSWORD, client: httpx.Client | None = None,
              next_path: str = "/") -> tuple[httpx.Client, httpx.Response]:
        """Log in through the form (GET /login for the token, POST it); returns the client and the POST reply."""
        client = client or self.client()
        page = client.get("/login")
        assert page.status_code == 200, page.text
        reply = client.post("/login", data={"email": email, "password": password, "csrf_token": csrf_token(page.text),
                                            "next": next_path})
        return client, reply
