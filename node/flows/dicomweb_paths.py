"""The DICOMweb requests a node answers, parsed: which resource of which study a path names.

A node serves the studies of its PACS as standard DICOMweb under ``/dicomweb`` (QIDO-RS
searches, WADO-RS retrieval, metadata, frames, bulk data, ``/rendered`` and ``/thumbnail``;
PS3.18 §10.4, §10.6). :func:`parse_target` accepts exactly those paths — every UID checked as
a UID, every frame list as frame numbers — so that nothing else of the PACS is reachable
through the node, and says what the request asks (its :class:`Target`). ``/thumbnail``, which
Orthanc 1.10's DICOMweb plugin lacks, becomes a ``/rendered`` of the same resource at a small
viewport.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fhir_adapters.errors import InvalidRequest, NotFound

UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
FRAMES = re.compile(r"[1-9][0-9]{0,5}(,[1-9][0-9]{0,5}){0,255}")
BULK_TAG = re.compile(r"[0-9a-fA-F]{8}(/[0-9a-fA-F]{8}|/[0-9]{1,4})*")
LEVELS = ("studies", "series", "instances")
THUMBNAIL_VIEWPORT = "128,128"  # PS3.18 leaves the size to the origin server
KINDS = ("search", "retrieve", "metadata", "frames", "rendered", "thumbnail", "bulkdata")


@dataclass(frozen=True)
class Target:
    """One DICOMweb request, parsed.

    ``kind``: ``search`` (QIDO-RS), ``retrieve`` (the DICOM instances), ``metadata``,
    ``frames``, ``rendered``, ``thumbnail`` or ``bulkdata``. ``study``: the Study Instance UID
    the request is confined to (from its path, or a search's single ``StudyInstanceUID``), or
    None for a search across studies. ``upstream``: the path to ask the PACS, relative to its
    DICOMweb root; ``params``: the query to send it."""

    kind: str
    study: str | None
    series: str | None
    instance: str | None
    upstream: str
    params: tuple[tuple[str, str], ...]


def _uid(text: str, what: str) -> str:
    if len(text) > 64 or not UID.fullmatch(text):
        raise InvalidRequest(f"{text[:70]!r} is not a DICOM UID ({what})")
    return text


def parse_target(path: str, params: list[tuple[str, str]]) -> Target:
    """The :class:`Target` of a request for ``path`` (relative to ``/dicomweb``) with query
    ``params``; 400 for a malformed UID or frame list, 404 for any other path."""
    parts = path.strip("/").split("/") if path.strip("/") else []
    unknown = NotFound(f"/dicomweb/{path.strip('/')[:200]} is no DICOMweb resource served here")
    if not parts or parts[0] not in LEVELS:
        raise unknown
    if len(parts) == 1:  # a search across studies, or across every study's series/instances
        return Target("search", _searched_study(params), None, None, parts[0], tuple(params))
    if parts[0] != "studies":
        raise unknown
    study = _uid(parts[1], "study")
    series = instance = None
    rest = parts[2:]
    if rest[:1] == ["series"] and len(rest) >= 2:
        series, rest = _uid(rest[1], "series"), rest[2:]
    if rest[:1] == ["instances"] and len(rest) >= 2:
        if series is None and rest[2:]:
            raise unknown  # studies/{uid}/instances/{uid}/... is no DICOMweb path
        instance, rest = _uid(rest[1], "instance"), rest[2:]
    if series is None and instance is not None:
        raise unknown
    base = "/".join(
        ["studies", study]
        + (["series", series] if series else [])
        + (["instances", instance] if instance else [])
    )
    kind, tail, query = _resource(rest, series, instance, params, unknown)
    return Target(kind, study, series, instance, base + tail, tuple(query))


def _resource(
    rest: list[str],
    series: str | None,
    instance: str | None,
    params: list[tuple[str, str]],
    unknown: NotFound,
) -> tuple[str, str, list[tuple[str, str]]]:
    """What follows the study, series or instance in a path: the kind, the path's tail to
    ask the PACS, and the query to send it."""
    if not rest:
        return "retrieve", "", params
    if rest in (["series"], ["instances"]) and instance is None:
        if rest == ["series"] and series is not None:
            raise unknown
        return "search", "/" + rest[0], params
    if rest == ["metadata"]:
        return "metadata", "/metadata", params
    if rest == ["rendered"]:
        return "rendered", "/rendered", params
    if rest == ["thumbnail"]:
        return "thumbnail", "/rendered", _thumbnail_query(params)
    if instance is not None and rest[0] == "frames" and len(rest) in (2, 3):
        if not FRAMES.fullmatch(rest[1]):
            raise InvalidRequest(f"{rest[1][:40]!r} is not a list of frame numbers (1, 2, ...)")
        if len(rest) == 2:
            return "frames", f"/frames/{rest[1]}", params
        if rest[2] == "rendered":
            return "rendered", f"/frames/{rest[1]}/rendered", params
        if rest[2] == "thumbnail":
            return "thumbnail", f"/frames/{rest[1]}/rendered", _thumbnail_query(params)
    if instance is not None and rest[0] == "bulk" and BULK_TAG.fullmatch("/".join(rest[1:])):
        return "bulkdata", "/" + "/".join(rest), params
    raise unknown


def _thumbnail_query(params: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """A thumbnail is a rendering at the viewport asked for, or a small one."""
    if any(name == "viewport" for name, _ in params):
        return params
    return [*params, ("viewport", THUMBNAIL_VIEWPORT)]


def _searched_study(params: list[tuple[str, str]]) -> str | None:
    """The one study a search across studies is confined to: its ``StudyInstanceUID`` (by
    keyword or tag) when that names exactly one UID, else None."""
    values = [v for name, v in params if name in ("StudyInstanceUID", "0020000D", "0020000d")]
    if len(values) == 1 and len(values[0]) <= 64 and UID.fullmatch(values[0]):
        return values[0]
    return None
