"""ImageNet-1k class names <-> ids, from torchvision's bundled category list (offline; the
order of the ILSVRC-2012 ids the class-conditional generators were trained on).

    class_names()[207]            -> "golden retriever"
    resolve_class("207")          -> 207
    resolve_class("Golden Retriever") -> 207  (case-insensitive; close matches on a miss)
"""
from __future__ import annotations

import difflib
from functools import lru_cache

NUM_CLASSES = 1000


class ClassNameError(ValueError):
    """An unknown, ambiguous or out-of-range ImageNet class."""


@lru_cache(maxsize=1)
def class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names, index = class id."""
    from torchvision.models import ResNet50_Weights

    names = tuple(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
    if len(names) != NUM_CLASSES:  # a torchvision that changed its list would shift every id
        raise RuntimeError(f"torchvision's ImageNet category list has {len(names)} names, expected {NUM_CLASSES}")
    return names


def class_name(class_id: int) -> str:
    return class_names()[check_class_id(class_id)]


def check_class_id(class_id: int, num_classes: int = NUM_CLASSES, what: str = "class") -> int:
    if isinstance(class_id, bool) or not isinstance(class_id, int) or not 0 <= class_id < num_classes:
        raise ClassNameError(f"{what}: expected a class id in [0, {num_classes}), got {class_id!r}")
    return class_id


def resolve_class(value: str | int, num_classes: int = NUM_CLASSES, what: str = "class") -> int:
    """A class id (int or a string of digits) or an ImageNet class name -> the class id.
    Names match exactly, then case-insensitively; a miss lists close matches, a name shared
    by two classes (e.g. "cardigan") lists their ids."""
    if isinstance(value, int):
        return check_class_id(value, num_classes, what)
    text = str(value).strip()
    if text.lstrip("+-").isdigit():
        return check_class_id(int(text), num_classes, what)
    names = class_names()
    exact = [i for i, n in enumerate(names) if n == text]
    found = exact or [i for i, n in enumerate(names) if n.lower() == text.lower()]
    if len(found) > 1:
        raise ClassNameError(f"{what} {text!r}: ambiguous, the name of classes "
                             f"{', '.join(f'{i} ({names[i]})' for i in found)}; give the id")
    if not found:
        lowered = {n.lower(): n for n in names}
        close = difflib.get_close_matches(text.lower(), list(lowered), n=5, cutoff=0.6)
        close += [n.lower() for n in names if text.lower() in n.lower() and n.lower() not in close][:5 - len(close)]
        hint = ("; close matches: " + ", ".join(f"{lowered[c]!r} ({names.index(lowered[c])})" for c in close)
                if close else "")
        raise ClassNameError(f"{what} {text!r}: not an ImageNet class name or id{hint}")
    return check_class_id(found[0], num_classes, what)
