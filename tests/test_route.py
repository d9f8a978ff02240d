"""GET /lycoris/info and /lycoris/preview through an aiohttp test client on the stand-in server."""

# isort: skip_file
from __future__ import annotations

import asyncio

import pytest

aiohttp = pytest.importorskip("aiohttp")
import nodes_env as env  # noqa: E402
import server  # noqa: E402  (the stand-in, on sys.path via nodes_env)
from aiohttp.test_utils import TestClient, TestServer  # noqa: E402

from nodes import glue, routes  # noqa: E402
from nodes.info import InvalidName, adapter_info, check_name  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("route")
    folder = root / "loras"
    env.write_adapters(folder)
    (folder / "demo_lora.preview.png").write_bytes(PNG)
    (root / "secret.safetensors").write_bytes(b"outside")
    (root / "secret.png").write_bytes(PNG)
    env.use_loras(folder)
    glue.ADAPTERS.clear()
    return folder


def call(loras, *paths):
    async def go():
        srv = server.PromptServer()
        assert routes.register(srv.routes)
        client = TestClient(TestServer(srv.make_app()))
        await client.start_server()
        try:
            out = []
            for path in paths:
                resp = await client.get(path)
                body = await resp.read()
                out.append((resp.status, resp.headers.get("Content-Type", ""), body))
            return out
        finally:
            await client.close()

    return asyncio.run(go())


def test_info_json(loras):
    import json

    (status, kind, body), (status_api, _, body_api) = call(
        loras, "/lycoris/info?name=demo_lora.safetensors", "/api/lycoris/info?name=demo_lora.safetensors")
    assert status == 200 and status_api == 200 and kind.startswith("application/json")
    info = json.loads(body)
    assert json.loads(body_api) == info
    assert info["algorithms"] == {"lora": 6, "locon": 1} and info["ranks"] == {"8": 7} and info["alpha"] == {"4": 7}
    assert info["architecture"] == "sd1" and info["base_model"] == "sd_v1"
    assert info["trigger_words"][0] == "lycodemo" and "IN01" in info["blocks"]
    assert info["metadata"]["ss_network_module"] == "lycoris.kohya"
    assert info["preview_url"] == "/lycoris/preview?name=demo_lora.safetensors"


def test_subfolder_and_no_preview(loras):
    import json

    [(status, _, body)] = call(loras, "/lycoris/info?name=sub/w0.safetensors")
    info = json.loads(body)
    assert status == 200 and info["preview_url"] is None and info["has_preview"] is False
    assert set(info["algorithms"]) == {"lora+dora", "locon+dora", "ia3"}


@pytest.mark.parametrize("name", [
    "../secret.safetensors", "../../x", "sub/../../secret.safetensors", "/etc/passwd",
    "..%2Fsecret.safetensors", "..\\secret.safetensors", "", "C:/Windows/win.ini",
])
def test_traversal_is_refused(loras, name):
    for status, _, body in call(loras, f"/lycoris/info?name={name}", f"/lycoris/preview?name={name}"):
        assert status in (400, 404), (name, status)
        assert b"outside" not in body and PNG not in body


def test_unknown_and_unreadable(loras):
    (s1, _, _), (s2, _, _), (s3, _, b3), (s4, _, _) = call(
        loras, "/lycoris/info?name=nope.safetensors", "/lycoris/info",
        "/lycoris/info?name=not_an_adapter.safetensors", "/lycoris/preview?name=demo_loha.safetensors")
    assert (s1, s2, s3, s4) == (404, 400, 422, 404)
    assert b"not_an_adapter" in b3


def test_preview_served(loras):
    [(status, kind, body)] = call(loras, "/lycoris/preview?name=demo_lora.safetensors")
    assert status == 200 and kind == "image/png" and body == PNG


def test_pure_helpers(loras):
    info = adapter_info(glue.ADAPTERS.get(loras / "demo_lokr.safetensors"), "demo_lokr.safetensors")
    assert info["algorithms"] == {"lokr": 7} and info["modules"] == 7 and info["has_preview"] is False
    for bad in ("../a", "a/../../b", "/abs", "", None, "x\x00y"):
        with pytest.raises(InvalidName):
            check_name(bad)
    assert check_name("sub/w0.safetensors") == "sub/w0.safetensors"


def test_register_without_server_is_harmless(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "server", None)  # import server -> ImportError
    assert routes.register() is False
