"""Python client and CLI for the SAM3 server (``python -m clients``). Needs httpx, numpy,
pycocotools and Pillow; no torch, no onnxruntime."""

from clients.client import Sam3Client
from clients.errors import (
    ApiError,
    ClientError,
    InvalidResponse,
    RateLimited,
    RequestTimeout,
    ServerUnreachable,
)
from clients.results import Detection, EmbedResponse, Health, Mask, PromptResult, SegmentResponse
from clients.wire import Exemplar

__all__ = [
    "ApiError",
    "ClientError",
    "Detection",
    "EmbedResponse",
    "Exemplar",
    "Health",
    "InvalidResponse",
    "Mask",
    "PromptResult",
    "RateLimited",
    "RequestTimeout",
    "Sam3Client",
    "SegmentResponse",
    "ServerUnreachable",
]
