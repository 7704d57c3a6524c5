"""The one model loader: a Hugging Face checkpoint directory (or a hub id already in the local
cache) -> model + tokenizer + image processor + chat codec, on the configured device and dtype.

Supported families (the checkpoint's config.json `model_type`): qwen2_vl, qwen2_5_vl, qwen3_vl
(vision-language, AutoModelForImageTextToText) and qwen2, qwen3 (text-only causal LMs, Qwen2 /
Qwen2.5 / Qwen3, AutoModelForCausalLM). Everything comes from the checkpoint's own files: the
tokenizer and its chat template (tokenizer_config.json, chat_template.jinja or
chat_template.json), the image processor's patch/merge sizes and pixel limits
(preprocessor_config.json), the vision token ids (config.json).

    m = load_model("/models/Qwen2.5-VL-7B-Instruct", LoadConfig(dtype="bfloat16"))
    m = load_model("Qwen/Qwen2.5-VL-3B-Instruct")      # resolved in the local HF cache, offline
    m = load_model("tiny:qwen2_vl")                    # the fixture: a directory written once, then
                                                       # loaded exactly like the two above
    codec = m.codec()                                  # the chat template's token deltas

Nothing is downloaded unless `LoadConfig.allow_download` is set (and HF_HUB_OFFLINE is not).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import check

VL_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
TEXT_FAMILIES = ("qwen2", "qwen3")
FAMILIES = VL_FAMILIES + TEXT_FAMILIES
DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTENTION = ("auto", "sdpa", "eager", "flash_attention_2")
# files of a checkpoint directory that are not weights (copied on export)
_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
               "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
               "processor_config.json", "video_preprocessor_config.json")


@dataclass
class LoadConfig:
    """How a checkpoint is loaded (every field is a flag: --load.dtype bfloat16)."""

    device: str = "auto"  # auto (cuda when available, else cpu) | cpu | cuda | cuda:N
    dtype: str = field(default="auto", metadata={"choices": tuple(DTYPES)})  # auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16
    attn_implementation: str = field(default="auto", metadata={"choices": ATTENTION})  # auto: flash_attention_2 on CUDA
    #                                 when flash-attn is installed, else sdpa
    max_image_tokens: int = 0  # cap on visual tokens per image (0 = the checkpoint's preprocessor config)
    allow_download: bool = False  # a hub id missing from the local HF cache may be downloaded (never when HF_HUB_OFFLINE=1)
    cache_dir: str = ""  # where tiny:... fixtures are written ("" = $SPYGLASS_CACHE/models or ~/.cache/spyglass/models)

    def __post_init__(self) -> None:
        base = self.device.split(":", 1)[0]
        check(base in DEVICES and (":" not in self.device or base == "cuda" and self.device[5:].isdigit()),
              f"load.device must be auto|cpu|cuda|cuda:N, got {self.device!r}")
        check(self.dtype in DTYPES, f"load.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        check(self.attn_implementation in ATTENTION,
              f"load.attn_implementation must be one of {list(ATTENTION)}, got {self.attn_implementation!r}")
        check(self.max_image_tokens == 0 or 4 <= self.max_image_tokens <= 1 << 20,
              f"load.max_image_tokens must be 0 or in [4, 1048576], got {self.max_image_tokens}")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"load.device={self.device!r} but torch sees no CUDA device")
        return dev

    def resolved_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return DTYPES[self.dtype]

    def resolved_attention(self, device: torch.device) -> str:
        if self.attn_implementation != "auto":
            return self.attn_implementation
        half = self.resolved_dtype(device) in (torch.bfloat16, torch.float16)  # flash-attn takes no fp32
        if device.type == "cuda" and half and importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
        return "sdpa"


@dataclass
class LoadedModel:
    """A loaded checkpoint: what the backends, the codec and the trainers share."""

    family: str            # the checkpoint's model_type (one of FAMILIES)
    model: Any             # *ForConditionalGeneration or *ForCausalLM, eval mode
    tokenizer: Any         # the checkpoint's tokenizer, with its chat template
    image_processor: Any = None  # Qwen2VLImageProcessorPil for VL families; None for text models
    path: Path | None = None     # the checkpoint directory it came from (None: built in memory)

    @property
    def is_vl(self) -> bool:
        return self.family in VL_FAMILIES

    @property
    def processor(self) -> Any:  # the image processor (the VL processor itself is never needed)
        return self.image_processor

    def codec(self, system: str | None = None) -> Any:
        from .chat import HFCodec  # noqa: PLC0415
        return HFCodec(self.tokenizer, self.image_processor, system)

    def save(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        return save_model(self, path, state_dict)


# ------------------------------------------------------------------------------ resolution
def _model_cache_dir(cfg: LoadConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    root = os.environ.get("SPYGLASS_CACHE")
    return Path(root) / "models" if root else Path.home() / ".cache" / "spyglass" / "models"


def resolve_checkpoint(spec: str, cfg: LoadConfig | None = None, seed: int = 0) -> Path:
    """The checkpoint directory `spec` names: an existing directory; `tiny:...` (the fixture,
    materialised once under the cache dir); or a hub id ("org/name") found in the local
    Hugging Face cache. Raises FileNotFoundError with what to do when none applies."""
    cfg = cfg or LoadConfig()
    if spec.startswith("tiny:"):
        from .offline.tiny import materialize  # noqa: PLC0415
        return materialize(spec, _model_cache_dir(cfg), seed)
    p = Path(spec).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"model {spec!r}: the directory has no config.json (not a Hugging Face checkpoint)")
        return p
    if not _hub_id_shaped(spec):
        raise FileNotFoundError(f"model {spec!r} is neither a checkpoint directory nor a hub id (org/name) "
                                f"nor tiny:<family>")
    return _from_hub_cache(spec, cfg)


def _hub_id_shaped(spec: str) -> bool:
    """`org/name` (not a path: no leading . / ~, both parts non-empty)."""
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and all(spec.split("/"))


def _from_hub_cache(repo_id: str, cfg: LoadConfig) -> Path:
    from huggingface_hub import snapshot_download  # noqa: PLC0415
    from huggingface_hub.errors import LocalEntryNotFoundError  # noqa: PLC0415
    from huggingface_hub.constants import HF_HUB_CACHE  # noqa: PLC0415
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    cache = os.environ.get("HF_HUB_CACHE") or HF_HUB_CACHE  # read now: the constant is fixed at import
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=offline or not cfg.allow_download))
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline else "downloads are off (--load.allow_download true allows them)"
        raise FileNotFoundError(f"model {repo_id!r} is not in the local Hugging Face cache ({cache}) and "
                                f"{why}; download it first (`hf download {repo_id}`) or pass its directory") from None


def is_model_spec(spec: str) -> bool:
    """Config validation: a tiny spec, a directory with config.json, or something shaped like
    a hub id (whether it is cached is checked when it is loaded)."""
    if spec.startswith("tiny:"):
        from .offline.tiny import parse_tiny_spec  # noqa: PLC0415
        try:
            parse_tiny_spec(spec)
        except ValueError:
            return False
        return True
    p = Path(spec).expanduser()
    if p.is_dir():
        return (p / "config.json").is_file()
    return _hub_id_shaped(spec)


def check_model_spec(spec: str, what: str = "model") -> None:
    check(is_model_spec(spec), f"{what} must be a Hugging Face checkpoint directory, a hub id in the local "
                               f"cache (org/name) or tiny:<family>[:<hidden>x<layers>[:<image tokens>]], got {spec!r}")


# ------------------------------------------------------------------------------ loading
def model_family(path: Path) -> str:
    """The checkpoint's model_type, checked against FAMILIES."""
    try:
        model_type = json.loads((path / "config.json").read_text())["model_type"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path / 'config.json'}: cannot read model_type ({e})") from None
    if model_type not in FAMILIES:
        raise ValueError(f"{path}: model_type {model_type!r} is not supported; supported: {list(FAMILIES)}")
    return model_type


