"""The web dashboard served at `/` by `tunesmith serve`: jobs, live curves, playground, models.

Static files only (an HTML shell, CSS and a few ES modules in `static/`, shipped as package
data); every number the pages show is fetched by the browser from the same public API the
`openai` client uses, with the API key the page asks for once. So the routes here need
no key and hold no state.

    tunesmith serve --model smollm2-135m-instruct     # then open http://127.0.0.1:8000/
"""

from __future__ import annotations

from pathlib import Path

STATIC_DIR = Path(__file__).parent / "static"
PAGES = ("/", "/jobs/new", "/jobs/{job_id}", "/playground", "/models")
"""Paths that answer the HTML shell; the page's script draws the one the path names."""

# Nothing outside this server may be loaded: no CDN, no inline script. Downloads use blob: URLs.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


def build_dashboard_router():
    """A router with the pages and `/static/*`; mount it without the API key dependency."""
    from fastapi import APIRouter
    from fastapi.responses import FileResponse
    from starlette.exceptions import HTTPException

    router = APIRouter(include_in_schema=False)
    headers = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-cache",
               "X-Content-Type-Options": "nosniff"}

    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=headers)

    # Only the files shipped in static/ (no subfolders, no dot files): a path from the URL is
    # never joined onto the file system.
    shipped = {p.name: p for p in STATIC_DIR.iterdir() if p.is_file() and not p.name.startswith(".")}

    async def static(name: str) -> FileResponse:
        if name not in shipped:
            raise HTTPException(404, f"no dashboard file '{name}'")
        return FileResponse(shipped[name], media_type=_media_type(name), headers=headers)

    for path in PAGES:
        router.add_api_route(path, page, methods=["GET"])
    router.add_api_route("/static/{name}", static, methods=["GET"])
    return router


def mount_dashboard(app) -> None:
    """Serve the dashboard on `app` (a `create_app` app); its API calls carry the key."""
    app.include_router(build_dashboard_router())


def _media_type(name: str) -> str:
    suffix = Path(name).suffix
    return {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
            ".svg": "image/svg+xml", ".html": "text/html; charset=utf-8"}.get(suffix, "application/octet-stream")
