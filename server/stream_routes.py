"""Routes of live streams (server/streams.py): start, list, read, stop, and the two feeds.

The feeds are long responses: Server-Sent Events of per-frame results (``/events``) and an
MJPEG overlay (``/mjpeg``, ``multipart/x-mixed-replace``) a browser shows as a live image. Both
end when the stream ends; a client that goes away frees its subscription.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import StreamingResponse

from server.auth import require_api_key
from server.bodies import exemplar_prompt
from server.routes import ERROR_RESPONSES
from server.schemas import ErrorResponse, RequestModels, StreamCreate, StreamList, StreamOut
from server.streams import LiveStream, StreamManager, StreamRequest, feed_items

STREAM_ID = r"^[0-9a-f]{16}$"
BOUNDARY = "frame"
# A feed is read as it is written: no caching, no proxy buffering (nginx honours X-Accel-Buffering).
FEED_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def get_streams(request: Request) -> StreamManager:
    manager: StreamManager = request.app.state.streams
    return manager


_ERRORS = {**ERROR_RESPONSES,
           403: {"model": ErrorResponse, "description": "source_not_allowed: the operator's settings forbid the source"},
           404: {"model": ErrorResponse, "description": "stream_not_found"},
           429: {"model": ErrorResponse, "description": "too_many_streams, or queue_full (see Retry-After)"}}
streams_api = APIRouter(dependencies=[Depends(require_api_key)], tags=["streams"], responses=_ERRORS)
StreamId = Path(..., pattern=STREAM_ID, description="A stream id from POST /streams.")


@streams_api.post("/streams", response_model=StreamOut, status_code=201,
                  summary="Start segmenting and tracking a video source")
async def start_stream(
    request: Request, manager: StreamManager = Depends(get_streams), namespace: str = Depends(require_api_key),
) -> dict[str, Any]:
    # The body's model is the server's (its limits documented in it: server/schemas.py).
    models: RequestModels = request.app.state.requests
    body: StreamCreate = models.stream_create.model_validate_json(await request.body())
    kind, value = body.source.kind()
    prompts = [p if isinstance(p, str) else exemplar_prompt(p, i) for i, p in enumerate(body.prompts)]
    asked = StreamRequest(kind, value, prompts, body.max_fps, body.score_threshold, body.mask_format)
    return (await manager.start(asked, namespace)).describe()


@streams_api.get("/streams", response_model=StreamList, summary="This API key's streams")
async def list_streams(
    manager: StreamManager = Depends(get_streams), namespace: str = Depends(require_api_key),
) -> dict[str, Any]:
    return {"streams": [s.describe() for s in manager.list(namespace)]}


@streams_api.get("/streams/{stream_id}", response_model=StreamOut, summary="A stream's state and counters")
async def get_stream(
    stream_id: str = StreamId, manager: StreamManager = Depends(get_streams),
    namespace: str = Depends(require_api_key),
) -> dict[str, Any]:
    return manager.get(stream_id, namespace).describe()


@streams_api.delete("/streams/{stream_id}", response_model=StreamOut, summary="Stop a stream and forget it")
async def stop_stream(
    stream_id: str = StreamId, manager: StreamManager = Depends(get_streams),
    namespace: str = Depends(require_api_key),
) -> dict[str, Any]:
    return (await manager.stop(stream_id, namespace)).describe()


@streams_api.get(
    "/streams/{stream_id}/events",
    summary="Per-frame results as Server-Sent Events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                     "description": "`event: frame` with the frame's JSON; `event: end` with the final state."}},
)
async def stream_events(
    stream_id: str = StreamId, manager: StreamManager = Depends(get_streams),
    namespace: str = Depends(require_api_key),
) -> StreamingResponse:
    stream = manager.get(stream_id, namespace)
    return StreamingResponse(_sse(stream), media_type="text/event-stream",
                             headers=FEED_HEADERS)


@streams_api.get(
    "/streams/{stream_id}/mjpeg",
    summary="The stream's frames with its tracks drawn, as MJPEG",
    response_class=StreamingResponse,
    responses={200: {"content": {f"multipart/x-mixed-replace; boundary={BOUNDARY}": {"schema": {"type": "string"}}},
                     "description": "One JPEG part per processed frame, until the stream ends."}},
)
async def stream_mjpeg(
    stream_id: str = StreamId, manager: StreamManager = Depends(get_streams),
    namespace: str = Depends(require_api_key),
) -> StreamingResponse:
    stream = manager.get(stream_id, namespace)
    return StreamingResponse(_mjpeg(stream), media_type=f"multipart/x-mixed-replace; boundary={BOUNDARY}",
                             headers=FEED_HEADERS)


async def _sse(stream: LiveStream) -> AsyncIterator[bytes]:
    async for item in feed_items(stream, stream.subscribe()):
        if item == b"":
            yield b": keepalive\n\n"
        else:
            yield b"event: frame\ndata: " + json.dumps(item, separators=(",", ":")).encode() + b"\n\n"
    end = {"state": stream.state, "reason": stream.reason}
    yield b"event: end\ndata: " + json.dumps(end).encode() + b"\n\n"


async def _mjpeg(stream: LiveStream) -> AsyncIterator[bytes]:
    async for item in feed_items(stream, stream.subscribe(overlay=True)):
        if item == b"":
            continue  # nothing to show yet; the next part is the next frame
        yield (f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(item)}\r\n\r\n".encode()
               + item + b"\r\n")
