"""A frozen ``transformers`` text encoder: prompts -> ``Caption`` (token embeddings + padding mask).

T5-family checkpoints load as their encoder-only class (``T5EncoderModel``), CLIP checkpoints (full or
text-only) as ``CLIPTextModel``, anything else through ``AutoModel`` (BERT-family encoders such as
``minilm``, the encoder of an encoder-decoder model). The tokenizer comes from the same path through
``AutoTokenizer``. Remote code is never run. With ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set,
nothing is downloaded: a hub id must already be in the local cache. Registered names (``minilm``, see
``ditmoe.text.pretrained``) load from an installed package after their files' SHA-256 are checked, from
safetensors only.

Every prompt is padded (on the right) or truncated to exactly ``max_length`` tokens, so captions of a
dataset all have the shape ``(max_length, width)``; the mask is True on the real tokens, and the
embeddings at padding positions are set to zero (padding carries nothing).
"""

import contextlib
import os
import pickle
from pathlib import Path

import torch

from ..model.conditioning import Caption
from .pretrained import PRETRAINED, pretrained_encoder, verified_view

_TRUE = {"1", "ON", "YES", "TRUE"}
_T5_CLASSES = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}
_CLIP_TYPES = ("clip", "clip_text_model")


def offline() -> bool:
    """Whether downloads are forbidden (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` set to a true value)."""
    return any(os.environ.get(v, "").strip().upper() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _first_line(err: BaseException) -> str:
    if isinstance(err, pickle.UnpicklingError):  # torch's message advises weights_only=False: never do that here
        return "its weights are a pickle holding objects other than tensors, which ditmoe refuses to load " \
               "(it could run code from the file)"
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_max_length(name: str, max_length: int, config, tokenizer) -> None:
    """A ValueError when ``max_length`` exceeds the encoder's positions (``max_position_embeddings``) or, for
    relative-position encoders such as T5, its tokenizer's ``model_max_length``."""
    for what, limit in (("max_position_embeddings", getattr(config, "max_position_embeddings", None)),
                        ("tokenizer's model_max_length", getattr(tokenizer, "model_max_length", None))):
        if isinstance(limit, int) and limit < 10**6 and max_length > limit:  # no limit: a huge sentinel
            raise ValueError(f"text encoder {name!r}: max_length {max_length} exceeds its {what} {limit}")


def _model_and_tokenizer(source: str, dtype, safetensors_only: bool, **kwargs):
    """The encoder-only model and the tokenizer at ``source``: T5 and CLIP by their text classes, anything else
    (BERT-family encoders such as minilm: last hidden states per token) through ``AutoModel``."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar per load
    weights = {"use_safetensors": True} if safetensors_only else {}
    config = transformers.AutoConfig.from_pretrained(source, **kwargs)
    model_type = getattr(config, "model_type", "")
    if model_type in _T5_CLASSES:
        model = getattr(transformers, _T5_CLASSES[model_type]).from_pretrained(source, dtype=dtype, **weights,
                                                                                **kwargs)
    elif model_type in _CLIP_TYPES:
        model = transformers.CLIPTextModel.from_pretrained(source, dtype=dtype, **weights, **kwargs)
    else:
        model = transformers.AutoModel.from_pretrained(source, dtype=dtype, **weights, **kwargs)
        if getattr(model.config, "is_encoder_decoder", False):
            model = model.get_encoder()
    return model, transformers.AutoTokenizer.from_pretrained(source, **kwargs)


class TextEncoder:
    """A frozen text encoder and its tokenizer; build with :meth:`load`."""

    def __init__(self, name: str, model, tokenizer, max_length: int):
        self.name, self.model, self.tokenizer, self.max_length = name, model, tokenizer, max_length

    @classmethod
    def load(cls, name_or_path, max_length: int, device="cpu", dtype=torch.float32,
             pretrained_folder=None) -> "TextEncoder":
        """Load the encoder ``name_or_path`` (a registered name such as ``"minilm"``, a hub id or a local
        directory) in eval mode, without gradients, on ``device``. ``max_length``: tokens per caption (prompts
        are padded or truncated to it). ``dtype``: the weights' dtype (``"auto"``: the checkpoint's); the
        embeddings :meth:`encode` returns are float32. A registered name (``ditmoe.text.pretrained``) wins over
        a directory of that name (write ``./minilm`` for the directory); its files are verified before loading
        and ``pretrained_folder`` may give a copy of its folder to verify and load instead of the installed
        package's. OSError naming the encoder when it cannot be loaded (``PretrainedFileError`` for a
        registered encoder whose package is missing or whose files differ from the recorded ones)."""
        name = str(name_or_path)
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"text encoder {name!r}: max_length must be a positive integer, got {max_length!r}")
        registered = pretrained_encoder(name)
        if pretrained_folder is not None and registered is None:
            raise ValueError(f"text encoder {name!r}: pretrained_folder is only for registered names "
                             f"({', '.join(sorted(PRETRAINED))})")
        with contextlib.ExitStack() as stack:
            if registered is not None:  # verified first; transformers sees only the verified files
                source, local = str(stack.enter_context(verified_view(name, pretrained_folder))), True
            else:
                source, local = name, Path(name).is_dir()
                if not local and (Path(name).is_absolute() or name.startswith(".") or Path(name).exists()):
                    raise OSError(f"text encoder {name!r}: no such directory")
            kwargs = {"local_files_only": offline() and not local, "trust_remote_code": False}
            try:
                model, tokenizer = _model_and_tokenizer(source, dtype, safetensors_only=registered is not None,
                                                        **kwargs)
            except Exception as e:  # noqa: BLE001 (a refused pickle, a truncated safetensors file, a bad config, ...)
                where = ("its verified files" if registered is not None else "a local directory" if local
                         else "the local cache (offline)" if kwargs["local_files_only"] else "the hub")
                raise OSError(f"text encoder {name!r}: cannot load a transformers encoder and tokenizer from "
                              f"{where}: {_first_line(e)}") from None
        if registered is not None:  # not the temporary folder of links, gone now
            model.config._name_or_path = tokenizer.name_or_path = name
        check_max_length(name, max_length, model.config, tokenizer)
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError(f"text encoder {name!r}: its tokenizer has neither a pad nor an eos token")
            tokenizer.pad_token = tokenizer.eos_token  # masked out anyway
        tokenizer.padding_side = "right"  # the mask is a prefix: stored captions keep only their length
        model = model.to(device).eval().requires_grad_(False)
        return cls(name, model, tokenizer, max_length)

    @property
    def width(self) -> int:
        """Hidden size D of the token embeddings."""
        config = self.model.config
        width = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
        if not isinstance(width, int):
            raise ValueError(f"text encoder {self.name!r}: its config has no hidden_size")
        return width

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def describe(self) -> dict:
        """``{"name", "max_length", "width"}``: what a dataset manifest or checkpoint records of the encoder."""
        return {"name": self.name, "max_length": self.max_length, "width": self.width}

    @torch.no_grad()
    def encode(self, prompts: list[str], batch_size: int | None = None) -> Caption:
        """``Caption(tokens (N, max_length, width) float32, mask (N, max_length) bool)`` on the encoder's
        device, in ``batch_size`` chunks (default: all at once). Padding is on the right and its
        embeddings are zero."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}")
        prompts = list(prompts)
        step = max(1, batch_size or len(prompts))
        tokens, masks = [], []
        for first in range(0, len(prompts), step):
            batch = self.tokenizer(prompts[first:first + step], padding="max_length", truncation=True,
                                   max_length=self.max_length, return_tensors="pt")
            ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device).bool()
            if ids.shape[1] != self.max_length:
                raise RuntimeError(f"text encoder {self.name!r}: tokenizer gave {ids.shape[1]} tokens, "
                                   f"not max_length={self.max_length}")
            lengths = mask.sum(1, keepdim=True)
            if not torch.equal(mask, torch.arange(self.max_length, device=mask.device) < lengths):
                raise RuntimeError(f"text encoder {self.name!r}: the tokenizer does not pad on the right")
            hidden = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state.float()
            tokens.append(hidden * mask[..., None])
            masks.append(mask)
        if not prompts:
            return Caption(torch.zeros(0, self.max_length, self.width, device=self.device),
                           torch.zeros(0, self.max_length, dtype=torch.bool, device=self.device))
        return Caption(torch.cat(tokens), torch.cat(masks))

    def __repr__(self) -> str:
        return f"TextEncoder({self.name!r}, max_length={self.max_length}, width={self.width})"
