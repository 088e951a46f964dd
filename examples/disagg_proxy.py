"""A disaggregated-serving proxy: one OpenAI-compatible endpoint in front of a prefill instance
and a decode instance of `hallm serve` joined by a KV connector.

Each completion or chat request goes first to the prefill instance with max_tokens=1 (it computes
the prompt and hands its KV to the decode instance, through `p2p` or `shared_storage`), then,
unchanged, to the decode instance, which loads the KV instead of computing the prompt and
answers (streamed when the client asked for it). A failed hand-over costs only speed: the
decode instance computes what it did not receive.

    hallm serve MODEL --port 8100 --kv-transfer-config \
        '{"kv_connector": "p2p", "kv_role": "kv_producer", "kv_connector_extra_config": {"kv_peer": "127.0.0.1:14579"}}'
    hallm serve MODEL --port 8200 --kv-transfer-config \
        '{"kv_connector": "p2p", "kv_role": "kv_consumer", "kv_connector_extra_config": {"kv_listen_port": 14579}}'
    python examples/disagg_proxy.py --prefill http://127.0.0.1:8100 --decode http://127.0.0.1:8200 --port 8000
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse


def prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    """The request as the prefill instance gets it: one token, no streaming, one sample."""
    out = {k: v for k, v in body.items() if k not in ("stream", "stream_options", "max_completion_tokens")}
    out.update(max_tokens=1, n=1)
    return out


def make_app(prefill_url: str, decode_url: str, timeout: float = 600.0) -> FastAPI:
    app = FastAPI(title="hallm disaggregated proxy")

    def forward_headers(request: Request) -> dict[str, str]:
        auth = request.headers.get("authorization")
        return {"Authorization": auth} if auth else {}

    async def relay(request: Request, path: str) -> Response:
        body = await request.json()
        headers = forward_headers(request)
        async with httpx.AsyncClient(timeout=timeout) as client:
            first = await client.post(f"{prefill_url}{path}", json=prefill_body(body), headers=headers)
        if first.status_code != 200:  # a bad request: the prefill instance's answer says why
            return Response(first.content, first.status_code, media_type="application/json")
        if not body.get("stream"):
            async with httpx.AsyncClient(timeout=timeout) as client:
                r = await client.post(f"{decode_url}{path}", json=body, headers=headers)
            return Response(r.content, r.status_code, media_type=r.headers.get("content-type"))

        async def stream() -> AsyncIterator[bytes]:
            async with (
                httpx.AsyncClient(timeout=timeout) as client,
                client.stream("POST", f"{decode_url}{path}", json=body, headers=headers) as r,
            ):
                async for chunk in r.aiter_raw():
                    yield chunk

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await relay(request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await relay(request, "/v1/chat/completions")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        async with httpx.AsyncClient(timeout=timeout) as client:
            r = await client.get(f"{decode_url}/v1/models", headers=forward_headers(request))
        return JSONResponse(r.json(), r.status_code)

    return app


def main() -> None:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prefill", required=True, help="the prefill instance's URL (kv_producer)")
    p.add_argument("--decode", required=True, help="the decode instance's URL (kv_consumer)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    args = p.parse_args()
    uvicorn.run(make_app(args.prefill.rstrip("/"), args.decode.rstrip("/")), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
