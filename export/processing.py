"""What transformers' Molmo2Processor and GenerationConfig would read from a checkpoint, read without them: the
tokenizer (`tokenizers` alone), its named special tokens, the chat template (rendered with jinja2 as transformers
renders it), the image processor settings and processor flags with their class defaults, and the stop tokens.

tests/test_checkpoint.py compares every value with what transformers gives for the same checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, processors

from molmocap.runtime.errors import ExportError

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Molmo2ImageProcessor's class defaults (and BaseImageProcessor's rescale factor), used where the JSON omits a key.
IMAGE_PROCESSOR_DEFAULTS = {"size": {"height": 378, "width": 378}, "patch_size": 14, "overlap_margins": [4, 4],
                            "pooling_size": [2, 2], "max_crops": 8, "image_mean": [0.5, 0.5, 0.5],
                            "image_std": [0.5, 0.5, 0.5], "rescale_factor": 1 / 255}
# Molmo2Processor's constructor defaults; use_single_crop_col_tokens None means "as image_use_col_tokens".
PROCESSOR_FLAG_DEFAULTS = {"image_use_col_tokens": True, "use_single_crop_col_tokens": None,
                           "use_single_crop_start_token": True}


def read_json(path: Path, default: dict | None = None) -> dict:
    """A JSON object file, `default` when it is absent, one ExportError line when it is unreadable."""
    if default is not None and not path.is_file():
        return default
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ExportError(f"cannot read {path}: {exc}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise ExportError(f"cannot read {path}: not a JSON object")
    return data


def _content(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _added_token(entry: dict) -> AddedToken:
    keys = ("single_word", "lstrip", "rstrip", "normalized", "special")
    return AddedToken(entry["content"], **{key: entry[key] for key in keys if key in entry})


@dataclass
class Processing:
    """A checkpoint's text and image processing settings, as the exporter writes them into the manifest."""

    tokenizer: Tokenizer
    special_tokens: dict[str, str]
    chat_template: str | None
    image_processor: dict
    flags: dict
    eos_token_id: int | list[int] | None

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token") or self.special_tokens.get("eos_token")

    def render_chat(self, messages: list[dict]) -> str:
        """The chat template applied with a generation prompt, as `Molmo2Processor.apply_chat_template` does."""
        import jinja2

        try:
            return _jinja_env().from_string(self.chat_template).render(
                messages=messages, tools=None, documents=None, add_generation_prompt=True, **self.special_tokens)
        except jinja2.TemplateError as exc:
            raise ExportError(f"cannot render the checkpoint's chat template: {exc}".splitlines()[0]) from None


def _jinja_env():
    """A sandbox set up as transformers sets up the one it renders chat templates in."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       namespace=jinja2.utils.Namespace)
    return env


def load_tokenizer(path: Path) -> tuple[Tokenizer, dict[str, str]]:
    """tokenizer.json with tokenizer_config.json's adjustments applied as transformers' TokenizersBackend applies
    them (missing added and special tokens added, the post-processor rebuilt when add_bos/add_eos_token are set),
    and the named special tokens."""
    config = read_json(path / "tokenizer_config.json", {})
    named = {name: _content(config.get(name)) for name in SPECIAL_TOKEN_NAMES}
    if "added_tokens_decoder" not in config:  # the legacy file, read by transformers only in this case
        legacy = read_json(path / "special_tokens_map.json", {})
        named.update({name: _content(legacy[name]) for name in SPECIAL_TOKEN_NAMES if name in legacy})
    special = {name: token for name, token in named.items() if token is not None}
    try:
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises its own exception types
        raise ExportError(f"cannot load the tokenizer of {path}: {exc}".splitlines()[0]) from None
    present = {str(token): token for token in tokenizer.get_added_tokens_decoder().values()}
    entries = sorted(config.get("added_tokens_decoder", {}).items(), key=lambda item: int(item[0]))
    missing = [_added_token(entry) for _, entry in entries
               if repr(present.get(entry["content"])) != repr(_added_token(entry))]
    missing += [AddedToken(token, special=True) for token in special.values()
                if token not in present and token not in {t.content for t in missing}]
    if missing:
        tokenizer.add_tokens(missing)
    tokenizer.encode_special_tokens = bool(config.get("split_special_tokens", False))
    add_bos, add_eos = bool(config.get("add_bos_token")), bool(config.get("add_eos_token"))
    if "add_bos_token" in config or "add_eos_token" in config or tokenizer.post_processor is None:
        bos, eos = special.get("bos_token") if add_bos else None, special.get("eos_token") if add_eos else None
        single = " ".join([f"{bos}:0"] * bool(bos) + ["$A:0"] + [f"{eos}:0"] * bool(eos))
        pair = " ".join([single] + [f"{bos}:1"] * bool(bos) + ["$B:1"] + [f"{eos}:1"] * bool(eos))
        tokens = [(t, tokenizer.token_to_id(t)) for t in (bos, eos) if t]
        tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=tokens)
    return tokenizer, special


def load_chat_template(path: Path, processor_config: dict) -> str | None:
    """The processor's chat template: processor_config.json's own, else chat_template.json (legacy), else
    chat_template.jinja; with several templates, the one named "default"."""
    template = processor_config.get("chat_template")
    if template is None and (path / "chat_template.json").is_file():
        template = read_json(path / "chat_template.json").get("chat_template")
    elif template is None:
        templates = {file.stem: file.read_text(encoding="utf-8")
                     for file in sorted((path / "additional_chat_templates").glob("*.jinja"))}
        if (path / "chat_template.jinja").is_file():
            templates["default"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
        template = templates.get("default") if len(templates) != 1 else next(iter(templates.values()))
        if templates and template is None:
            raise ExportError(f"{path} has several chat templates and none is named default")
    if isinstance(template, dict):
        template = template.get("default")
    return template


def image_processor_settings(path: Path, processor_config: dict) -> dict:
    """The image processor's settings: processor_config.json's nested `image_processor` (transformers 5 layout),
    else preprocessor_config.json (the hub's), over Molmo2ImageProcessor's class defaults."""
    settings = processor_config.get("image_processor")
    if settings is None:
        settings = read_json(path / "preprocessor_config.json", {})
    merged = {**IMAGE_PROCESSOR_DEFAULTS, **{k: v for k, v in settings.items() if k in IMAGE_PROCESSOR_DEFAULTS}}
    size = merged.pop("size")
    merged["crop_size"] = size if isinstance(size, int) else size.get("height")
    if not isinstance(merged["crop_size"], int):
        raise ExportError(f"unsupported image processor size {size!r} in {path}")
    return merged


def load_processing(path: Path) -> Processing:
    """Everything Molmo2Processor.from_pretrained and GenerationConfig.from_pretrained would give the exporter."""
    processor_config = read_json(path / "processor_config.json", {})
    tokenizer, special = load_tokenizer(path)
    flags = {key: processor_config.get(key, default) for key, default in PROCESSOR_FLAG_DEFAULTS.items()}
    generation = read_json(path / "generation_config.json", {})
    return Processing(tokenizer=tokenizer, special_tokens=special,
                      chat_template=load_chat_template(path, processor_config),
                      image_processor=image_processor_settings(path, processor_config), flags=flags,
                      eos_token_id=generation.get("eos_token_id"))
