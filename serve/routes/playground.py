"""The pages a person opens in a browser: the playground (`/playground`, `/playground/train`)
and the API docs (`/docs`, `/redoc`), with every asset served by the ingress, so they work on a
machine without internet.

The playground is plain HTML, CSS and JS under serve/static/; Swagger UI and ReDoc come from the
`fastapi-offline` package, which ships their bundles (MIT). The pages are public (the ingress's
PUBLIC_PATHS); what they show comes from the API with the key the person types in.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from deployments.family import get_family
from deployments.schemas import EditRequest
from serve.auth import CanGenerate
from serve.routes.services import ServicesDep

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
DOCS_ASSETS_DIR = Path(str(files("fastapi_offline") / "static"))
# Mounted by `mount_assets`; public by prefix in the ingress's check_access. The pages refer to
# them, and to the API, by relative URLs: the app may be served under a route prefix.
PLAYGROUND_ASSETS = "/static/playground"
DOCS_ASSETS = "/static/docs"
DOCS_HREF = DOCS_ASSETS.removeprefix("/")  # from /docs and /redoc, which sit at the root
PAGES = ("/playground", "/playground/train", "/docs", "/redoc")
# The pages load from the ingress only. ReDoc's bundle shows a logo from its vendor's CDN (an
# <img> it hides when the load fails): this keeps even that request from leaving. The docs'
# bundles start with an inline script and inline styles; ReDoc's search runs in a blob: worker.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; worker-src 'self' blob:; connect-src 'self'"
)
SECURITY_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY}

router = APIRouter()


def mount_assets(app: FastAPI) -> None:
    """The pages' files: StaticFiles refuses paths that leave its folder."""
    app.mount(PLAYGROUND_ASSETS, StaticFiles(directory=STATIC_DIR), name="playground-assets")
    app.mount(DOCS_ASSETS, StaticFiles(directory=DOCS_ASSETS_DIR), name="docs-assets")


@router.get("/playground", include_in_schema=False)
async def playground() -> FileResponse:
    return FileResponse(
        STATIC_DIR / "playground.html", media_type="text/html", headers=SECURITY_HEADERS
    )


@router.get("/playground/train", include_in_schema=False)
async def playground_train() -> FileResponse:
    return FileResponse(STATIC_DIR / "train.html", media_type="text/html", headers=SECURITY_HEADERS)


@router.get("/docs", include_in_schema=False)
async def swagger_ui() -> HTMLResponse:
    page = get_swagger_ui_html(
        openapi_url="openapi.json",
        title="loraplex - Swagger UI",
        swagger_js_url=f"{DOCS_HREF}/swagger-ui-bundle.js",
        swagger_css_url=f"{DOCS_HREF}/swagger-ui.css",
        swagger_favicon_url=f"{DOCS_HREF}/favicon.png",
    )
    page.headers.update(SECURITY_HEADERS)
    return page


@router.get("/redoc", include_in_schema=False)
async def redoc() -> HTMLResponse:
    page = get_redoc_html(
        openapi_url="openapi.json",
        title="loraplex - ReDoc",
        redoc_js_url=f"{DOCS_HREF}/redoc.standalone.js",
        redoc_favicon_url=f"{DOCS_HREF}/favicon.png",
        with_google_fonts=False,
    )
    page.headers.update(SECURITY_HEADERS)
    return page


class Endpoint(BaseModel):
    """One deployment as a client picks it: where to POST, and what it takes by default."""

    name: str = Field(description="The deployment.")
    family: str
    endpoint: str = Field(description="POST /<endpoint> (LoRA optional) or /<endpoint>-lora.")
    output: str = Field(description="image or video.")
    media_type: str = Field(description="What the endpoint returns.")
    takes_image: bool = Field(description="An edit model: the body needs `image`.")
    width: int
    height: int
    steps: int


class Endpoints(BaseModel):
    models: list[Endpoint]


@router.get("/playground/models")
async def playground_models(services: ServicesDep, principal: CanGenerate) -> Endpoints:
    """The generation endpoints with their defaults: what a `generate` key may call (GET
    /models, with replicas and their hot adapters, needs `admin`)."""
    listed = []
    for model in services.config.models:
        family = get_family(model.family)
        defaults = model.generation_defaults()
        listed.append(
            Endpoint(
                name=model.name,
                family=model.family,
                endpoint=model.endpoint,
                output=family.output,
                media_type=family.media_type,
                takes_image=issubclass(family.request_model, EditRequest),
                width=defaults.width,
                height=defaults.height,
                steps=defaults.steps,
            )
        )
    return Endpoints(models=listed)
