"""XMP sidecars: `photo.jpg` -> `photo.xmp` with the caption as dc:description and tags as dc:subject.

Photo managers (Lightroom, darktable, digiKam) read these. The description is an x-default `rdf:Alt`. Keywords go
into a `dc:subject` bag when there are any: the tags of `--style tags` (or any answer that is a JSON list of
strings, then also the description, joined by commas) and the keywords of `--style seo` (whose caption is the
description); plain text gets no dc:subject. The sidecar carries `molmocap:image` (the image's file name) so a later
run knows which sidecars it wrote: it replaces those for the same image and refuses any other existing sidecar
(one another tool wrote, or one molmocap wrote for `photo.png` when captioning `photo.jpg`) unless forced.
"""

from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from .errors import InputError
from .files import replace_atomically

NS = {
    "x": "adobe:ns:meta/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "dc": "http://purl.org/dc/elements/1.1/",
    "molmocap": "urn:molmocap:xmp:1/",
}
_XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"
# Characters XML 1.0 cannot hold, even escaped.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")

for _prefix, _uri in NS.items():
    ET.register_namespace(_prefix, _uri)


def _q(prefix: str, name: str) -> str:
    return f"{{{NS[prefix]}}}{name}"


def sidecar_path(image: str | os.PathLike) -> Path:
    """`photo.jpg` -> `photo.xmp`, next to the image (Adobe's naming)."""
    return Path(image).with_suffix(".xmp")


def _string_list(value: object) -> list[str] | None:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        return None
    return [item.strip() for item in value if item.strip()]


def sidecar_fields(answer: str | list | dict) -> tuple[str, list[str] | None]:
    """(description, keywords or None) for an answer: text, a tag list, or an seo object."""
    if isinstance(answer, dict):
        return str(answer.get("caption") or answer.get("title") or ""), _string_list(answer.get("keywords"))
    if isinstance(answer, str):
        try:
            tags = _string_list(json.loads(answer))
        except ValueError:
            tags = None
        if tags is None:
            return answer.strip(), None
    else:
        tags = _string_list([str(item) for item in answer])
    return ", ".join(tags), tags


def sidecar_xml(image: str | os.PathLike, answer: str | list | dict, model: str) -> bytes:
    """The sidecar document for `image` described by `answer` (see `sidecar_fields`) from model id `model`.

    UTF-8 with an XML declaration; characters XML cannot hold are dropped.
    """
    description, tags = sidecar_fields(answer)
    root = ET.Element(_q("x", "xmpmeta"), {_q("x", "xmptk"): "molmocap"})
    rdf = ET.SubElement(root, _q("rdf", "RDF"))
    node = ET.SubElement(rdf, _q("rdf", "Description"), {
        _q("rdf", "about"): "", _q("molmocap", "image"): _NOT_XML.sub("", Path(image).name),
        _q("molmocap", "model"): model})
    alt = ET.SubElement(ET.SubElement(node, _q("dc", "description")), _q("rdf", "Alt"))
    ET.SubElement(alt, _q("rdf", "li"), {_XML_LANG: "x-default"}).text = _NOT_XML.sub("", description)
    if tags:
        bag = ET.SubElement(ET.SubElement(node, _q("dc", "subject")), _q("rdf", "Bag"))
        for tag in tags:
            ET.SubElement(bag, _q("rdf", "li")).text = _NOT_XML.sub("", tag)
    ET.indent(root, space=" ")
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def written_for(sidecar: Path) -> str | None:
    """The image file name a molmocap sidecar was written for; None for a file molmocap did not write."""
    try:
        root = ET.parse(sidecar).getroot()
    except (OSError, ET.ParseError):
        return None
    node = root.find(f"{_q('rdf', 'RDF')}/{_q('rdf', 'Description')}")
    return None if node is None else node.get(_q("molmocap", "image"))


def check_sidecar(image: str | os.PathLike, force: bool = False) -> Path:
    """The sidecar path for `image`, or `InputError` when writing it would clobber someone else's file."""
    path = sidecar_path(image)
    if force or not path.exists():
        return path
    owner = written_for(path)
    if owner == Path(image).name:
        return path
    whose = f"molmocap's sidecar for {owner}" if owner else "a sidecar molmocap did not write"
    raise InputError(f"{path} exists and is {whose}; pass --force to replace it")


def write_sidecar(image: str | os.PathLike, answer: str | list | dict, model: str, force: bool = False) -> Path:
    """Write (atomically) the sidecar of `image`, subject to `check_sidecar`; returns its path."""
    path = check_sidecar(image, force)
    try:
        replace_atomically(path, sidecar_xml(image, answer, model))
    except OSError as exc:
        raise InputError(f"cannot write sidecar {path}: {exc.strerror or exc}") from None
    return path


