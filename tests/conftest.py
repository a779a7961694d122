"""Shared fixtures: data dirs, a running gateway, downstream sinks with and without STARTTLS, PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import tempfile
from pathlib import Path

import pytest
import trustme

from mxguard.services import domains as domain_service
from mxguard.sink import ThreadedSink
from mxguard.storage.db import Store
from tests.support.dns import LoopbackDNS
from tests.support.gateway import ThreadedGateway, init_data_dir
from tests.support.postgres import PostgresCluster

CORPUS = Path(os.environ.get("TEST_CORPUS_DIR", Path(__file__).resolve().parents[2] / "shared" / "corpus"))


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """The shared corpus of real messages (read-only)."""
    if not CORPUS.is_dir():
        pytest.fail(f"corpus not found at {CORPUS}; set TEST_CORPUS_DIR")
    return CORPUS


# -- DNS ----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def loopback_dns():
    """The DNS server every DNS lookup of the tests goes to (SPF/DKIM/DMARC records of the test domains)."""
    server = LoopbackDNS().start()
    yield server
    server.stop()


@pytest.fixture(scope="session", autouse=True)
def _dns_stays_on_loopback(loopback_dns):
    """Every mxguard process the tests start (``serve``, ``demo``, ``scan``) asks the loopback DNS
    server, never the system resolver: no DNS query leaves the machine."""
    previous = os.environ.get("MXGUARD_FILTERS__DNS_SERVERS")
    os.environ["MXGUARD_FILTERS__DNS_SERVERS"] = loopback_dns.address
    yield
    if previous is None:
        os.environ.pop("MXGUARD_FILTERS__DNS_SERVERS", None)
    else:
        os.environ["MXGUARD_FILTERS__DNS_SERVERS"] = previous


@pytest.fixture(scope="session", autouse=True)
def _one_gateway_process():
    """``mxguard serve`` started by a test is one process unless the test asks for more
    (``--workers``, or an environment without ``MXGUARD_*``): the limit tests count
    connections per process. The default, one per CPU, is tested in test_serve_startup."""
    previous = os.environ.get("MXGUARD_SMTP__WORKERS")
    os.environ["MXGUARD_SMTP__WORKERS"] = "1"
    yield
    if previous is None:
        os.environ.pop("MXGUARD_SMTP__WORKERS", None)
    else:
        os.environ["MXGUARD_SMTP__WORKERS"] = previous


def gateway_environ(loopback_dns: LoopbackDNS, **overrides: str) -> dict[str, str]:
    """Settings overrides every test gateway gets: sender checks use the loopback DNS server."""
    return {"MXGUARD_FILTERS__DNS_SERVERS": loopback_dns.address, **overrides}


# -- TLS material ------------------------------------------------------------------------

@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    """The organization's private CA, which signs the downstream server's certificate."""
    return trustme.CA(organization_name="Example Corp test CA")


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def _server_ctx(cert: trustme.LeafCert) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(ctx)
    return ctx


@pytest.fixture(scope="session")
def downstream_cert(ca: trustme.CA) -> trustme.LeafCert:
    """A valid certificate for the downstream server (names mail.example.com and 127.0.0.1)."""
    return ca.issue_cert("mail.example.com", "127.0.0.1")


@pytest.fixture(scope="session")
def wrong_name_cert(ca: trustme.CA) -> trustme.LeafCert:
    """Signed by the right CA but for another name."""
    return ca.issue_cert("other.example.net")


# -- sinks (the downstream mail server) -------------------------------------------------

@pytest.fixture
def tls_sink(downstream_cert):
    """A downstream server offering STARTTLS with a CA-signed certificate for 127.0.0.1."""
    with ThreadedSink(tls_context=_server_ctx(downstream_cert), hostname="mail.example.com") as sink:
        yield sink


@pytest.fixture
def plain_sink():
    """A downstream server that does not offer STARTTLS."""
    with ThreadedSink(hostname="legacy.example.org") as sink:
        yield sink


@pytest.fixture
def self_signed_sink(tmp_path):
    """A downstream server whose certificate is self-signed."""
    from mxguard.tls.certs import generate_self_signed, write_private
    from mxguard.tls.contexts import server_context
    cert, key = generate_self_signed("selfsigned.example.com", extra_names=["127.0.0.1"])
    write_private(tmp_path / "ss.pem", cert)
    write_private(tmp_path / "ss.key", key)
    with ThreadedSink(tls_context=server_context(tmp_path / "ss.pem", tmp_path / "ss.key")) as sink:
        sink.cert_pem = cert
        yield sink


@pytest.fixture
def wrong_name_sink(wrong_name_cert):
    with ThreadedSink(tls_context=_server_ctx(wrong_name_cert)) as sink:
        yield sink


# -- the gateway ------------------------------------------------------------------------

@pytest.fixture
def data_dir(tmp_path) -> Path:
    path = tmp_path / "data"
    init_data_dir(path)
    return path


def apply_overrides(settings, overrides: dict) -> None:
    """Set ``{"spool.first_retry": 0.5, ...}`` on a Settings object."""
    for dotted, value in overrides.items():
        target = settings
        *path, last = dotted.split(".")
        for part in path:
            target = getattr(target, part)
        setattr(target, last, value)


#: Spool timings for tests: retries within a second, short leases.
FAST_SPOOL = {"spool.first_retry": 0.3, "spool.max_retry": 1.0, "spool.poll_interval": 0.1, "spool.lease": 3.0,
              "spool.jitter": 0.0}


@pytest.fixture
def gateway_overrides() -> dict:
    """Settings overrides for the ``gateway`` fixture; override this fixture in a test module."""
    return {}


@pytest.fixture
def gateway(data_dir, gateway_overrides, loopback_dns):
    """A running gateway (SQLite) on a free loopback port, with the embedded filters."""
    from mxguard.config import load_settings
    settings = load_settings(data_dir, environ=gateway_environ(loopback_dns))
    apply_overrides(settings, gateway_overrides)
    gw = ThreadedGateway(settings).start()
    yield gw
    gw.stop()


@pytest.fixture
def add_domain(gateway):
    """``add_domain(name, servers, **fields)`` on the running gateway, applied at once."""
    def _add(name: str, servers: list[str], **fields):
        view = gateway.run(domain_service.add_domain(gateway.store, name, servers, **fields))
        gateway.reload()
        return view
    return _add


@pytest.fixture
def gateway_client_ctx(data_dir) -> ssl.SSLContext:
    """A client context that trusts the gateway's self-signed certificate (and nothing else)."""
    ctx = ssl.create_default_context(cafile=str(data_dir / "tls" / "cert.pem"))
    ctx.check_hostname = False
    return ctx


