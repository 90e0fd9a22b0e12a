"""The dashboard's routes: its pages and `/static/*`, from the files `tunesmith.dashboard` ships.

    tunesmith serve --model smollm2-135m-instruct     # then open http://127.0.0.1:8000/
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse
from starlette.exceptions import HTTPException

from tunesmith.dashboard import CONTENT_SECURITY_POLICY, PAGES, STATIC_DIR, media_type


def build_dashboard_router():
    """A router with the pages and `/static/*`; mount it without the API key dependency."""
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
        return FileResponse(shipped[name], media_type=media_type(name), headers=headers)

    for path in PAGES:
        router.add_api_route(path, page, methods=["GET"])
    router.add_api_route("/static/{name}", static, methods=["GET"])
    return router


def mount_dashboard(app) -> None:
    """Serve the dashboard on `app` (a `create_app` app); its API calls carry the key."""
    app.include_router(build_dashboard_router())
