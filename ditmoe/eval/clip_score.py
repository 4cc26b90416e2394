"""CLIP score of generated images against the prompts they were generated from.

    CLIP score = 100 * mean over the N (image, prompt) pairs of max(cos(E_I(image), E_T(prompt)), 0)

with E_I, E_T the projected image and text embeddings of a ``transformers.CLIPModel`` (CLIPScore of Hessel
et al. 2021 with weight w = 100, the definition of torchmetrics' ``CLIPScore``): in [0, 100], higher is
better aligned. The model, its tokenizer and its image preprocessor settings are read offline, from a local
directory or a model already in the Hugging Face cache; nothing is downloaded.

Images: (N, H, W, 3) uint8, or grayscale (N, H, W[, 1]) repeated to 3 channels; they are preprocessed with
torch as CLIP's image processor does: resized (bicubic, antialiased) so the shorter side is the model's image
size, centre-cropped to a square of that size, scaled to [0, 1] and normalised with the processor's
``image_mean`` / ``image_std`` (from ``preprocessor_config.json``; OpenAI CLIP's values when the model has
none). Images already at the model's size are only normalised. Prompts are tokenized with the model's
tokenizer, truncated to its text positions.
"""

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..npz import npz_keys, open_array

# OpenAI CLIP's normalisation (transformers.image_utils.OPENAI_CLIP_MEAN / _STD): the default of CLIPImageProcessor.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_FILE = "preprocessor_config.json"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@dataclass
class ClipScorer:
    """A CLIPModel in eval mode, its tokenizer and the image normalisation; build with :func:`load_clip`."""

    name: str
    model: object
    tokenizer: object
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def preprocess(self, images) -> torch.Tensor:
        """(n, H, W[, C]) uint8 images (array or tensor) -> (n, 3, S, S) float32 pixel values on the model's
        device, S the model's image size."""
        return preprocess_images(images, self.image_size, self.mean, self.std).to(self.device)

    @torch.no_grad()
    def image_embeddings(self, images) -> torch.Tensor:
        """Projected image embeddings (n, P) of (n, H, W[, C]) uint8 images."""
        return _features(self.model.get_image_features(pixel_values=self.preprocess(images)))

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """Projected text embeddings (n, P) of the prompts."""
        limit = self.model.config.text_config.max_position_embeddings
        batch = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=limit, return_tensors="pt")
        return _features(self.model.get_text_features(input_ids=batch["input_ids"].to(self.device),
                                                      attention_mask=batch["attention_mask"].to(self.device)))


def _features(output) -> torch.Tensor:
    """The projected embeddings of ``get_image_features`` / ``get_text_features``: a tensor (transformers 4) or
    the ``pooler_output`` of their output (transformers 5)."""
    return (output if isinstance(output, torch.Tensor) else output.pooler_output).float()


def load_clip(name_or_path, device="cpu") -> ClipScorer:
    """The CLIP model, tokenizer and image normalisation of ``name_or_path``: a local directory, or a hub id
    already in the local cache (never downloaded). FileNotFoundError / OSError naming it when it cannot be read."""
    import transformers
    from transformers.utils import cached_file

    name = str(name_or_path)
    local = Path(name).is_dir()
    if not local and (Path(name).is_absolute() or name.startswith(".") or Path(name).exists()):
        raise FileNotFoundError(f"CLIP model {name}: no such directory")
    try:
        model = transformers.CLIPModel.from_pretrained(name, local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(name, local_files_only=True)
        processor_file = cached_file(name, PREPROCESSOR_FILE, local_files_only=True,
                                     _raise_exceptions_for_missing_entries=False)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as err:
        where = "the local directory" if local else "the local Hugging Face cache (evaluation never downloads)"
        raise OSError(f"CLIP model {name!r}: cannot load a transformers CLIPModel and its tokenizer from {where}: "
                      f"{_first_line(err)}") from None
    processor = json.loads(Path(processor_file).read_text()) if processor_file else {}
    mean = tuple(float(v) for v in processor.get("image_mean") or OPENAI_CLIP_MEAN)
    std = tuple(float(v) for v in processor.get("image_std") or OPENAI_CLIP_STD)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"CLIP model {name!r}: {PREPROCESSOR_FILE} needs 3 image_mean and 3 positive image_std "
                         f"values, got {mean} and {std}")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"CLIP model {name!r}: its tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model = model.float().to(device).eval().requires_grad_(False)
    return ClipScorer(name, model, tokenizer, int(model.config.vision_config.image_size), mean, std)


