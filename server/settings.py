"""Every server knob in one pydantic-settings class.

Values come from (highest first) CLI flags (``python -m server``), environment variables with
the ``SAM3_`` prefix, then the defaults below. The names are a public contract: the Dockerfile,
docker-compose.yml and server/README.md list them, and a test checks they agree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from engines.factory import BACKEND_KINDS, PLAN_PRECISIONS
from engines.options import DEFAULT_MAX_PROMPT_CHARS, DEFAULT_MAX_PROMPTS

GIB = 1 << 30
MIB = 1 << 20


class ApiKey(BaseModel):
    """One client: its key, and the name of its namespace (ids, cache entries, metrics)."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    key: SecretStr = Field(..., min_length=1)


class Settings(BaseSettings):
    """Server configuration (env prefix ``SAM3_``)."""

    model_config = SettingsConfigDict(env_prefix="SAM3_", extra="ignore", frozen=True)

    bundle: Path | None = Field(None, description="Bundle directory (manifest.json + ONNX graphs).")
    backend: str = Field("auto", description="Inference backend.", json_schema_extra={"enum": list(BACKEND_KINDS)})
    engines_dir: Path | None = Field(
        None, description="Where TensorRT plans live (default <bundle>/engines; the container uses a volume)."
    )
    precision: str = Field(PLAN_PRECISIONS[0], description="TensorRT plan precision to build/load.",
                           json_schema_extra={"enum": list(PLAN_PRECISIONS)})
    # --backend triton: the three parts run on a Triton Inference Server (engines/triton.py);
    # the embedding cache, limits and API stay here. docs/triton.md.
    triton_url: str | None = Field(None, description="gRPC host:port of the Triton server (backend triton).")
    triton_model_prefix: str = Field("sam3", description="Model name prefix used by `python -m export triton`.")
    triton_timeout_s: float = Field(
        10.0, gt=0, description="Bound on each Triton call; a dead Triton is a 503 after at most this."
    )
    triton_wait_s: float = Field(
        600.0, ge=0, description="How long startup waits for Triton and its models (not ready meanwhile)."
    )
    # Local engines run one job at a time on one thread; with Triton several requests can be in
    # flight, so Triton's batcher combines them and the parts of different requests overlap.
    triton_concurrency: int = Field(4, ge=1, description="Requests in flight to Triton at once (backend triton).")
    host: str = Field("127.0.0.1", description="Bind address; the container sets 0.0.0.0.")
    port: int = Field(8000, ge=1, le=65535)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    # An fp16 SAM3 image embedding is ~58 MB (fp32 ~117 MB): 1 GiB holds ~17 fp16 images and
    # leaves the rest of an 8 GB Orin Nano (shared CPU/GPU memory) to engines and activations.
    cache_bytes: int = Field(1 * GIB, ge=0, description="Image-embedding cache bound, in bytes.")
    # FP16 engines compute the embedding in fp16 anyway, so storing it in fp16 halves its bytes
    # at no cost; with fp32 graphs (ONNX Runtime) fp16 storage would change answers (~1e-3).
    cache_dtype: Literal["auto", "float16", "float32"] = Field(
        "auto", description="Cached embedding dtype; auto = float16 when the engines run in FP16, else float32."
    )
    text_cache_entries: int = Field(1024, ge=0, description="Text-embedding LRU size (prompts).")

    api_key: SecretStr | None = Field(None, description="If set, X-API-Key must match (401 otherwise).")
    # Several clients, each with its own namespace of image ids and cached embeddings
    # (server/auth.py): "name:key,name2:key2". SAM3_API_KEY is the key of the name "default".
    api_keys: Annotated[tuple[ApiKey, ...], NoDecode] = Field(
        (), description="name:key pairs, comma-separated; each name is a separate namespace."
    )
    metrics_need_key: bool = Field(False, description="/metrics needs an API key too (when keys are set).")
    # Image ids are HMAC-SHA256(secret, namespace, bytes): without the secret an id says nothing
    # about the bytes (server/image_ids.py). Configured (replicas that must agree) or persisted.
    id_secret: SecretStr | None = Field(None, description="Secret of the keyed image ids (default: persisted file).")
    id_secret_file: Path | None = Field(
        None, description="Where the generated id secret is kept (default ~/.local/state/sam3-edge/id-secret)."
    )
    max_upload_bytes: int = Field(20 * MIB, ge=1, description="Largest image file accepted (413).")
    # The request limits are the pipeline's (engines.options.Limits). The megapixel default is an
    # 8 GB Orin Nano's (docs/deploy-jetson.md, memory budget): decoding costs ~8 bytes per pixel.
    max_megapixels: float = Field(24.0, gt=0, description="Largest image, from its header (413).")
    max_prompts: int = Field(DEFAULT_MAX_PROMPTS, ge=1, description="Prompts per request (422 above).")
    max_prompt_chars: int = Field(DEFAULT_MAX_PROMPT_CHARS, ge=1, description="Characters per prompt (422 above).")
    # The pipeline keeps every detection over the threshold; a server answer is capped.
    max_detections: int = Field(100, ge=1, description="Default cap on detections per prompt.")
    # Prompts x detections: what bounds a request's masks (each kept as its low-resolution
    # probabilities until encoded: 332 kB at full SAM3 size). Each of P prompts returns at most
    # min(max_detections, max_masks // P) detections.
    max_masks: int = Field(256, ge=1, description="Detections (masks) per request, all prompts together.")
    # Decoded images are the largest transient (8 bytes per pixel at the peak): at most this many
    # exist at once, from decoding until the image encoder has read them.
    decode_concurrency: int = Field(2, ge=1, description="Images decoded (and held until encoded) at once.")
    header_timeout_s: float = Field(10.0, gt=0, description="A request's headers must arrive within this.")
    # An admitted request holds its slot while it uploads: a slow sender is cut off after this.
    body_timeout_s: float = Field(30.0, gt=0, description="A request's body must arrive within this (408 after).")
    cors_origins: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="Origins allowed cross-origin calls (default none: same origin only)."
    )
    trusted_hosts: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="Accepted Host headers (default any); '*.example.com' wildcards."
    )
    allowed_content_types: Annotated[tuple[str, ...], NoDecode] = Field(
        ("image/jpeg", "image/png", "image/webp", "image/bmp", "image/tiff", "application/octet-stream"),
        description="Declared upload types accepted (415 otherwise); octet-stream is sniffed by the decoder.",
    )

    # Admission comes first: a request takes one of these slots before its body is read and keeps
    # it until answered, so a full server answers 429 at once and never reads the image.
    queue_size: int = Field(16, ge=1, description="Requests in progress at once (429 above, before reading).")
    request_timeout_s: float = Field(30.0, gt=0, description="Per-request deadline (504 after it).")
    shutdown_timeout_s: float = Field(30.0, ge=0, description="How long SIGTERM waits for in-flight work.")
    warmup: bool = Field(True, description="Run one dummy inference before reporting ready.")

    # Live video (server/streams.py): a running stream holds one admission slot and its frames
    # take turns with requests on the one inference worker.
    max_streams: int = Field(2, ge=0, description="Live streams at once (0: POST /streams is off).")
    stream_max_fps: float = Field(10.0, gt=0, description="Highest processed frame rate of a stream.")
    media_dir: Path | None = Field(None, description="Directory whose video files streams may play (source.file).")
    stream_allowed_hosts: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="Hosts, IP addresses or CIDR ranges URL sources may reach (default none: no URLs)."
    )
    stream_devices: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="Capture devices streams may open, e.g. /dev/video0 (default none)."
    )
    stream_timeout_s: float = Field(10.0, gt=0, description="A source silent this long fails (opening or stalled).")

    @model_validator(mode="after")
    def _triton_needs_url(self) -> "Settings":
        if self.backend == "triton" and not self.triton_url:
            raise ValueError("backend triton needs triton_url (--triton-url host:port, SAM3_TRITON_URL)")
        return self

    @field_validator("backend", "precision")
    @classmethod
    def _one_of_the_runtime_names(cls, value: str, info: ValidationInfo) -> str:
        # The names are engines.factory's table, so the server, python -m engines and the
        # container entrypoint accept the same words.
        allowed = BACKEND_KINDS if info.field_name == "backend" else PLAN_PRECISIONS
        if value not in allowed:
            raise ValueError(f"{info.field_name} must be one of {', '.join(allowed)}, got {value!r}")
        return value

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_unset(cls, value: object) -> object:
        # docker compose passes SAM3_API_KEY="" when the host variable is unset: that means "off",
        # not "the key is the empty string" (which would 401 every client that sends a key).
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        return value

    @field_validator("allowed_content_types", mode="before")
    @classmethod
    def _split_types(cls, value: object) -> object:
        # Env vars carry "image/jpeg,image/png"; JSON lists also work.
        if isinstance(value, str):
            return tuple(v.lower() for v in _split_list(value))
        return value

    @field_validator("cors_origins", "trusted_hosts", "stream_allowed_hosts", "stream_devices", mode="before")
    @classmethod
    def _split_lists(cls, value: object) -> object:
        return _split_list(value) if isinstance(value, str) else value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_keys(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        keys = []
        for item in _split_list(value):
            name, sep, key = item.partition(":")
            if not sep:
                raise ValueError("SAM3_API_KEYS takes name:key pairs separated by commas")
            keys.append(ApiKey(name=name.strip(), key=SecretStr(key.strip())))
        return tuple(keys)

    @model_validator(mode="after")
    def _keys_are_distinct(self) -> "Settings":
        keys = self.keys()
        names = [k.name for k in keys]
        secrets = [k.key.get_secret_value() for k in keys]
        if len(set(names)) != len(names) or len(set(secrets)) != len(secrets):
            raise ValueError("API key names and keys must be distinct (SAM3_API_KEY is the name 'default')")
        if self.max_masks < self.max_prompts:
            raise ValueError(f"max_masks ({self.max_masks}) must be at least max_prompts ({self.max_prompts})")
        return self

    def keys(self) -> tuple[ApiKey, ...]:
        """Every configured key: SAM3_API_KEY (name "default") and SAM3_API_KEYS."""
        single = () if self.api_key is None else (ApiKey(name="default", key=self.api_key),)
        return single + tuple(self.api_keys)

    @property
    def max_body_bytes(self) -> int:
        """Request-body bound: a base64 image is 4/3 of its bytes, plus room for the form/JSON."""
        return self.max_upload_bytes * 4 // 3 + 64 * 1024 + self.max_prompts * self.max_prompt_chars * 8


def _split_list(value: str) -> tuple[str, ...]:
    text = value.strip()
    items = json.loads(text) if text.startswith("[") else text.split(",")
    return tuple(str(v).strip() for v in items if str(v).strip())


ENV_VARS: tuple[str, ...] = tuple(f"SAM3_{name.upper()}" for name in Settings.model_fields)
