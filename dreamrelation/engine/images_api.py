"""A client of OpenAI-compatible images APIs (``/images/generations`` and ``/images/edits``), for the data engine.

The data engine (paper 3.3) can draw its subject and target images from a hosted text-to-image model instead of
our own stack: ``generate(prompt)`` makes a subject image from text, ``edit(prompt, images)`` composes the target
from the subject images. Any server speaking the OpenAI images protocol works (OpenAI itself, a local gateway):

    POST {base_url}/images/generations   JSON {"model", "prompt", "n": 1, "size"}
    POST {base_url}/images/edits         multipart: model, prompt, n, size, and one ``image[]`` PNG file per image

The answer is ``{"data": [{"b64_json": ...}]}`` or ``{"data": [{"url": ...}]}`` (then the URL is fetched, without
the API key). GPT Image models always answer with ``b64_json`` and reject ``response_format``, so that field is
sent only to ``dall-e-*`` models (which default to URLs).

Failures: timeouts, connection errors, 429 and 5xx are retried with exponential backoff (``backoff * 2**attempt``
seconds, or the server's ``Retry-After`` when it sends seconds; capped at ``max_wait``). Any other 4xx raises
``ImagesAPIError`` at once, quoting the status and the server's ``error.message``; so does the last failed retry,
saying how many attempts were made and the last cause. The API key is sent only in the ``Authorization`` header
of API calls and never appears in logs, errors or the config's repr.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional
from urllib.parse import urlsplit

import requests
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

__all__ = ["ImagesAPIClient", "ImagesAPIConfig", "ImagesAPIError", "from_env"]

_SIZE = re.compile(r"[1-9][0-9]{0,4}x[1-9][0-9]{0,4}\Z")
_RETRY_STATUS = frozenset({429}) | frozenset(range(500, 600))
_MAX_QUOTE = 300  # characters of a server body quoted in an error


class ImagesAPIError(RuntimeError):
    """The images API did not give an image: ``status`` is the last HTTP status (None for a timeout or a connection
    error), ``body`` the last response body (truncated)."""

    def __init__(self, message: str, status: Optional[int] = None, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


@dataclass(frozen=True)
class ImagesAPIConfig:
    """Where and how to call the API. ``base_url`` ends before ``/images`` (e.g. ``https://api.openai.com/v1``);
    ``size`` is ``"WxH"`` (or ``"auto"``); ``timeout`` is seconds per HTTP request; ``max_retries`` is how many
    times a retryable failure is retried (``max_retries + 1`` attempts in all); ``backoff`` is the first wait in
    seconds, doubled each retry; ``max_wait`` caps any single wait (also a server's ``Retry-After``)."""

    base_url: str
    api_key: Optional[str] = field(default=None, repr=False)  # never printed
    model: str = "gpt-image-1"
    size: str = "1024x1024"
    timeout: float = 120.0
    max_retries: int = 3
    backoff: float = 1.0
    max_wait: float = 60.0

    def __post_init__(self) -> None:
        if not isinstance(self.base_url, str) or not self.base_url.strip():
            raise ValueError(f"base_url must be a non-empty http(s) URL, got {self.base_url!r}")
        parts = urlsplit(self.base_url.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"base_url must be an http:// or https:// URL with a host, got {self.base_url!r}")
        object.__setattr__(self, "base_url", self.base_url.strip().rstrip("/"))
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            raise ValueError("api_key must be a non-empty string or None (its value is not shown)")
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"model must be a non-empty string, got {self.model!r}")
        if not isinstance(self.size, str) or not (self.size == "auto" or _SIZE.match(self.size)):
            raise ValueError(f"size must be 'WxH' with positive integers (e.g. '1024x1024') or 'auto', "
                             f"got {self.size!r}")
        for name in ("timeout", "backoff", "max_wait"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise ValueError(f"{name} must be a number of seconds, got {value!r}")
        if self.timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout!r}")
        if self.backoff < 0:
            raise ValueError(f"backoff must be >= 0 seconds, got {self.backoff!r}")
        if self.max_wait < 0:
            raise ValueError(f"max_wait must be >= 0 seconds, got {self.max_wait!r}")
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ValueError(f"max_retries must be an integer >= 0, got {self.max_retries!r}")

    @classmethod
    def from_env(cls, base_url: str, api_key_env: Optional[str] = "OPENAI_API_KEY", **kwargs: Any
                 ) -> "ImagesAPIConfig":
        """A config whose key is read from the environment variable ``api_key_env`` (None: no key). An unset or
        empty variable means no key (fine for local servers), with a warning naming the variable."""
        key = None
        if api_key_env:
            key = os.environ.get(api_key_env, "").strip() or None
            if key is None:
                logger.warning("environment variable %s is not set: calling %s without an API key",
                               api_key_env, base_url)
        return cls(base_url=base_url, api_key=key, **kwargs)

    @property
    def response_format(self) -> Optional[str]:
        """``"b64_json"`` for DALL-E models (which default to URLs); None for GPT Image models, which always answer
        with base64 and reject the field."""
        return "b64_json" if self.model.startswith("dall-e") else None


def from_env(base_url: str, api_key_env: Optional[str] = "OPENAI_API_KEY", **kwargs: Any) -> "ImagesAPIClient":
    """A client for ``base_url`` with the key from ``$api_key_env``; ``kwargs`` are other ``ImagesAPIConfig``
    fields (model, size, timeout, ...)."""
    return ImagesAPIClient(ImagesAPIConfig.from_env(base_url, api_key_env, **kwargs))


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _quote(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_QUOTE else text[: _MAX_QUOTE - 3] + "..."


def _server_message(response: requests.Response) -> str:
    """The server's ``error.message`` (OpenAI error format), else the body (truncated)."""
    try:
        payload = response.json()
    except ValueError:
        payload = None
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict) and error.get("message"):
            return _quote(str(error["message"]))
        if isinstance(error, str) and error:
            return _quote(error)
    return _quote(response.text) or "(empty body)"


def _retry_after(response: requests.Response) -> Optional[float]:
    """``Retry-After`` in seconds when the server sent a number (HTTP dates are ignored)."""
    value = response.headers.get("Retry-After")
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and seconds >= 0 and seconds == seconds else None


class ImagesAPIClient:
    """Calls one images API. Thread-compatible like ``requests.Session`` (use one client per thread / actor).

    ``session``: a ``requests.Session`` to reuse (connection pooling, proxies); ``sleep``: the wait function
    (tests pass a recorder).
    """

    def __init__(self, config: ImagesAPIConfig, session: Optional[requests.Session] = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not isinstance(config, ImagesAPIConfig):
            raise ValueError(f"config must be an ImagesAPIConfig, got {type(config).__name__}")
        self.config = config
        self.session = session if session is not None else requests.Session()
        self._sleep = sleep

    # ------------------------------------------------------------------------------------------------ public calls

    def generate(self, prompt: str) -> Image.Image:
        """One RGB image for ``prompt`` (``POST {base_url}/images/generations``)."""
        prompt = self._check_prompt(prompt)
        body: dict[str, Any] = {"model": self.config.model, "prompt": prompt, "n": 1, "size": self.config.size}
        if self.config.response_format:
            body["response_format"] = self.config.response_format
        response = self._call("POST", f"{self.config.base_url}/images/generations", json=body)
        return self._image_from(response)

    def edit(self, prompt: str, images: Sequence[Image.Image]) -> Image.Image:
        """One RGB image for ``prompt`` conditioned on ``images`` (``POST {base_url}/images/edits``, each image sent
        as a PNG file field ``image[]``, in order)."""
        prompt = self._check_prompt(prompt)
        if not images or not all(isinstance(im, Image.Image) for im in images):
            raise ValueError(f"images must be a non-empty list of PIL images, got "
                             f"{[type(im).__name__ for im in images] if images else images!r}")
        data: dict[str, str] = {"model": self.config.model, "prompt": prompt, "n": "1", "size": self.config.size}
        if self.config.response_format:
            data["response_format"] = self.config.response_format
        # Encoded once; requests rebuilds the multipart body from these bytes on every attempt.
        files = [("image[]", (f"image{k}.png", _png_bytes(im), "image/png")) for k, im in enumerate(images)]
        response = self._call("POST", f"{self.config.base_url}/images/edits", data=data, files=files)
        return self._image_from(response)

    # -------------------------------------------------------------------------------------------------- internals

    @staticmethod
    def _check_prompt(prompt: str) -> str:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
        return prompt.strip()

    def _call(self, method: str, url: str, *, authorized: bool = True, **kwargs: Any) -> requests.Response:
        """``session.request`` with retries; returns a 2xx response or raises ``ImagesAPIError``."""
        headers = {}
        if authorized and self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        attempts = self.config.max_retries + 1
        path = urlsplit(url).path or url  # logged instead of the full URL (which may carry a signed query)
        cause, status, body = "", None, ""
        for attempt in range(attempts):
            wait = min(self.config.backoff * 2 ** attempt, self.config.max_wait)
            try:
                response = self.session.request(method, url, headers=headers, timeout=self.config.timeout,
                                                **kwargs)
            except requests.Timeout:
                cause, status, body = f"timed out after {self.config.timeout:g} s", None, ""
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as e:
                cause, status, body = f"connection error ({type(e).__name__}: {_quote(str(e))})", None, ""
            else:
                if response.ok:
                    return response
                status, body = response.status_code, _quote(response.text)
                message = _server_message(response)
                if status not in _RETRY_STATUS:
                    raise ImagesAPIError(f"{method} {path} failed with HTTP {status}: {message}",
                                         status=status, body=body)
                cause = f"HTTP {status}: {message}"
                server_wait = _retry_after(response)
                if server_wait is not None:
                    wait = min(server_wait, self.config.max_wait)
            if attempt + 1 < attempts:
                logger.warning("%s %s: %s; retry %d of %d in %.2f s", method, path, cause, attempt + 1,
                               self.config.max_retries, wait)
                self._sleep(wait)
        raise ImagesAPIError(f"{method} {path} failed after {attempts} attempt{'s' if attempts > 1 else ''}; "
                             f"last: {cause}", status=status, body=body)

    def _image_from(self, response: requests.Response) -> Image.Image:
        """The first image of an images API answer (``b64_json`` or ``url``), decoded as RGB."""
        try:
            payload = response.json()
        except ValueError:
            raise ImagesAPIError(f"the images API answered HTTP {response.status_code} with a body that is not "
                                 f"JSON: {_quote(response.text)!r}", response.status_code,
                                 _quote(response.text)) from None
        items = payload.get("data") if isinstance(payload, dict) else None
        item = items[0] if isinstance(items, list) and items and isinstance(items[0], dict) else None
        if item is None or not (item.get("b64_json") or item.get("url")):
            raise ImagesAPIError(f"the images API answer has no data[0].b64_json or data[0].url: "
                                 f"{_quote(json.dumps(payload))!r}", response.status_code, _quote(response.text))
        if item.get("b64_json"):
            try:
                raw = base64.b64decode(item["b64_json"], validate=True)
            except (binascii.Error, ValueError, TypeError) as e:
                raise ImagesAPIError(f"data[0].b64_json is not valid base64 ({e})", response.status_code) from None
            source = "data[0].b64_json"
        else:
            url = str(item["url"])
            if urlsplit(url).scheme not in ("http", "https"):
                raise ImagesAPIError(f"data[0].url must be an http(s) URL, got {_quote(url)!r}",
                                     response.status_code)
            raw = self._call("GET", url, authorized=False).content  # the key never leaves for another host
            source = f"the image at data[0].url ({urlsplit(url).path})"
        try:
            image = Image.open(io.BytesIO(raw))
            image.load()
        except (UnidentifiedImageError, OSError) as e:
            raise ImagesAPIError(f"{source} is not a decodable image ({len(raw)} bytes; {e})",
                                 response.status_code) from None
        return image.convert("RGB")