def preprocess_images(images, size: int, mean, std) -> torch.Tensor:
    """(n, H, W[, C]) uint8 images, C in (1, 3) -> (n, 3, size, size) float32: shorter side resized to ``size``
    (bicubic, antialiased, clamped to [0, 255]), centre crop, [0, 1], then (x - mean) / std per channel."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.dtype != torch.uint8:
        raise ValueError(f"images must be uint8, got {x.dtype}")
    if x.dim() == 3:
        x = x[..., None]
    if x.dim() != 4 or x.shape[3] not in (1, 3):
        raise ValueError(f"images must be (N, H, W, 3) or grayscale (N, H, W[, 1]), got shape {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).float().expand(-1, 3, -1, -1)  # (n, 3, H, W), 0..255
    height, width = x.shape[2:]
    if (height, width) != (size, size):
        scale = size / min(height, width)
        resized = (max(size, round(height * scale)), max(size, round(width * scale)))
        if resized != (height, width):
            x = F.interpolate(x, size=resized, mode="bicubic", antialias=True, align_corners=False).clamp(0, 255)
        top, left = (x.shape[2] - size) // 2, (x.shape[3] - size) // 2
        x = x[:, :, top:top + size, left:left + size]
    mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x / 255.0 - mean) / std).contiguous()


def pair_scores(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """100 * max(cos(image_i, text_i), 0) of each pair: (N,) float64."""
    cos = F.cosine_similarity(image_embeddings.double(), text_embeddings.double(), dim=-1, eps=1e-12)
    return 100.0 * cos.clamp(min=0)


def clip_score(scorer: ClipScorer, image_batches: Iterable, prompts: list[str]) -> float:
    """CLIP score of the images, arriving in batches of (n, H, W[, C]) uint8, against ``prompts`` (one per
    image, in order). ValueError unless there are as many images as prompts (at least one)."""
    prompts = list(prompts)
    scores, seen = [], 0
    for batch in image_batches:
        n = len(batch)
        if seen + n > len(prompts):
            raise ValueError(f"more images than the {len(prompts)} prompts")
        if n:
            scores.append(pair_scores(scorer.image_embeddings(batch),
                                      scorer.text_embeddings(prompts[seen:seen + n])).cpu())
        seen += n
    if seen != len(prompts) or not seen:
        raise ValueError(f"{seen} images for {len(prompts)} prompts: there must be one prompt per image")
    return float(torch.cat(scores).mean())


def read_prompt_file(path) -> list[str]:
    """The prompts of a text file, one per line in sample order (surrounding whitespace removed); blank lines at
    the end are ignored, a blank line before the last prompt is an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompts file")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    blank = [i + 1 for i, line in enumerate(lines) if not line]
    if blank:
        raise ValueError(f"{path}: line {blank[0]} is blank: the file needs one prompt per sample, one per line")
    if not lines:
        raise ValueError(f"{path}: holds no prompts")
    return lines


def stored_prompts(samples) -> list[str] | None:
    """Each sample's prompt as a samples npz stores them (tools/sample.py of a text model): ``prompts`` (P,) the
    distinct prompts and ``arr_1`` (N,) each sample's prompt index; without ``arr_1``, ``prompts`` holds one
    prompt per sample. None when the npz has no ``prompts``."""
    keys = npz_keys(samples)
    if "prompts" not in keys:
        return None
    with np.load(samples, allow_pickle=False) as npz:
        prompts = npz["prompts"]
        index = npz["arr_1"] if "arr_1" in keys else None
    if prompts.dtype.kind not in "US" or prompts.ndim != 1:
        raise ValueError(f"{samples}: prompts must be a 1-D array of strings, got {prompts.dtype} {prompts.shape}")
    prompts = [str(p) for p in prompts]
    if index is None:
        return prompts
    if index.dtype.kind not in "iu" or index.ndim != 1 or (len(index) and not (
            0 <= index.min() and index.max() < len(prompts))):
        raise ValueError(f"{samples}: arr_1 must hold each sample's prompt index in [0, {len(prompts)})")
    return [prompts[i] for i in index]


def sample_count(samples) -> int:
    """Images in arr_0 of a samples npz, after checking that they are uint8 images."""
    with open_array(samples, "arr_0") as images:
        _check_images(samples, images.shape, images.dtype)
        return images.shape[0]


def _check_images(path, shape, dtype) -> None:
    if dtype != np.uint8:
        raise ValueError(f"{path}: arr_0 must hold uint8 images, got {dtype}")
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] in (1, 3))) or 0 in shape[1:]:
        raise ValueError(f"{path}: arr_0 must be (N, H, W, 3) images or grayscale (N, H, W[, 1]), got shape {shape}")


def samples_prompts(samples, prompts_file=None) -> list[str]:
    """The prompt of each image of the samples npz: the lines of ``prompts_file`` when given, else the npz's own
    ``prompts`` (see :func:`stored_prompts`). ValueError when there are none or their count is not the number
    of images."""
    count = sample_count(samples)
    if prompts_file is not None:
        prompts, source = read_prompt_file(prompts_file), f"--prompts {prompts_file}"
    else:
        prompts, source = stored_prompts(samples), f"{samples}'s prompts"
        if prompts is None:
            raise ValueError(f"{samples}: has no prompts array: pass --prompts FILE (one prompt per line, in the "
                             "order of the samples)")
    if len(prompts) != count:
        raise ValueError(f"{source}: {len(prompts)} prompts for {count} samples in {samples}: the CLIP score "
                         "needs one prompt per sample")
    return prompts


def clip_score_of_samples(samples, prompts: list[str], scorer: ClipScorer, batch_size: int = 64) -> float:
    """CLIP score of arr_0 of the samples npz (streamed in ``batch_size`` images) against ``prompts``."""
    with open_array(samples, "arr_0") as images:
        _check_images(samples, images.shape, images.dtype)
        return clip_score(scorer, images.batches(batch_size), prompts)
