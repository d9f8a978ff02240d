"""Stand-in for ComfyUI's server.PromptServer: a route table custom nodes add to at import.

``make_app()`` does what ``add_routes`` does with the table: every route is served at its
path and again under ``/api``.
"""

from __future__ import annotations

from aiohttp import web


class PromptServer:
    instance: PromptServer | None = None

    def __init__(self):
        PromptServer.instance = self
        self.routes = web.RouteTableDef()
        self.messages: list[tuple] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data, sid))

    def make_app(self) -> web.Application:
        app = web.Application()
        api = web.RouteTableDef()
        for route in self.routes:
            if isinstance(route, web.RouteDef):
                api.route(route.method, "/api" + route.path, **route.kwargs)(route.handler)
        app.add_routes(api)
        app.add_routes(self.routes)
        return app