def load_image_processor(path: Path, max_image_tokens: int = 0) -> Any:
    """The checkpoint's Qwen-VL image processor as the PIL implementation (the torchvision one
    cannot load without torchvision), with its patch/merge sizes and pixel limits."""
    from transformers import Qwen2VLImageProcessorPil  # noqa: PLC0415
    if not (path / "preprocessor_config.json").is_file():
        raise FileNotFoundError(f"{path}: a vision-language checkpoint needs preprocessor_config.json")
    improc = Qwen2VLImageProcessorPil.from_pretrained(path)
    if max_image_tokens:
        unit = (improc.patch_size * improc.merge_size) ** 2  # pixels per merged visual token
        size = {"shortest_edge": min(improc.size["shortest_edge"], max_image_tokens * unit),
                "longest_edge": max_image_tokens * unit}
        # min/max_pixels too: a Qwen2(.5)-VL preprocessor config's own min_pixels/max_pixels win over `size`
        improc = Qwen2VLImageProcessorPil.from_pretrained(path, size=size, min_pixels=size["shortest_edge"],
                                                          max_pixels=size["longest_edge"])
        if improc.size["longest_edge"] != size["longest_edge"]:
            raise RuntimeError(f"{path}: could not cap the image processor at {max_image_tokens} tokens "
                               f"(its size stays {dict(improc.size)})")
    return improc