# -- PostgreSQL ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def postgres():
    """A private PostgreSQL cluster for the whole run (started here; never skipped)."""
    cluster = PostgresCluster(Path(tempfile.mkdtemp(prefix="mxguard-pg-"))).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def pg_url(postgres) -> str:
    """A fresh, empty PostgreSQL database for one test."""
    return postgres.create_database()


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request, tmp_path):
    """A migrated store on SQLite and, in a second run of the test, on PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    s = Store(url)
    await s.migrate()
    yield s
    await s.close()


# -- the console and REST API -------------------------------------------------------------

@pytest.fixture
def web(data_dir, loopback_dns, gateway_overrides):
    """A running gateway with the console on a free loopback port (HTTPS with its own certificate),
    an admin ``admin@gw.test`` and that admin's API key as ``web.admin_key``; settings overrides
    from ``gateway_overrides``."""
    from mxguard.config import load_settings
    from tests.support.web import WebGateway
    settings = load_settings(data_dir, environ=gateway_environ(loopback_dns))
    apply_overrides(settings, gateway_overrides)
    gw = ThreadedGateway(settings, web_listen="127.0.0.1:0").start()
    w = WebGateway(gw, data_dir / "tls" / "cert.pem")
    w.add_user("admin@gw.test", "admin")
    w.admin_key = w.api_key("admin@gw.test")
    yield w
    w.close()
    gw.stop()
# -- real filter engines (started once per run; never skipped) ----------------------------

@pytest.fixture(scope="session")
def clamd(corpus_dir):
    """clamd on loopback with a signature database built from the corpus and EICAR."""
    from tests.support.clamd import ClamdInstance
    instance = ClamdInstance(Path(tempfile.mkdtemp(prefix="mxguard-clamd-")), corpus_dir).start()
    yield instance
    instance.stop()
    shutil.rmtree(instance.base, ignore_errors=True)


@pytest.fixture(scope="session")
def rspamd(loopback_dns):
    """Rspamd's normal worker on loopback, its DNS pointed at the loopback DNS server."""
    from tests.support.rspamd import RspamdInstance
    instance = RspamdInstance(Path(tempfile.mkdtemp(prefix="mxguard-rspamd-")), loopback_dns.address).start()
    yield instance
    instance.stop()
    shutil.rmtree(instance.base, ignore_errors=True)  # about 90 MB of compiled hyperscan cache


@pytest.fixture(scope="session")
def spamd():
    """SpamAssassin's spamd on loopback, offline (-L)."""
    from tests.support.spamd import SpamdInstance
    instance = SpamdInstance(Path(tempfile.mkdtemp(prefix="mxguard-spamd-"))).start()
    yield instance
    instance.stop()
    shutil.rmtree(instance.base, ignore_errors=True)
