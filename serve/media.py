"""Images of a request from their URLs, within the operator's limits.

``data:`` URIs always work. ``file:`` URLs work only for files inside the folders the
operator allows (after resolving links, so a link cannot lead out of them). Remote
``http(s)`` URLs are off unless the operator turns them on: fetching them makes the
server a client of whatever address a request names, which is the operator's call.
Every image is checked by :func:`vlm.images.load_image` (pixel count from the header
before decoding, aspect ratio, corrupt files).
"""

from __future__ import annotations

import base64
import binascii
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from vlm.images import ImageError, load_image

from .protocol import APIError


@dataclass(frozen=True)
class MediaPolicy:
    max_image_pixels: int
    """Larger images are refused with 413."""
    max_image_bytes: int
    """Larger encoded images (a local file or a download) are refused with 413."""
    allow_remote: bool = False
    allowed_local_paths: tuple[Path, ...] = ()
    """Folders whose files ``file:`` URLs may name (none: local files are refused)."""
    remote_timeout_s: float = 10.0


def load_image_url(url: str, policy: MediaPolicy, param: str = "image_url"):
    """The RGB PIL image at ``url``, or :class:`APIError` (400, or 413 when too large)."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        data = _data_uri(url, param)
    elif scheme == "file":
        data = _local_file(url, policy, param)
    elif scheme in ("http", "https"):
        if not policy.allow_remote:
            raise APIError(
                400,
                "remote image URLs are turned off on this server; send the image as a data: URI "
                "(the operator can allow them with --allow_remote_images)",
                param=param,
                code="remote_images_disabled",
            )
        data = _download(url, policy, param)
    else:
        raise APIError(400, "an image URL must be a data: URI (or file:/http(s): where allowed)", param=param)
    if len(data) > policy.max_image_bytes:
        raise APIError(413, f"image of {len(data)} bytes; the limit is {policy.max_image_bytes}", param=param)
    try:
        return load_image(data, max_pixels=policy.max_image_pixels)
    except ImageError as e:
        status = 413 if e.kind == "image too large" else 400
        raise APIError(status, f"{param}: {e.reason}", param=param, code="invalid_image") from None


def _data_uri(url: str, param: str) -> bytes:
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise APIError(400, f"{param}: a data: URI needs a ',' before its data", param=param, code="invalid_image")
    media_type = header.split(";", 1)[0].strip().lower()
    if media_type and not (media_type.startswith("image/") or media_type == "application/octet-stream"):
        raise APIError(400, f"{param}: {media_type} is not an image type", param=param, code="invalid_image")
    if header.lower().endswith(";base64"):
        try:
            return base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError):
            raise APIError(
                400, f"{param}: the data: URI is not valid base64", param=param, code="invalid_image"
            ) from None
    return urllib.parse.unquote_to_bytes(payload)


def _local_file(url: str, policy: MediaPolicy, param: str) -> bytes:
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise APIError(400, f"{param}: file URLs must name a local file", param=param)
    if not policy.allowed_local_paths:
        raise APIError(
            400, f"{param}: local files are not allowed on this server", param=param, code="file_not_allowed"
        )
    try:
        path = Path(urllib.request.url2pathname(parsed.path)).resolve(strict=True)
    except (OSError, RuntimeError):
        raise APIError(400, f"{param}: no such file", param=param, code="invalid_image") from None
    if not any(path.is_relative_to(folder) for folder in policy.allowed_local_paths):
        raise APIError(400, f"{param}: this file is outside the allowed folders", param=param, code="file_not_allowed")
    if not path.is_file():
        raise APIError(400, f"{param}: not a file", param=param, code="invalid_image")
    if path.stat().st_size > policy.max_image_bytes:
        raise APIError(413, f"{param}: the file is larger than {policy.max_image_bytes} bytes", param=param)
    return path.read_bytes()


class _HTTPOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only (urllib's default also follows them to ftp)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlparse(newurl).scheme.lower() not in ("http", "https"):
            return None
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _download(url: str, policy: MediaPolicy, param: str) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "vlm-serve"})
    opener = urllib.request.build_opener(_HTTPOnlyRedirects)
    try:
        with opener.open(request, timeout=policy.remote_timeout_s) as response:
            data = response.read(policy.max_image_bytes + 1)
    except OSError as e:
        raise APIError(400, f"{param}: cannot download the image ({e})", param=param, code="invalid_image") from None
    if len(data) > policy.max_image_bytes:
        raise APIError(413, f"{param}: the download is larger than {policy.max_image_bytes} bytes", param=param)
    return data
