"""Caption phrasings for class-labelled datasets.

A text-conditioned model trained on class datasets sees several phrasings per class, picked per sample
with a seeded generator so captions are reproducible. A separate set of *held-out* templates never
appears in training, so evaluation prompts (``held_out_prompt``) test generalisation over phrasing
rather than memorised strings; ``tests/data/test_mnist5k.py`` checks the two sets are disjoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CLASS_NAMES: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)

# Fields: {digit} "7", {word} "seven", {a_digit} "a 7" / "an 8", {a_word} "a seven" / "an eight".
TRAINING_TEMPLATES: tuple[str, ...] = (
    "a handwritten {word}",
    "the digit {digit}",
    "{a_digit}",
    "number {word} written by hand",
    "a handwritten digit {digit}",
    "the number {word}",
    "an image of the digit {word}",
    "a scanned handwritten {digit}",
    "{word}",
    "digit {digit}",
    "{a_word} in black and white",
)
HELD_OUT_TEMPLATES: tuple[str, ...] = (
    "draw {a_digit}",
    "a picture showing the numeral {word}",
    "somebody wrote the digit {digit} on paper",
)

CIFAR10_CLASS_NAMES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
CIFAR10_TRAINING_TEMPLATES: tuple[str, ...] = (
    "a photo of {a_word}",
    "a picture of {a_word}",
    "a small photo of {a_word}",
    "a blurry photo of {a_word}",
    "a low resolution photo of {a_word}",
    "{a_word}",
)
CIFAR10_HELD_OUT_TEMPLATES: tuple[str, ...] = (
    "an image that shows {a_word}",
    "a snapshot of {a_word}",
)

# Words whose spoken form starts with a consonant sound although the letter is a vowel, and the reverse.
_CONSONANT_SOUND = frozenset({"one"})
_VOWEL_SOUND = frozenset({"8", "11", "18"})


def with_article(word: str) -> str:
    """English indefinite article by sound: "an eight", "an 8", "a one", "an airplane"."""
    vowel_sound = word in _VOWEL_SOUND or (word[:1].lower() in "aeiou" and word not in _CONSONANT_SOUND)
    return f"{'an' if vowel_sound else 'a'} {word}"


@dataclass(frozen=True)
class ClassCaptioner:
    """Maps a class label to one of several phrasings; ``numeric`` adds the {digit}/{a_digit} fields."""

    class_names: tuple[str, ...]
    templates: tuple[str, ...]
    held_out_templates: tuple[str, ...]
    numeric: bool = False

    def _fields(self, label: int) -> dict[str, str]:
        if not 0 <= label < len(self.class_names):
            raise ValueError(f"label {label} is outside [0, {len(self.class_names)})")
        word = self.class_names[label]
        fields = {"word": word, "a_word": with_article(word)}
        if self.numeric:
            fields.update(digit=str(label), a_digit=with_article(str(label)))
        return fields

    def caption_for(self, label: int, rng: np.random.Generator) -> str:
        return self.templates[int(rng.integers(len(self.templates)))].format(**self._fields(int(label)))

    def training_captions(self, label: int) -> list[str]:
        fields = self._fields(int(label))
        return [template.format(**fields) for template in self.templates]

    def held_out_prompts(self, label: int) -> list[str]:
        fields = self._fields(int(label))
        return [template.format(**fields) for template in self.held_out_templates]

    def held_out_prompt(self, label: int, variant: int = 0) -> str:
        return self.held_out_prompts(label)[variant % len(self.held_out_templates)]


DIGIT_CAPTIONER = ClassCaptioner(CLASS_NAMES, TRAINING_TEMPLATES, HELD_OUT_TEMPLATES, numeric=True)
CIFAR10_CAPTIONER = ClassCaptioner(
    CIFAR10_CLASS_NAMES, CIFAR10_TRAINING_TEMPLATES, CIFAR10_HELD_OUT_TEMPLATES
)


def caption_for(label: int, rng: np.random.Generator) -> str:
    """One training caption for a digit label, e.g. "a handwritten seven" or "the digit 7"."""
    return DIGIT_CAPTIONER.caption_for(label, rng)


def training_captions(label: int) -> list[str]:
    """Every training phrasing of a digit label."""
    return DIGIT_CAPTIONER.training_captions(label)


def held_out_prompt(label: int, variant: int = 0) -> str:
    """A digit prompt never used in training, e.g. ``held_out_prompt(3) == "draw a 3"``."""
    return DIGIT_CAPTIONER.held_out_prompt(label, variant)


def held_out_prompts(labels: Sequence[int], variant: int = 0) -> list[str]:
    """Held-out prompts for a batch of labels (the evaluation-time counterpart of the batch captions)."""
    return [held_out_prompt(int(label), variant) for label in labels]


def cifar10_caption_for(label: int, rng: np.random.Generator) -> str:
    """One training caption for a CIFAR-10 label, e.g. "a photo of a cat"."""
    return CIFAR10_CAPTIONER.caption_for(label, rng)
