"""Caption styles: the instruction sent for each style, and the cleanup of what the model answers.

Hosted captioning APIs sell alt text, SEO metadata and tags as well as plain captions. Each style is an instruction
phrased the way Molmo2's instruction tuning asks for captions and lists; a model directory may override any of them
(manifest `prompt.styles`, e.g. a demo model trained on its own phrasings). The JSON styles never pass broken JSON
on: the answer is repaired into the promised shape or a `StyleOutputError` is raised; so does an API request's
JSON `format` (a JSON object, or a JSON schema's shape).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from .errors import MolmocapError

STYLES = ("short", "detailed", "alt", "seo", "tags")
ALT_MAX_CHARS = 125

DEFAULT_PROMPTS = {
    "short": "Write a short one-sentence caption for this image.",
    "detailed": "Describe this image in detail.",
    "alt": "Write alt text for this image for people using a screen reader: one short sentence about what matters, "
           "at most 125 characters, not starting with 'image of' or 'picture of'.",
    "seo": "Describe this image for search engines. Answer with only a JSON object with the keys \"title\" (at most "
           "60 characters), \"caption\" (one sentence) and \"keywords\" (a list of 5 to 10 lowercase keywords).",
    "tags": "List 5 to 15 tags for this image. Answer with only a JSON array of lowercase strings.",
}

_ALT_LEADS = re.compile(r"^\s*(?:an?\s+|the\s+)?(?:close-up\s+)?(?:image|picture|photo|photograph|illustration)"
                        r"\s+(?:of|showing|shows|depicting)\s+", re.IGNORECASE)
_STOPWORDS = frozenset("a an the and or of in on at to with for from by is are was were this that there it its "
                       "image picture photo shows showing".split())


class StyleOutputError(MolmocapError):
    """The model's answer for a JSON style could not be repaired into valid JSON of the promised shape."""

    exit_code = 1


