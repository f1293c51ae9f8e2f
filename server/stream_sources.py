"""Which video sources a stream may open: the operator decides, the client only names one.

- ``file``: a name under ``SAM3_MEDIA_DIR`` (resolved; no path may leave the directory).
- ``url``: rtsp, rtsps, http or https, to a host ``SAM3_STREAM_ALLOWED_HOSTS`` lists, by name
  or by an address range its name resolves into. By default the list is empty: no URL is
  opened, so a client cannot make the server reach into its private network.
- ``device``: a capture device ``SAM3_STREAM_DEVICES`` lists (V4L2, e.g. /dev/video0).

A name is resolved once, here, to check it; FFmpeg resolves it again when it connects, so an
allow-listed *name* is trusted to keep pointing where the operator meant (list address ranges
where DNS is not trusted).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from server.errors import InvalidSource, SourceNotAllowed
from server.settings import Settings

URL_SCHEMES = ("rtsp", "rtsps", "http", "https")


@dataclass(frozen=True)
class OpenSpec:
    """What engines.video.VideoSource opens, and how the source is shown to clients."""

    target: str
    shown: str  # credentials removed
    input_format: str | None = None
    options: dict[str, str] = field(default_factory=dict)
    live: bool = True  # a file is played in real time, as a camera would deliver it


def resolve_source(kind: str, value: str, settings: Settings) -> OpenSpec:
    if kind == "file":
        return _file(value, settings)
    if kind == "url":
        return _url(value, settings)
    if kind == "device":
        if value not in settings.stream_devices:
            raise SourceNotAllowed(f"device {value!r} is not in SAM3_STREAM_DEVICES")
        return OpenSpec(value, value, input_format="v4l2")
    raise InvalidSource(f"source kind {kind!r} is not one of file, url, device")


def _file(name: str, settings: Settings) -> OpenSpec:
    if settings.media_dir is None:
        raise SourceNotAllowed("file sources are off: the server has no SAM3_MEDIA_DIR")
    root = settings.media_dir.resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root) or path == root:
        raise SourceNotAllowed(f"{name!r} is not a file under the media directory")
    if not path.is_file():
        raise InvalidSource(f"no file {name!r} in the media directory")
    return OpenSpec(str(path), name)


def _url(url: str, settings: Settings) -> OpenSpec:
    try:
        parts = urlsplit(url)
        host = parts.hostname
        port = parts.port
    except ValueError as exc:
        raise InvalidSource(f"malformed URL: {exc}") from None
    if parts.scheme not in URL_SCHEMES:
        raise InvalidSource(f"URL scheme {parts.scheme!r} is not one of {', '.join(URL_SCHEMES)}")
    if not host:
        raise InvalidSource("the URL has no host")
    if not _host_allowed(host, port, settings.stream_allowed_hosts):
        raise SourceNotAllowed(f"host {host!r} is not in SAM3_STREAM_ALLOWED_HOSTS")
    netloc = host if port is None else f"{host}:{port}"
    shown = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    options = {"rtsp_transport": "tcp"} if parts.scheme.startswith("rtsp") else {}
    return OpenSpec(url, shown, options=options)


def _host_allowed(host: str, port: int | None, allowed: tuple[str, ...]) -> bool:
    host = host.lower().rstrip(".")
    names = {a.lower().rstrip(".") for a in allowed if not _network(a)}
    if host in names:
        return True
    networks = [n for n in (_network(a) for a in allowed) if n is not None]
    if not networks:
        return False
    try:
        addresses = {str(info[4][0]) for info in socket.getaddrinfo(host, port or 0, proto=socket.IPPROTO_TCP)}
    except (OSError, UnicodeError):
        return False
    # Every address the name resolves to must be allowed: one outside is where a connection may go.
    return bool(addresses) and all(any(ipaddress.ip_address(a.split("%")[0]) in n for n in networks) for a in addresses)


def _network(entry: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(entry.strip(), strict=False)
    except ValueError:
        return None
