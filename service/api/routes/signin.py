"""The dashboard's sign-in page: a token entered once becomes a session cookie.

Not part of the REST API (``/v1`` takes ``Authorization: Bearer`` only); kept out of the
OpenAPI schema. The cookie is signed, ``HttpOnly``, ``SameSite=Strict``, and ``Secure``
when the server's public URL is https (:mod:`service.auth`).
"""

from __future__ import annotations

import html
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from service import auth
from service.api.deps import BackendDep
from service.errors import Unauthorized

router = APIRouter(include_in_schema=False)

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>lstm-hpo: sign in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, sans-serif; background: #f5f5f5; display: flex;
       justify-content: center; margin-top: 12vh; }}
form {{ background: white; padding: 2em 2.5em; border-radius: 8px;
       box-shadow: 0 1px 4px rgba(0,0,0,.15); width: 26em; }}
h1 {{ font-size: 1.3em; margin-top: 0; }}
input[type=password] {{ width: 100%; padding: .6em; font-size: 1em; box-sizing: border-box; }}
button {{ margin-top: 1em; padding: .6em 1.4em; font-size: 1em; }}
.error {{ color: #b00020; }} .hint {{ color: #555; font-size: .9em; }}
</style></head>
<body><form method="post" action="/signin">
<h1>lstm-hpo dashboard</h1>
{error}
<label for="token">API token</label>
<input type="password" id="token" name="token" autocomplete="current-password" autofocus required>
<input type="hidden" name="next" value="{next}">
<button type="submit">Sign in</button>
<p class="hint">No token? Ask an admin, or on the server:
<code>lstm-hpo token create NAME</code></p>
</form></body></html>
"""


def _page(next_path: str, error: str = "", status: int = 200) -> HTMLResponse:
    shown = f'<p class="error">{html.escape(error)}</p>' if error else ""
    return HTMLResponse(
        _PAGE.format(error=shown, next=html.escape(next_path, quote=True)), status_code=status
    )


def _safe_next(value: str | None) -> str:
    """A path on this server to return to (never another site: no open redirect)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\\\" in value:
        return "/dashboard"
    return value


@router.get("/signin")
def signin_page(next: str | None = None) -> HTMLResponse:
    """The sign-in form."""
    return _page(_safe_next(next))


@router.post("/signin")
async def signin(request: Request, backend: BackendDep) -> Response:
    """Check the token, set the session cookie and go back to where the user was."""
    form = parse_qs((await request.body()).decode("utf-8", errors="replace"))
    token = (form.get("token") or [""])[0].strip()
    next_path = _safe_next((form.get("next") or [""])[0])
    cookies: auth.SessionCookies = request.app.state.session_cookies
    try:
        principal, cookie = await run_in_threadpool(cookies.issue, backend.sessions, token)
    except Unauthorized as err:
        return _page(next_path, f"Not signed in: {err.message}", status=401)
    response = RedirectResponse(next_path, status_code=303)
    response.set_cookie(
        auth.SESSION_COOKIE,
        cookie,
        max_age=auth.SESSION_MAX_AGE_S,
        httponly=True,
        samesite="strict",
        secure=request.app.state.secure_cookies,
        path="/",
    )
    response.headers["X-Lstm-Hpo-Principal"] = principal.name
    return response


@router.post("/signout")
def signout() -> Response:
    """Forget the session cookie."""
    response = RedirectResponse("/signin", status_code=303)
    # Forgets the cookie in this browser; the signed value stays valid until it expires
    # (12 h) unless the token is revoked (`lstm-hpo token revoke NAME`).
    response.delete_cookie(auth.SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response