def load_tokenizer(path: Path) -> Any:
    """The checkpoint's tokenizer; its chat template from tokenizer_config.json, or from
    chat_template.jinja / chat_template.json when the tokenizer config has none."""
    from transformers import AutoTokenizer  # noqa: PLC0415
    tok = AutoTokenizer.from_pretrained(path)
    if not tok.chat_template:
        if (path / "chat_template.jinja").is_file():
            tok.chat_template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        elif (path / "chat_template.json").is_file():
            tok.chat_template = json.loads((path / "chat_template.json").read_text())["chat_template"]
    if not tok.chat_template:
        raise ValueError(f"{path}: the checkpoint has no chat template (tokenizer_config.json, "
                         f"chat_template.jinja or chat_template.json)")
    return tok


def load_model(spec: str, cfg: LoadConfig | None = None, seed: int = 0) -> LoadedModel:
    """Load `spec` (see resolve_checkpoint) on cfg's device and dtype, eval mode."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText  # noqa: PLC0415
    cfg = cfg or LoadConfig()
    path = resolve_checkpoint(spec, cfg, seed)
    family = model_family(path)
    device = cfg.resolved_device()
    auto = AutoModelForImageTextToText if family in VL_FAMILIES else AutoModelForCausalLM
    model = auto.from_pretrained(path, dtype=cfg.resolved_dtype(device),
                                 attn_implementation=cfg.resolved_attention(device))
    model = model.to(device).eval()
    improc = load_image_processor(path, cfg.max_image_tokens) if family in VL_FAMILIES else None
    return LoadedModel(family, model, load_tokenizer(path), improc, path)


def codec_only(spec: str, cfg: LoadConfig | None = None) -> Any:
    """The chat codec of a checkpoint without its weights (tokenizer, template, image processor):
    what a run needs when generation happens on a server."""
    from .chat import HFCodec  # noqa: PLC0415
    cfg = cfg or LoadConfig()
    path = resolve_checkpoint(spec, cfg)
    family = model_family(path)
    improc = load_image_processor(path, cfg.max_image_tokens) if family in VL_FAMILIES else None
    return HFCodec(load_tokenizer(path), improc)


def save_model(loaded: LoadedModel, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `loaded` (or its architecture with `state_dict`'s weights) as a checkpoint directory
    every command takes as --model: weights (safetensors), config, tokenizer with its chat
    template, image processor; the source directory's other side files are copied. Written in a
    temporary directory first; into an existing directory only the checkpoint's files are
    replaced (other files there stay)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        if loaded.path is not None:
            for name in _SIDE_FILES:
                if (loaded.path / name).is_file():
                    shutil.copy2(loaded.path / name, tmp / name)
        loaded.model.save_pretrained(tmp, state_dict=state_dict)
        loaded.tokenizer.save_pretrained(tmp)
        if loaded.image_processor is not None:
            loaded.image_processor.save_pretrained(tmp)
        if not out.exists():
            os.replace(tmp, out)
        else:  # keep the directory's other files (logs beside the weights); replace the checkpoint's
            for old in [*out.glob("model*.safetensors*"), *out.glob("pytorch_model*.bin*")]:
                old.unlink()
            for f in tmp.iterdir():
                os.replace(f, out / f.name)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
