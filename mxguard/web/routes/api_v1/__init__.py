"""REST API v1: one router per resource; every endpoint needs an API key (Bearer)."""

from fastapi import APIRouter

from mxguard.web.routes.api_v1 import (audit, dashboard, domains, me, messages, orgs, outbound, relay, spool, tls,
                                       tls_reports, users)

router = APIRouter()
for _module in (me, orgs, relay, users, domains, tls_reports, messages, spool, tls, dashboard, audit, outbound):
    router.include_router(_module.router)
