"""The one set of size limits every entry point reads: image bytes, image pixels, prompt, frame.

Why one place: the /ws hub, the HTTP API, each IM platform's download and the engine each used
to carry their own image cap (10, 20 and 64 MiB), so an image could pass one door and be refused
at the next. The bridge builds one :class:`Limits` from its settings (``--max-image-bytes``,
``--max-image-pixels``, ``--max-prompt-chars``, ``--max-frame-bytes``) and hands the same
object to all of them. It lives in ``engine/`` because the engine and the adapters may not
import the bridge, while everything may import the engine's plain data types.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Default cap on one image's bytes: what IM platforms serve (Telegram's Bot API stops at 20 MB).
DEFAULT_MAX_IMAGE_BYTES = 20 * 2**20
#: Default cap on width x height read from an image header, refused before decoding (a
#: decompression bomb of a few KiB can claim billions of pixels).
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
#: Default cap on a prompt's characters.
DEFAULT_MAX_PROMPT_CHARS = 16_384
#: Room in a /ws frame for the JSON around the image and prompt (ids, field names, options).
FRAME_OVERHEAD_BYTES = 64 * 2**10


def frame_bytes_for(max_image_bytes: int, max_prompt_chars: int) -> int:
    """The smallest /ws frame that carries the largest image (base64) and prompt (JSON-escaped)."""
    base64_len = 4 * -(-max_image_bytes // 3)
    return base64_len + 6 * max_prompt_chars + FRAME_OVERHEAD_BYTES


@dataclass(frozen=True, slots=True)
class Limits:
    """Size limits shared by the hub, the HTTP API, every platform adapter and the engine.

    Attributes:
        max_image_bytes: largest image (decoded bytes) accepted or downloaded anywhere; a
            platform whose own service caps files lower keeps its lower cap.
        max_image_pixels: largest width x height (from the header) the engine decodes.
        max_prompt_chars: longest prompt accepted.
        max_frame_bytes: largest inbound /ws frame; 0 means "just large enough for the largest
            image and prompt" (:func:`frame_bytes_for`). A smaller explicit value is refused, as
            it would make ``max_image_bytes`` a lie on /ws.
    """

    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS
    max_frame_bytes: int = 0

    def __post_init__(self) -> None:
        if self.max_image_bytes < 1:
            raise ValueError("max_image_bytes must be >= 1")
        if self.max_image_pixels < 1:
            raise ValueError("max_image_pixels must be >= 1")
        if self.max_prompt_chars < 1:
            raise ValueError("max_prompt_chars must be >= 1")
        needed = frame_bytes_for(self.max_image_bytes, self.max_prompt_chars)
        if self.max_frame_bytes == 0:
            object.__setattr__(self, "max_frame_bytes", needed)
        elif self.max_frame_bytes < needed:
            raise ValueError(
                f"max_frame_bytes {self.max_frame_bytes} cannot carry a max_image_bytes image "
                f"(needs at least {needed})"
            )

    def image_cap(self, platform_cap: int | None = None) -> int:
        """The download cap for a platform: this limit, or the platform's own if that is lower."""
        if platform_cap is None:
            return self.max_image_bytes
        return min(self.max_image_bytes, platform_cap)


#: The limits when nothing is configured (tests, library use of the engine).
DEFAULT_LIMITS = Limits()
