"""HTTP routes for the front end: ``GET /lycoris/info`` and ``GET /lycoris/preview``.

Both take ``?name=`` (a file name as listed for the ``loras`` folder) and resolve it
only through ``folder_paths.get_full_path("loras", name)``: a name that climbs out of
the folder is refused (400), an unknown one is 404.  The preview route serves only an
image sitting beside the resolved adapter file; it never takes an image path.
Handlers stay thin: the JSON comes from ``info.adapter_info``.
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import quote

from lycoris_core.adapter.metadata import preview_image
from lycoris_core.errors import LycorisError

from . import glue
from .info import InvalidName, adapter_info, check_name

log = logging.getLogger("comfyui-lycoris")

INFO_PATH = "/lycoris/info"
PREVIEW_PATH = "/lycoris/preview"
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}


def resolve(name: str | None) -> tuple[int, str]:
    """(200, full path) or (status, message) for a requested adapter name."""
    try:
        check_name(name)
    except InvalidName as exc:
        return 400, str(exc)
    import folder_paths

    path = folder_paths.get_full_path(glue.LORA_FOLDER, name)
    if path is None:
        return 404, f"no adapter named {name!r} in the loras folder"
    return 200, path


def info_for(name: str, path: str) -> dict:
    info = adapter_info(glue.ADAPTERS.get(path), name)
    info["preview_url"] = f"{PREVIEW_PATH}?name={quote(name)}" if info["has_preview"] else None
    return info


async def info_handler(request):
    from aiohttp import web

    name = request.rel_url.query.get("name")
    status, found = resolve(name)
    if status != 200:
        return web.json_response({"error": found}, status=status)
    try:
        info = await asyncio.get_running_loop().run_in_executor(None, info_for, name, found)
    except LycorisError as exc:
        return web.json_response({"error": str(exc)}, status=422)
    except OSError:
        return web.json_response({"error": f"cannot read {name!r}"}, status=404)
    return web.json_response(info)


async def preview_handler(request):
    from aiohttp import web

    name = request.rel_url.query.get("name")
    status, found = resolve(name)
    if status != 200:
        return web.json_response({"error": found}, status=status)
    image = preview_image(found)
    if image is None:
        return web.json_response({"error": f"no preview image beside {name!r}"}, status=404)
    kind = IMAGE_TYPES.get(image.suffix.lower(), "application/octet-stream")
    return web.FileResponse(image, headers={"Content-Type": kind, "Cache-Control": "no-cache"})


def register(routes=None) -> bool:
    """Add both routes to ComfyUI's route table (or to ``routes``); False without a server."""
    if routes is None:
        try:
            from server import PromptServer
        except Exception:  # not running inside ComfyUI
            return False
        instance = getattr(PromptServer, "instance", None)
        if instance is None:
            return False
        routes = instance.routes
    routes.get(INFO_PATH)(info_handler)
    routes.get(PREVIEW_PATH)(preview_handler)
    return True
