"""The web dashboard served at `/` by `tunesmith serve`: jobs, live curves, playground, models.

Static files only (an HTML shell, CSS and a few ES modules in `static/`, shipped as package
data); every number the pages show is fetched by the browser from the same public API the
`openai` client uses, with the API key the page asks for once. So its routes (built in
`tunesmith.serve.dashboard`, the HTTP side) need no key and hold no state.

    tunesmith serve --model smollm2-135m-instruct     # then open http://127.0.0.1:8000/
"""

from __future__ import annotations

from pathlib import Path

STATIC_DIR = Path(__file__).parent / "static"
PAGES = ("/", "/jobs/new", "/jobs/{job_id}", "/sweeps", "/playground", "/models")
"""Paths that answer the HTML shell; the page's script draws the one the path names."""

# Nothing outside this server may be loaded: no CDN, no inline script. Downloads use blob: URLs.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


def media_type(name: str) -> str:
    """The Content-Type a shipped file is served with."""
    suffix = Path(name).suffix
    return {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
            ".svg": "image/svg+xml", ".html": "text/html; charset=utf-8"}.get(suffix, "application/octet-stream")
