"""Captions for the text-to-image digits demo, and the digits written as a latent dataset with captions.

Each class ``d`` (0..9) is described by filling a template with its numeral ``{n}`` ("3") or its word
``{w}`` ("three"). Training uses :data:`TRAIN_TEMPLATES`; :data:`HELDOUT_TEMPLATES` are phrasings never
seen in training, for checking that a text-conditioned model follows the meaning of a caption rather
than memorising its exact strings:

=====================================  ===============================
training templates                     e.g. for 3
=====================================  ===============================
``{n}``                                3
``the digit {n}``                      the digit 3
``the digit {w}``                      the digit three
``a handwritten {w}``                  a handwritten three
``a handwritten {n}``                  a handwritten 3
``number {w}``                         number three
``the number {n}``                     the number 3
``an image of the digit {w}``          an image of the digit three
=====================================  ===============================

=====================================  ===============================
held-out templates                     e.g. for 3
=====================================  ===============================
``a picture of the number {w}``        a picture of the number three
``handwritten digit {n}``              handwritten digit 3
=====================================  ===============================

Every held-out caption differs from every training caption of every class (see the tests). Sample ``i``
of the digits dataset gets ``train_caption(label, i)``: the training templates in turn, offset by the
label, so every class sees every template.
"""

import numpy as np

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NUM_CLASSES = len(NUMBER_WORDS)
TRAIN_TEMPLATES = (
    "{n}",
    "the digit {n}",
    "the digit {w}",
    "a handwritten {w}",
    "a handwritten {n}",
    "number {w}",
    "the number {n}",
    "an image of the digit {w}",
)
HELDOUT_TEMPLATES = (
    "a picture of the number {w}",
    "handwritten digit {n}",
)


def _check_label(label) -> int:
    if isinstance(label, bool) or not 0 <= int(label) < NUM_CLASSES or int(label) != label:
        raise ValueError(f"digit label must be an integer in [0, {NUM_CLASSES}), got {label!r}")
    return int(label)


def fill(template: str, label: int) -> str:
    """``template`` with the numeral ``{n}`` and the word ``{w}`` of digit ``label``."""
    label = _check_label(label)
    return template.format(n=str(label), w=NUMBER_WORDS[label])


def train_captions(label: int) -> list[str]:
    """The training phrasings of digit ``label``, in template order."""
    return [fill(t, label) for t in TRAIN_TEMPLATES]


def heldout_captions(label: int) -> list[str]:
    """The held-out phrasings of digit ``label`` (never used for training), in template order."""
    return [fill(t, label) for t in HELDOUT_TEMPLATES]


def train_caption(label: int, index: int) -> str:
    """The caption of training sample ``index`` of class ``label``: training template
    ``(index + label) % len(TRAIN_TEMPLATES)``; deterministic."""
    label = _check_label(label)
    return fill(TRAIN_TEMPLATES[(int(index) + label) % len(TRAIN_TEMPLATES)], label)


def caption_words() -> list[str]:
    """Every word (lower case, letters only) of every template and number word, sorted: the vocabulary
    of the tiny demo tokenizer."""
    words = set(NUMBER_WORDS)
    for template in TRAIN_TEMPLATES + HELDOUT_TEMPLATES:
        words.update(w for w in template.split() if w.isalpha())
    return sorted(words)


def write_digits_caption_dataset(root, encoder, *, samples_per_shard: int = 512, batch_size: int = 256):
    """The embedded digits (as in ``write_digits_shards``: 1-channel 8×8 "latents" of an identity
    autoencoder) with the caption ``train_caption(label, i)`` of each sample ``i`` embedded by ``encoder``
    (a :class:`ditmoe.text.TextEncoder`), as a latent dataset with captions in ``root``; class labels are
    kept. Returns the manifest."""
    from .digits import digits_arrays, pixels_to_latents
    from .latent_format import write_latent_dataset

    images, labels = digits_arrays()
    captions = encoder.encode([train_caption(int(y), i) for i, y in enumerate(labels)], batch_size=batch_size)
    return write_latent_dataset(root, pixels_to_latents(images).numpy(), 0.0, np.asarray(labels), vae="identity",
                                resolution=8, samples_per_shard=samples_per_shard, num_classes=NUM_CLASSES,
                                captions=captions, text_encoder=encoder.name)
