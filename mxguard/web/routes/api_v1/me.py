"""``/me``: who the API key belongs to."""

from fastapi import APIRouter, Depends

from mxguard.services.access import Actor
from mxguard.web.deps import api_actor
from mxguard.web.routes.api_v1.schemas import Me

router = APIRouter(tags=["me"])


@router.get("/me", response_model=Me, summary="The caller")
async def me(actor: Actor = Depends(api_actor)) -> Me:
    return Me(email=actor.email or "", role=actor.role, org=actor.org, actor=actor.name)