def style_prompt(style: str, lang: str | None = None, overrides: dict[str, str] | None = None) -> str:
    """The instruction for `style`, asking for an answer in `lang` when given."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose one of {', '.join(STYLES)}")
    prompt = (overrides or {}).get(style) or DEFAULT_PROMPTS[style]
    return f"{prompt} Answer in {lang}." if lang else prompt


def finish(style: str, text: str) -> str | dict | list:
    """Clean the raw answer: trimmed text for short/detailed, bounded alt text, a dict for seo, a list for tags."""
    text = text.strip()
    if style in ("short", "detailed"):
        return text
    if style == "alt":
        return alt_text(text)
    if style == "seo":
        return seo_object(text)
    if style == "tags":
        return tag_list(text)
    raise ValueError(f"unknown style {style!r}")


def alt_text(text: str) -> str:
    """One line of at most 125 characters, without a leading "image of", cut at a word boundary."""
    text = " ".join(_ALT_LEADS.sub("", text).split())
    text = text[:1].upper() + text[1:]
    if len(text) <= ALT_MAX_CHARS:
        return text
    cut = text[: ALT_MAX_CHARS - 1].rsplit(" ", 1)[0].rstrip(" ,;:-")
    return cut + "…"


def _json_candidates(text: str, opener: str, closer: str) -> list[str]:
    """The text itself, then the outermost bracketed span, then that span with common slips fixed."""
    candidates = [text]
    start, end = text.find(opener), text.rfind(closer)
    if start != -1 and end > start:
        span = text[start:end + 1]
        candidates.append(span)
        fixed = re.sub(r",\s*([}\]])", r"\1", span)
        if "'" in fixed and '"' not in fixed:
            fixed = fixed.replace("'", '"')
        candidates.append(fixed)
    elif start != -1:
        candidates.append(text[start:] + closer)
    return candidates


def _parse(text: str, opener: str, closer: str, accept: Callable[[object], bool]):
    """The first repair candidate that parses and that `accept` takes, else None."""
    for candidate in _json_candidates(text, opener, closer):
        try:
            value = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if accept(value):
            return value
    return None


def _keywords_from_text(text: str, limit: int = 10) -> list[str]:
    words = [w.lower() for w in re.findall(r"[A-Za-z][A-Za-z'-]+", text)]
    seen: list[str] = []
    for word in words:
        if word not in _STOPWORDS and word not in seen and len(word) > 2:
            seen.append(word)
    return seen[:limit]


def _clean_tags(items) -> list[str]:
    tags: list[str] = []
    for item in items:
        tag = " ".join(str(item).strip().strip("#*-•\"'").lower().split())
        if tag and tag not in tags:
            tags.append(tag)
    return tags


def tag_list(text: str) -> list[str]:
    """A JSON list of lowercase tags; a comma, newline or bullet separated answer is split into one."""
    parsed = _parse(text, "[", "]", lambda value: isinstance(value, list))
    items = parsed if parsed is not None else re.split(r"[,\n;]+", text.strip("[]{} \n"))
    tags = _clean_tags(items)
    if not tags:
        raise StyleOutputError(f"the model's answer is not a list of tags: {text[:80]!r}")
    return tags


def seo_object(text: str) -> dict:
    """{"title", "caption", "keywords"}; missing fields are filled from the caption text."""
    parsed = _parse(text, "{", "}", lambda value: isinstance(value, dict)) or {}
    caption = str(parsed.get("caption") or parsed.get("description") or "").strip()
    if not caption and not parsed:
        caption = text.strip()
    if not caption:
        raise StyleOutputError(f"the model's answer holds no caption: {text[:80]!r}")
    title = str(parsed.get("title") or "").strip() or caption.split(". ")[0].rstrip(".")
    if len(title) > 60:
        title = title[:59].rsplit(" ", 1)[0] + "…"
    keywords = parsed.get("keywords")
    if isinstance(keywords, str):
        keywords = keywords.split(",")
    keywords = _clean_tags(keywords) if isinstance(keywords, list) else []
    return {"title": title, "caption": caption, "keywords": keywords or _keywords_from_text(caption)}


def json_format_prompt(prompt: str, schema: dict | None) -> str:
    """`prompt` asking for JSON (of `schema`'s shape when given), for requests with a JSON `format`.

    Decoding is greedy and unconstrained, so the model is told the shape it must produce; `json_answer` then holds
    the answer to it.
    """
    if schema is None:
        return f"{prompt} Answer with only a JSON object."
    return f"{prompt} Answer with only JSON that matches this JSON schema: {json.dumps(schema, ensure_ascii=False)}"


def json_answer(text: str, schema: dict | None = None) -> object:
    """The answer as a JSON object, or as a value matching `schema`, repaired as the seo/tags answers are.

    Raises `StyleOutputError` when no repair of the answer has that shape: a JSON format never passes on broken or
    wrongly shaped JSON.
    """
    schema = {"type": "object"} if schema is None else schema
    opener, closer = ("[", "]") if schema.get("type") == "array" else ("{", "}")
    problems: list[str] = []

    def accept(value: object) -> bool:
        problem = "$ is null" if value is None else schema_mismatch(value, schema)
        if problem:
            problems.append(problem)
        return problem is None

    value = _parse(text.strip(), opener, closer, accept)
    if value is None:
        why = problems[0] if problems else "no JSON found"
        raise StyleOutputError(f"the model's answer is not JSON of the requested format ({why}): {text[:80]!r}")
    return value


_JSON_TYPES: dict[str, Callable[[object], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer()),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def schema_mismatch(value: object, schema: dict, where: str = "$") -> str | None:
    """Why `value` does not match a JSON schema, or None when it does.

    Checks the keywords structured-output schemas use (type, enum, const, properties, required,
    additionalProperties false, items); others are not checked.
    """
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        if not any(_JSON_TYPES.get(name, lambda v: True)(value) for name in names):
            return f"{where} is not of type {'/'.join(names)}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{where} is not one of {schema['enum']}"
    if "const" in schema and value != schema["const"]:
        return f"{where} is not {schema['const']!r}"
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        missing = [key for key in schema.get("required") or [] if key not in value]
        if missing:
            return f"{where} lacks {', '.join(missing)}"
        if schema.get("additionalProperties") is False and set(value) - set(properties):
            return f"{where} has unexpected keys {', '.join(sorted(set(value) - set(properties)))}"
        for key, sub in properties.items():
            if key in value and isinstance(sub, dict):
                problem = schema_mismatch(value[key], sub, f"{where}.{key}")
                if problem:
                    return problem
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            problem = schema_mismatch(item, schema["items"], f"{where}[{i}]")
            if problem:
                return problem
    return None
