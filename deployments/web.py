"""What both HTTP applications (rec's Aggregator and the /stream Pusher) answer alike: key
checks and 422s. Kept apart from deployments.ingress so that the Pusher's replicas start
without importing the pipeline (torch and the models)."""

from fastapi import HTTPException, Request
from pydantic import ValidationError

from rec.access import Access, AccessDenied, retry_after_header


class InvalidInput(HTTPException):
    """422 whose detail lists each bad field with its problem."""

    def __init__(self, exc: ValidationError | str, field: str = "body") -> None:
        if isinstance(exc, ValidationError):
            detail = [
                {"field": ".".join(str(p) for p in e["loc"]) or field, "error": e["msg"]}
                for e in exc.errors(include_url=False, include_input=False)
            ]
        else:
            detail = [{"field": field, "error": exc}]
        super().__init__(422, detail)


def allow(access: Access, request: Request, scope: str) -> None:
    """401 without a known key, 403 without the scope, 429 over the key's rate."""
    try:
        access.check(request.headers.get("x-api-key"), scope)
    except AccessDenied as exc:
        headers = None
        if exc.retry_after is not None:
            headers = {"Retry-After": retry_after_header(exc.retry_after)}
        raise HTTPException(exc.status, exc.detail, headers=headers) from None
