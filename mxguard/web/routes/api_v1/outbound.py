"""Outbound delivery: ``/destination-tls`` (TLS overrides per internet destination, admins) and
``/domains/{name}/dkim`` (a served domain's DKIM keys, the record to publish, its DNS check)."""

from __future__ import annotations

import datetime as dt
from typing import Literal

from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel, ConfigDict, Field

from mxguard.services import destination_tls, dkim_keys
from mxguard.services.access import Actor
from mxguard.services.dns_check import settings_resolver
from mxguard.web.context import WebContext
from mxguard.web.deps import api_actor, get_ctx

router = APIRouter(tags=["outbound"])

Level = Literal["none", "may", "encrypt", "dane", "dane-only", "verify"]


class DestinationTlsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pattern: str = Field(min_length=1, max_length=254, examples=["example.org", ".example.org"],
                         description="A destination domain, or . and a domain for every domain below it")
    level: Level
    ca_file: str | None = Field(default=None, description="CA bundle path on the gateway, for verify")
    replace: bool = Field(default=False, description="Change an existing override instead of 409")


class DestinationTlsOut(BaseModel):
    pattern: str
    level: str
    ca_file: str | None


class DkimKeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    selector: str | None = Field(default=None, max_length=63, description="The s= tag (default mxg<YYYYMM>)")
    algorithm: Literal["rsa", "ed25519"] = "rsa"


class DkimKeyOut(BaseModel):
    domain: str
    selector: str
    algorithm: str
    public_key: str
    active: bool
    created_at: dt.datetime
    record_name: str
    record_value: str
    zone_line: str


class DkimCheckOut(BaseModel):
    selector: str
    name: str
    expected: str
    found: list[str]
    status: Literal["ok", "mismatch", "missing", "error"]
    detail: str


@router.get("/destination-tls", response_model=list[DestinationTlsOut], summary="TLS overrides per destination")
async def list_destination_tls(actor: Actor = Depends(api_actor), ctx: WebContext = Depends(get_ctx)):
    return [DestinationTlsOut(**v.as_dict()) for v in await destination_tls.list_overrides(ctx.store, actor=actor)]


@router.post("/destination-tls", response_model=DestinationTlsOut, status_code=201,
             summary="Set the TLS level for outbound mail to a destination")
async def add_destination_tls(body: DestinationTlsIn, actor: Actor = Depends(api_actor),
                              ctx: WebContext = Depends(get_ctx)):
    """409 when the pattern has an override and ``replace`` is false; 422 naming the field."""
    view = await destination_tls.add_override(ctx.store, body.pattern, body.level, ca_file=body.ca_file,
                                              replace=body.replace, actor=actor)
    await ctx.config_changed()
    return DestinationTlsOut(**view.as_dict())


@router.delete("/destination-tls/{pattern}", status_code=204, response_class=Response,
               summary="Remove a destination's TLS override")
async def remove_destination_tls(pattern: str, actor: Actor = Depends(api_actor), ctx: WebContext = Depends(get_ctx)):
    await destination_tls.remove_override(ctx.store, pattern, actor=actor)
    await ctx.config_changed()
    return Response(status_code=204)


@router.get("/domains/{name}/dkim", response_model=list[DkimKeyOut], summary="The domain's DKIM keys, newest first")
async def list_dkim(name: str, actor: Actor = Depends(api_actor), ctx: WebContext = Depends(get_ctx)):
    return [DkimKeyOut(**v.as_dict()) for v in await dkim_keys.list_keys(ctx.store, name, actor=actor)]


@router.post("/domains/{name}/dkim", response_model=DkimKeyOut, status_code=201,
             summary="Generate a DKIM key (stored sealed; the active key from now on) and the record to publish")
async def generate_dkim(name: str, body: DkimKeyIn, actor: Actor = Depends(api_actor),
                        ctx: WebContext = Depends(get_ctx)):
    view = await dkim_keys.generate_key(ctx.store, ctx.keyring.get(), name, selector=body.selector,
                                        algorithm=body.algorithm, actor=actor)
    return DkimKeyOut(**view.as_dict())


@router.post("/domains/{name}/dkim/check", response_model=list[DkimCheckOut],
             summary="Look each key's TXT record up now: ok, mismatch, missing or error")
async def check_dkim(name: str, actor: Actor = Depends(api_actor), ctx: WebContext = Depends(get_ctx)):
    resolver = settings_resolver(ctx.settings)
    out = []
    for view in await dkim_keys.list_keys(ctx.store, name, actor=actor):
        out.append(DkimCheckOut(selector=view.selector, **(await dkim_keys.check_dns(view, resolver)).as_dict()))
    return out


@router.delete("/domains/{name}/dkim/{selector}", status_code=204, response_class=Response,
               summary="Delete a DKIM key")
async def remove_dkim(name: str, selector: str, actor: Actor = Depends(api_actor), ctx: WebContext = Depends(get_ctx)):
    await dkim_keys.remove_key(ctx.store, name, selector, actor=actor)
    return Response(status_code=204)
