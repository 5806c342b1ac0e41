"""Which pixels of a digit are observed: the masks of filling in and of inference from part of a
digit. A mask is a boolean tensor like the digits (True = observed), or one (D,) mask for all."""

import math

import torch

from .config import SettingError

SIDES = ("top", "bottom", "left", "right")


def observe(spec, shape=(784,), device=None, generator=None):
    """The mask of observed pixels that `spec` names.

    Args:
        spec: ``"top"``, ``"bottom"``, ``"left"`` or ``"right"``: that half of the image is observed;
            ``"random:F"``: each digit observes a random fraction F of its pixels (0 < F < 1),
            exactly round(F D) of them.
        shape: (..., D) for square digits of D pixels: (784,) for one mask shared by all digits,
            (N, 784) for one per digit (a random mask then differs between digits).
        device: where the mask goes.
        generator: the ``torch.Generator`` a random mask draws from (default: the global one).

    Returns:
        A boolean tensor of `shape`, True where a pixel is observed.

    Raises:
        SettingError: an unknown name, a fraction outside (0, 1), digits that are not square.

    Example:
        >>> from ppl_models import observe
        >>> top = observe("top")
        >>> top.shape, top.sum().item(), top[:392].all().item()
        (torch.Size([784]), 392, True)
        >>> observe("random:0.25", (3, 784)).sum(-1).tolist()
        [196, 196, 196]
        >>> observe("middle")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ppl_models.config.SettingError: unknown `observe=middle`; use one of top, bottom, left, right, or random:F ...
    """
    side = math.isqrt(shape[-1])
    if side * side != shape[-1]:
        raise SettingError(f"`observe={spec}` needs square digits, got {shape[-1]} pixels")
    if not isinstance(spec, str):
        raise SettingError(f"`observe={spec}` is not a mask name; use one of {', '.join(SIDES)}, or random:F")
    if spec in SIDES:
        rows, cols = torch.meshgrid(torch.arange(side, device=device), torch.arange(side, device=device),
                                    indexing="ij")
        half = {"top": rows < side // 2, "bottom": rows >= side // 2, "left": cols < side // 2,
                "right": cols >= side // 2}[spec]
        return half.flatten().expand(shape)
    if spec.startswith("random:"):
        fraction = parse_fraction(spec)
        scores = torch.rand(shape, generator=generator).to(device)
        keep = max(1, min(shape[-1] - 1, round(fraction * shape[-1])))  # exactly that many per digit
        return scores.argsort(-1).argsort(-1) < keep
    raise SettingError(f"unknown `observe={spec}`; use one of {', '.join(SIDES)}, or random:F with F the fraction "
                       "observed, e.g. random:0.5")


def parse_fraction(spec):
    try:
        fraction = float(spec.split(":", 1)[1])
    except ValueError:
        fraction = math.nan
    if not 0 < fraction < 1:
        raise SettingError(f"`observe={spec}`: the fraction observed must be a number between 0 and 1, e.g. random:0.5")
    return fraction


def check_mask(observed, num_digits, num_pixels, to_fill=True, generator=None):
    """A boolean (N, D) mask from any (D,) or (N, D) mask of 0/1 values or an `observe` spec
    (``"top"``; a random one drawn from `generator`): what `ppl_models.trained.TrainedModel`'s
    queries accept as ``observed``.

    Raises:
        SettingError: a mask of another shape or with values other than 0/1, one that observes no
            pixel of some digit (nothing to condition on) or, with `to_fill`, every pixel of one
            (nothing to fill in).
    """
    if isinstance(observed, str):
        observed = observe(observed, (num_digits, num_pixels), generator=generator)
    if observed is None:
        raise SettingError("a mask of observed pixels is needed, e.g. `observed='top'`")
    observed = torch.as_tensor(observed)
    shapes = [(num_pixels,), (num_digits, num_pixels)]
    if tuple(observed.shape) not in shapes:
        raise SettingError(f"the mask of observed pixels must be ({num_pixels},) or ({num_digits}, {num_pixels}) like "
                           f"the digits, got shape {tuple(observed.shape)}")
    if not ((observed == 0) | (observed == 1)).all():
        raise SettingError("the mask of observed pixels must hold 0/1 or True/False values (True = observed)")
    observed = observed.bool().expand(num_digits, num_pixels)
    for what, bad in (("no pixel", ~observed.any(-1)), ("every pixel", observed.all(-1))):
        if bad.any() and (to_fill or what == "no pixel"):
            raise SettingError(f"the mask of observed pixels marks {what} of digit {bad.nonzero()[0].item()} as "
                               f"observed: nothing to {'condition on' if what == 'no pixel' else 'fill in'}")
    return observed
