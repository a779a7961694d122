"""``mxguard demo --keep-running``: a newcomer opens the Message Center as the demo recipient and releases
the GTUBE message, with exactly what the demo prints."""

from __future__ import annotations

import io
import re
import ssl

import httpx
from rich.console import Console

from mxguard.demo import DEMO_RECIPIENT, DemoEnvironment, _print_running, _send_summaries, default_messages


async def test_the_printed_way_in_releases_the_gtube_message():
    async with DemoEnvironment(web=True, web_listen="127.0.0.1:0") as env:
        for message in default_messages(env.dns.sign):
            await env.send(message)
        before = len(env.sink_tls.messages)
        buf = io.StringIO()
        out = Console(file=buf, width=400)
        await _send_summaries(env, out)
        _print_running(out, env)
        text = buf.getvalue()
        assert f"Quarantine summary to {DEMO_RECIPIENT} (1 held message(s)" in text and "TLSv1.3" in text
        summary = env.sink_tls.messages[before]
        assert summary.rcpt_tos == [DEMO_RECIPIENT] and summary.tls_version == "TLSv1.3"
        center = re.search(r"Message Center\s+(https://\S+/mc)\s", text).group(1)
        link = re.search(r"one-time sign-in link\s+(https://\S+)", text).group(1)
        password = re.search(r"or password\s+(\S+)", text).group(1)
        assert link.startswith(center + "/link/")

        ctx = ssl.create_default_context(cafile=str(env.settings.path(env.settings.tls.cert_file)))
        ctx.check_hostname = False
        async with httpx.AsyncClient(verify=ctx, timeout=30) as client:
            page = await client.get(link)
            assert page.status_code == 200 and "Sign in to the Message Center" in page.text
            token = re.search(r'name="token" value="([^"]+)"', page.text).group(1)
            link_csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
            signed_in = await client.post(center + "/link", data={"token": token, "csrf_token": link_csrf})
            assert signed_in.status_code == 303
            listing = await client.get(center)
            assert listing.status_code == 200 and "You have won" in listing.text
            qid = re.search(r'<tr id="q-(Q[0-9A-F]+)"', listing.text).group(1)
            csrf = re.search(r'name="csrf_token" value="([^"]+)"', listing.text).group(1)
            done = await client.post(f"{center}/messages/{qid}/deliver", data={"csrf_token": csrf})
            assert done.status_code == 303
        released = env.sink_tls.messages[-1]
        assert b"Subject: You have won" in released.data and released.tls_version == "TLSv1.3"
        assert released.rcpt_tos == [DEMO_RECIPIENT]

        # The password works too.
        async with httpx.AsyncClient(verify=ctx, timeout=30) as client:
            form = await client.get(center + "/signin")
            csrf = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
            reply = await client.post(center.removesuffix("/mc") + "/login",
                                      data={"email": DEMO_RECIPIENT, "password": password, "csrf_token": csrf,
                                            "next": "/mc"})
            assert reply.status_code == 303 and reply.headers["location"] == "/mc"
