"""A small OpenAI-shaped HTTP server standing in for one DWDP rank in router tests.

It is a real ASGI app on uvicorn with the same ``RankHeader`` middleware that
``vllm-dwdp serve`` adds to each rank's vLLM server, so what the router and the client see
is what they see in front of vLLM: ``/health``, ``/v1/models``, ``/v1/completions`` (plain
and streamed), ``/metrics``, and ``X-DWDP-Rank`` on every answer. ``--hang`` makes
completions never answer (a stuck engine) while ``/health`` stays up.

    python -m tests.dwdp.openai_rank_stub --rank 0 --port 8001 [--hang]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os


def build_app(rank: int, hang: bool):
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    from vllm_dwdp.serve_middleware import RankHeader

    served = {"completions": 0}

    async def health(_request):
        return PlainTextResponse("")

    async def models(_request):
        return JSONResponse({"object": "list", "data": [{"id": "stub", "object": "model"}]})

    async def completions(request):
        body = await request.json()
        if hang:
            await asyncio.sleep(3600)
        served["completions"] += 1
        text = f"rank{rank}"
        if body.get("stream"):
            async def events():
                for i in range(3):
                    chunk = {"object": "text_completion", "model": body.get("model"),
                             "choices": [{"index": 0, "text": f"{text}.{i}",
                                          "finish_reason": None}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                    await asyncio.sleep(0.01)
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        return JSONResponse({"id": f"cmpl-{rank}-{served['completions']}",
                             "object": "text_completion", "model": body.get("model"),
                             "choices": [{"index": 0, "text": text, "finish_reason": "length"}],
                             "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                       "total_tokens": 2}})

    async def metrics(_request):
        return PlainTextResponse(f'stub_completions_total{{rank="{rank}"}} '
                                 f'{served["completions"]}\n')

    app = Starlette(routes=[Route("/health", health), Route("/v1/models", models),
                            Route("/v1/completions", completions, methods=["POST"]),
                            Route("/metrics", metrics)])
    app.add_middleware(RankHeader)  # as vLLM does for `--middleware CLASS`
    return app


def main() -> None:
    import uvicorn

    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--hang", action="store_true")
    a = p.parse_args()
    os.environ["VLLM_DWDP_SERVE_RANK"] = str(a.rank)
    uvicorn.run(build_app(a.rank, a.hang), host="127.0.0.1", port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
