"""Boxes and the centre-padding geometry shared by the processor (images) and the task parsers (answers).

MMRS-1M normalises boxes to the side of the image after centre-padding it to a square of side ``max(h, w)``; the
processor pads images the same way, so a box in the model's text maps back to tile pixels by undoing that padding.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in tile pixel coordinates (``x`` to the right, ``y`` down; ``x1 < x2``, ``y1 < y2``).

    Attributes:
        label: Singular class name (``"ship"``, ``"storage tank"``), or ``""`` where the task has none (grounding).
        x1: Left edge, pixels.
        y1: Top edge, pixels.
        x2: Right edge, pixels.
        y2: Bottom edge, pixels.
    """

    label: str
    x1: float
    y1: float
    x2: float
    y2: float

    def as_tuple(self) -> tuple[float, float, float, float]:
        """Returns ``(x1, y1, x2, y2)``."""
        return (self.x1, self.y1, self.x2, self.y2)


@dataclass(frozen=True)
class PadInfo:
    """How an ``height x width`` image was centre-padded to a ``side x side`` square.

    Attributes:
        height: Original height, pixels.
        width: Original width, pixels.
        side: ``max(height, width)``.
        top: Rows of padding above the image (``(side - height) // 2``).
        left: Columns of padding left of the image (``(side - width) // 2``).
    """

    height: int
    width: int
    side: int
    top: int
    left: int

    @classmethod
    def for_shape(cls, height: int, width: int) -> PadInfo:
        """The padding of an image of this shape.

        Raises:
            ValueError: if a side is not positive.
        """
        height, width = int(height), int(width)
        if height <= 0 or width <= 0:
            raise ValueError(f"image shape must be positive, got {height}x{width}")
        side = max(height, width)
        return cls(height=height, width=width, side=side, top=(side - height) // 2, left=(side - width) // 2)

    def normalise(self, x1: float, y1: float, x2: float, y2: float) -> tuple[float, float, float, float]:
        """Tile pixel box -> coordinates in [0, 1] of the padded square (not rounded, not clamped)."""
        s = float(self.side)
        return ((x1 + self.left) / s, (y1 + self.top) / s, (x2 + self.left) / s, (y2 + self.top) / s)

    def denormalise(self, x1: float, y1: float, x2: float, y2: float) -> tuple[float, float, float, float]:
        """Padded-square [0, 1] coordinates -> tile pixel box, clamped to the tile (the exact inverse of
        :meth:`normalise` for boxes inside the tile)."""
        s = float(self.side)
        # rounding to 1e-6 px removes float noise (0.58 * 100 - 18 = 39.99999999999999) without moving real values
        return (
            round(min(max(x1 * s - self.left, 0.0), float(self.width)), 6),
            round(min(max(y1 * s - self.top, 0.0), float(self.height)), 6),
            round(min(max(x2 * s - self.left, 0.0), float(self.width)), 6),
            round(min(max(y2 * s - self.top, 0.0), float(self.height)), 6),
        )


def format_coordinate(value: float) -> str:
    """One normalised coordinate as MMRS-1M writes it: clamped to [0, 1], two decimals (``0.07``, ``1.00``)."""
    return f"{min(max(value, 0.0), 1.0):.2f}"


def format_box(pad: PadInfo, x1: float, y1: float, x2: float, y2: float) -> str:
    """A tile pixel box as the ``x1,y1,x2,y2`` text of MMRS-1M (no brackets), normalised to the padded side."""
    return ",".join(format_coordinate(v) for v in pad.normalise(x1, y1, x2, y2))
