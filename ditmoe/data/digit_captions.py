"""Captions for the text-to-image digits demo, and the digits written as a latent dataset with captions.

A caption fills a template's ``{d}`` with a *form* of the digit: its numeral ("7") or its word ("seven").
Training sees each digit in one form only, the numeral for odd digits and the word for even ones, and
only the :data:`TRAIN_TEMPLATES`. Evaluation asks in three ways, to tell a model that follows the meaning
of a caption from one that memorised its strings:

* ``train``: training templates with the trained form (the captions seen in training);
* ``heldout_templates``: :data:`HELDOUT_TEMPLATES`, never seen in training, with the trained form;
* ``heldout_forms``: training templates with the other form, never seen in training for that digit
  (asked for "seven" when it was trained on "7", for "4" when trained on "four").

=====================================  ======================================
training templates                     e.g. for 3 (trained as "3")
=====================================  ======================================
``{d}``                                3
``the digit {d}``                      the digit 3
``a handwritten {d}``                  a handwritten 3
``number {d}``                         number 3
``the number {d}``                     the number 3
``an image of the digit {d}``          an image of the digit 3
=====================================  ======================================

=====================================  ======================================
held-out templates                     e.g. for 3
=====================================  ======================================
``a picture of the number {d}``        a picture of the number 3
``handwritten digit {d}``              handwritten digit 3
=====================================  ======================================

Every held-out caption differs from every training caption of every class (see the tests). Sample ``i``
of the digits dataset gets ``train_caption(label, i)``: the training templates in turn, offset by the
label, so every class sees every template.
"""

import numpy as np

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NUM_CLASSES = len(NUMBER_WORDS)
TRAIN_TEMPLATES = (
    "{d}",
    "the digit {d}",
    "a handwritten {d}",
    "number {d}",
    "the number {d}",
    "an image of the digit {d}",
)
HELDOUT_TEMPLATES = (
    "a picture of the number {d}",
    "handwritten digit {d}",
)
#: The evaluation's caption groups (see the module docstring).
GROUPS = ("train", "heldout_templates", "heldout_forms")


def _check_label(label) -> int:
    if isinstance(label, bool) or not 0 <= int(label) < NUM_CLASSES or int(label) != label:
        raise ValueError(f"digit label must be an integer in [0, {NUM_CLASSES}), got {label!r}")
    return int(label)


def trained_form(label: int) -> str:
    """The form digit ``label`` is trained with: the numeral for odd digits, the word for even ones."""
    label = _check_label(label)
    return str(label) if label % 2 else NUMBER_WORDS[label]


def heldout_form(label: int) -> str:
    """The form of digit ``label`` never seen in training."""
    label = _check_label(label)
    return NUMBER_WORDS[label] if label % 2 else str(label)


def fill(template: str, form: str) -> str:
    return template.format(d=form)


def train_captions(label: int) -> list[str]:
    """The training phrasings of digit ``label``, in template order."""
    return [fill(t, trained_form(label)) for t in TRAIN_TEMPLATES]


def group_captions(group: str, label: int) -> list[str]:
    """The captions of evaluation group ``group`` (one of :data:`GROUPS`) for digit ``label``."""
    if group == "train":
        return train_captions(label)
    if group == "heldout_templates":
        return [fill(t, trained_form(label)) for t in HELDOUT_TEMPLATES]
    if group == "heldout_forms":
        return [fill(t, heldout_form(label)) for t in TRAIN_TEMPLATES]
    raise ValueError(f"caption group must be one of {', '.join(GROUPS)}, got {group!r}")


def train_caption(label: int, index: int) -> str:
    """The caption of training sample ``index`` of class ``label``: training template
    ``(index + label) % len(TRAIN_TEMPLATES)`` with the trained form; deterministic."""
    label = _check_label(label)
    return fill(TRAIN_TEMPLATES[(int(index) + label) % len(TRAIN_TEMPLATES)], trained_form(label))


def caption_words() -> list[str]:
    """Every word (lower case, letters only) of every template and number word, sorted: the vocabulary
    of the tiny demo tokenizer."""
    words = set(NUMBER_WORDS)
    for template in TRAIN_TEMPLATES + HELDOUT_TEMPLATES:
        words.update(w for w in template.split() if w.isalpha())
    return sorted(words)


def write_digits_caption_dataset(root, encoder, *, split: str = "all", samples_per_shard: int = 512,
                                 batch_size: int = 256):
    """The embedded digits of ``split`` (as in ``write_digits_shards``: 1-channel 8×8 "latents" of an identity
    autoencoder) with the caption ``train_caption(label, i)`` of each digit ``i`` embedded by ``encoder``
    (a :class:`ditmoe.text.TextEncoder`), as a latent dataset with captions in ``root``; class labels are
    kept. Returns the manifest."""
    from .digits import digits_arrays, pixels_to_latents, split_indices
    from .latent_format import write_latent_dataset

    images, labels = digits_arrays()
    index = split_indices(split, len(labels))
    images, labels = images[index], labels[index]
    captions = encoder.encode([train_caption(int(y), i) for i, y in zip(index, labels)], batch_size=batch_size)
    return write_latent_dataset(root, pixels_to_latents(images).numpy(), 0.0, np.asarray(labels), vae="identity",
                                resolution=8, samples_per_shard=samples_per_shard, num_classes=NUM_CLASSES,
                                captions=captions, text_encoder=encoder.name)
