"""``Sam3Client``: a small typed httpx client for the SAM3 server.

Why a client at all: callers should not need to know that prompts are a repeated multipart
field, that errors are ``{"error": {"code", "message"}}``, or that a 429 carries a
``Retry-After`` to honour. Retries are bounded (count and total wait) so a saturated server
surfaces as :class:`~clients.errors.RateLimited` instead of a hang.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import httpx
from typing_extensions import Self

from clients.errors import ApiError, InvalidResponse, RequestTimeout, ServerUnreachable
from clients.results import EmbedResponse, Health, SegmentResponse
from clients.wire import (
    Exemplar,
    ImageInput,
    Prompt,
    form_fields,
    image_payload,
    json_body,
    json_document,
    raise_for_error,
    retry_after_seconds,
)

DEFAULT_TIMEOUT_S = 60.0
DEFAULT_RETRIES = 3
MAX_RETRY_WAIT_S = 30.0  # one Retry-After is capped here: the server's hint, not a blank cheque
RETRY_STATUSES = (429, 503)  # both carry Retry-After on this server: queue full / still warming

# Every request about an image carries an affinity key, the sha256 of its bytes: a load balancer
# can hash on it so an image's requests reach the server replica that caches its embedding
# (deploy/triton/k8s.yaml). Servers ignore it. The server's image_id is a keyed hash that the
# client cannot compute, so the client remembers which key goes with the ids it was given.
IMAGE_ID_HEADER = "X-Image-Id"
AFFINITY_MEMORY = 4096  # image ids remembered (64 + 64 characters each)


def image_id_header(data: bytes) -> dict[str, str]:
    return {IMAGE_ID_HEADER: hashlib.sha256(data).hexdigest()}


class Sam3Client:
    """Synchronous client. Use as a context manager, or call :meth:`close`."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        retries: int = DEFAULT_RETRIES,
        max_retry_wait_s: float = MAX_RETRY_WAIT_S,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.max_retry_wait_s = max_retry_wait_s
        self._sleep = sleep
        headers = {"X-API-Key": api_key} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers, transport=transport)
        self._affinity: OrderedDict[str, str] = OrderedDict()  # server image_id -> sha256 of the bytes

    def _remember(self, image_id: str, data: bytes) -> None:
        self._affinity[image_id] = hashlib.sha256(data).hexdigest()
        self._affinity.move_to_end(image_id)
        while len(self._affinity) > AFFINITY_MEMORY:
            self._affinity.popitem(last=False)

    def _affinity_header(self, image_id: str) -> dict[str, str]:
        return {IMAGE_ID_HEADER: self._affinity.get(image_id, image_id)}

    # ------------------------------------------------------------------ API

    def segment(self, image: ImageInput, prompts: Sequence[Prompt] | Prompt, **options: Any) -> SegmentResponse:
        """Upload an image (path, bytes, RGB array or PIL image) and segment it with ``prompts``:
        text, or :class:`Exemplar` boxes (with or without text); one result per prompt, in order.

        ``options``: ``score_threshold``, ``mask_threshold``, ``max_detections``, ``mask_format``
        (rle|png|polygon|none). The server caches the embedding: ``segment_cached`` with the
        returned ``image_id`` skips the upload and the image encoder.
        """
        prompts = [prompts] if isinstance(prompts, (str, Exemplar)) else list(prompts)
        name, data, media = image_payload(image)
        if any(isinstance(p, Exemplar) for p in prompts):
            # JSON keeps text and exemplar entries in one ordered list (form fields of two names
            # would be sent grouped by name).
            body = json_body(prompts, options, image=base64.b64encode(data).decode("ascii"))
            doc = self._request("POST", "/segment", json=body, headers=image_id_header(data))
        else:
            fields = form_fields([str(p) for p in prompts], options)
            doc = self._request("POST", "/segment", files={"image": (name, data, media)}, data=fields,
                                headers=image_id_header(data))
        response = SegmentResponse.from_json(doc)
        self._remember(response.image_id, data)
        return response

    def segment_cached(self, image_id: str, prompts: Sequence[Prompt] | Prompt, **options: Any) -> SegmentResponse:
        """Prompts (text or :class:`Exemplar`) on an image the server already holds; 404
        ``image_not_cached`` if evicted. A new box on a cached image costs only the decoder side."""
        prompts = [prompts] if isinstance(prompts, (str, Exemplar)) else list(prompts)
        doc = self._request("POST", "/segment", json=json_body(prompts, options, image_id=image_id),
                            headers=self._affinity_header(image_id))
        return SegmentResponse.from_json(doc)

    def embed(self, image: ImageInput) -> EmbedResponse:
        """Compute and cache the image embedding (e.g. when a frame arrives, before any prompt)."""
        name, data, media = image_payload(image)
        response = EmbedResponse.from_json(
            self._request("POST", "/embed", files={"image": (name, data, media)}, headers=image_id_header(data))
        )
        self._remember(response.image_id, data)
        return response

    def delete_embedding(self, image_id: str) -> None:
        self._request("DELETE", f"/embeddings/{image_id}", headers=self._affinity_header(image_id))

    def health(self) -> Health:
        """``/healthz`` (process up) and ``/readyz`` (engines warm); never retried."""
        doc = self._request("GET", "/healthz", retry=False)
        try:
            self._request("GET", "/readyz", retry=False)
            ready = True
        except ApiError as exc:
            if exc.status != 503:
                raise
            ready = False
        return Health(status=str(doc.get("status", "")), state=str(doc.get("state", "")), ready=ready)

    def info(self) -> dict[str, Any]:
        return self._request("GET", "/info")

    # ------------------------------------------------------------------ streams

    def start_stream(self, source: dict[str, str], prompts: Sequence[Prompt] | Prompt, **options: Any) -> dict[str, Any]:
        """POST /streams: ``source`` is ``{"file": name}``, ``{"url": url}`` or ``{"device": path}``;
        boxes in ``prompts`` are drawn on the first frame. Returns the stream's description."""
        listed = [prompts] if isinstance(prompts, (str, Exemplar)) else list(prompts)
        body = {"source": source, "prompts": [p if isinstance(p, str) else p.to_json() for p in listed],
                **{k: v for k, v in options.items() if v is not None}}
        return self._request("POST", "/streams", json=body, retry=False)

    def stream(self, stream_id: str) -> dict[str, Any]:
        return self._request("GET", f"/streams/{stream_id}")

    def stop_stream(self, stream_id: str) -> dict[str, Any]:
        return self._request("DELETE", f"/streams/{stream_id}", retry=False)

    def stream_events(self, stream_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """``("frame", event)`` per processed frame, then ``("end", {"state", "reason"})``:
        the Server-Sent Events of GET /streams/{id}/events (heartbeats skipped)."""
        with self._open_feed(f"/streams/{stream_id}/events") as response:
            kind = "message"
            for line in response.iter_lines():
                if line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:"):
                    yield kind, json.loads(line[5:])
                    if kind == "end":
                        return

    def stream_overlay(self, stream_id: str) -> Iterator[bytes]:
        """The JPEG of each processed frame with its tracks drawn (GET /streams/{id}/mjpeg)."""
        with self._open_feed(f"/streams/{stream_id}/mjpeg") as response:
            buffer = b""
            for chunk in response.iter_bytes():
                buffer += chunk
                while True:
                    head_end = buffer.find(b"\r\n\r\n")
                    if head_end < 0:
                        break
                    headers = buffer[:head_end].decode("latin-1").lower()
                    length = next((int(h.split(":", 1)[1]) for h in headers.split("\r\n")
                                   if h.startswith("content-length:")), None)
                    if length is None:
                        raise InvalidResponse("an MJPEG part without Content-Length")
                    if len(buffer) < head_end + 4 + length:
                        break
                    yield buffer[head_end + 4: head_end + 4 + length]
                    buffer = buffer[head_end + 4 + length:].lstrip(b"\r\n")

    @contextlib.contextmanager
    def _open_feed(self, path: str) -> Iterator[httpx.Response]:
        # A feed is quiet between frames (heartbeats every 15 s): no read deadline shorter than that.
        timeout = httpx.Timeout(self._http.timeout.connect, read=max(60.0, self._http.timeout.read or 0.0))
        url = f"{self.base_url}{path}"
        try:
            with self._http.stream("GET", path, timeout=timeout) as response:
                if response.status_code >= 400:
                    response.read()
                    raise_for_error(response)
                yield response
        except httpx.ConnectError as exc:
            raise ServerUnreachable(f"cannot connect to {url}: {_reason(exc)} (is the server running?)") from None
        except httpx.TimeoutException:
            raise RequestTimeout(f"GET {url}: no data for {timeout.read} s") from None

    # ------------------------------------------------------------------ plumbing

    def _request(self, method: str, path: str, *, retry: bool = True, **kwargs: Any) -> dict[str, Any]:
        attempts = 1 + (self.retries if retry else 0)
        for attempt in range(attempts):
            response = self._send(method, path, **kwargs)
            if response.status_code in RETRY_STATUSES and attempt + 1 < attempts:
                self._sleep(self._retry_wait(response, attempt))
                continue
            return json_document(response)
        raise AssertionError("unreachable")  # pragma: no cover - the loop always returns or raises

    def _retry_wait(self, response: httpx.Response, attempt: int) -> float:
        hinted = retry_after_seconds(response)
        wait = hinted if hinted is not None else 0.5 * 2**attempt  # no hint: short exponential back-off
        return min(wait, self.max_retry_wait_s)

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        url = f"{self.base_url}{path}"
        try:
            return self._http.request(method, path, **kwargs)
        except httpx.ConnectError as exc:
            raise ServerUnreachable(f"cannot connect to {url}: {_reason(exc)} (is the server running?)") from None
        except httpx.TimeoutException as exc:
            kind = type(exc).__name__.replace("Timeout", " timeout").lower().strip()
            raise RequestTimeout(f"{method} {url}: {kind} after {self._http.timeout.read} s") from None
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"{method} {url}: {_reason(exc)}") from None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reason(exc: Exception) -> str:
    text = str(exc).strip()
    if "refused" in text.lower():
        return "connection refused"
    return text or type(exc).__name__
