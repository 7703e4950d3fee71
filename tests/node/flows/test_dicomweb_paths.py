"""The DICOMweb paths a node serves, parsed (every level and resource of PS3.18, nothing
else), and the pieces of the proxy that need no server: URLs rewritten across chunks, the
Accept header Orthanc needs for frames, a PACS root without its credentials."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fhir_adapters.errors import InvalidRequest, NotFound
from node.flows.dicomweb import _with_query, pacs_accept, public_root, rewritten
from node.flows.dicomweb_paths import parse_target

ST, SE, SOP = "1.2.3", "1.2.3.4", "1.2.3.4.5"
INSTANCE = f"studies/{ST}/series/{SE}/instances/{SOP}"


@pytest.mark.parametrize(
    ("path", "kind", "study", "series", "instance", "upstream"),
    [
        ("studies", "search", None, None, None, "studies"),
        ("series", "search", None, None, None, "series"),
        ("instances", "search", None, None, None, "instances"),
        (f"studies/{ST}", "retrieve", ST, None, None, f"studies/{ST}"),
        (f"studies/{ST}/metadata", "metadata", ST, None, None, f"studies/{ST}/metadata"),
        (f"studies/{ST}/rendered", "rendered", ST, None, None, f"studies/{ST}/rendered"),
        (f"studies/{ST}/thumbnail", "thumbnail", ST, None, None, f"studies/{ST}/rendered"),
        (f"studies/{ST}/series", "search", ST, None, None, f"studies/{ST}/series"),
        (f"studies/{ST}/instances", "search", ST, None, None, f"studies/{ST}/instances"),
        (f"studies/{ST}/series/{SE}", "retrieve", ST, SE, None, f"studies/{ST}/series/{SE}"),
        (
            f"studies/{ST}/series/{SE}/instances",
            "search",
            ST,
            SE,
            None,
            f"studies/{ST}/series/{SE}/instances",
        ),
        (
            f"studies/{ST}/series/{SE}/thumbnail",
            "thumbnail",
            ST,
            SE,
            None,
            f"studies/{ST}/series/{SE}/rendered",
        ),
        (INSTANCE, "retrieve", ST, SE, SOP, INSTANCE),
        (f"{INSTANCE}/metadata", "metadata", ST, SE, SOP, f"{INSTANCE}/metadata"),
        (f"{INSTANCE}/frames/1,2,3", "frames", ST, SE, SOP, f"{INSTANCE}/frames/1,2,3"),
        (f"{INSTANCE}/frames/2/rendered", "rendered", ST, SE, SOP, f"{INSTANCE}/frames/2/rendered"),
        (
            f"{INSTANCE}/frames/2/thumbnail",
            "thumbnail",
            ST,
            SE,
            SOP,
            f"{INSTANCE}/frames/2/rendered",
        ),
        (f"{INSTANCE}/bulk/7fe00010", "bulkdata", ST, SE, SOP, f"{INSTANCE}/bulk/7fe00010"),
        (f"/{INSTANCE}/", "retrieve", ST, SE, SOP, INSTANCE),
    ],
)
def test_every_dicomweb_resource_is_parsed(
    path: str,
    kind: str,
    study: str | None,
    series: str | None,
    instance: str | None,
    upstream: str,
) -> None:
    target = parse_target(path, [])
    assert (target.kind, target.study, target.series, target.instance, target.upstream) == (
        kind,
        study,
        series,
        instance,
        upstream,
    )


def test_a_thumbnail_is_a_small_rendering_unless_a_viewport_is_asked() -> None:
    assert parse_target(f"{INSTANCE}/thumbnail", []).params == (("viewport", "128,128"),)
    asked = [("viewport", "64,64"), ("quality", "80")]
    assert parse_target(f"{INSTANCE}/thumbnail", asked).params == tuple(asked)
    assert parse_target(f"{INSTANCE}/rendered", []).params == ()


def test_a_search_names_its_study_only_by_one_plain_uid() -> None:
    assert parse_target("studies", [("StudyInstanceUID", ST)]).study == ST
    assert parse_target("studies", [("0020000D", ST)]).study == ST
    assert parse_target("series", [("0020000D", ST)]).study == ST
    for params in (
        [("StudyInstanceUID", f"{ST},{SE}")],  # two studies
        [("StudyInstanceUID", "1.2*")],  # a wildcard
        [("StudyInstanceUID", ST), ("StudyInstanceUID", SE)],
        [("PatientID", "MRN-7")],
    ):
        assert parse_target("studies", params).study is None


@pytest.mark.parametrize(
    "path",
    [
        "",
        "tools/find",
        f"series/{SE}",
        f"instances/{SOP}",
        f"studies/{ST}/series/{SE}/series",
        f"studies/{ST}/instances/{SOP}/metadata",
        f"studies/{ST}/instances/{SOP}",
        f"studies/{ST}/frames/1",
        f"studies/{ST}/bulk/7fe00010",
        f"{INSTANCE}/frames/1/metadata",
        f"{INSTANCE}/bulk/../../x",
        f"{INSTANCE}/bulk/7fe0",
        f"{INSTANCE}/unknown",
    ],
)
def test_anything_else_is_not_found(path: str) -> None:
    with pytest.raises(NotFound):
        parse_target(path, [])


@pytest.mark.parametrize(
    "path",
    [
        "studies/1.2.x",
        "studies/../../tools",
        "studies/01.2",  # a UID component has no leading zero
        "studies/1..2",
        "studies/" + "1." * 40 + "1",  # over 64 characters
        f"studies/{ST}/series/abc",
        f"studies/{ST}/series/{SE}/instances/1.2-3",
        f"{INSTANCE}/frames/0",
        f"{INSTANCE}/frames/1,,2",
        f"{INSTANCE}/frames/x",
        f"{INSTANCE}/frames/1234567",
    ],
)
def test_malformed_uids_and_frame_lists_are_bad_requests(path: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_target(path, [])


OLD, NEW = b"http://pacs:8042/dicom-web", b"https://hosp-a.example/dicomweb"


@given(
    st.lists(
        st.sampled_from([OLD, b'"', b"/studies/1.2", b"http://pacs:80", b"x", b"h", b"\n"]),
        max_size=30,
    ),
    st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=30),
)
def test_urls_are_rewritten_wherever_the_chunks_split_them(
    pieces: list[bytes], sizes: list[int]
) -> None:
    text = b"".join(pieces)
    chunks, at, turn = [], 0, 0
    while at < len(text):
        size = sizes[turn % len(sizes)]
        chunks.append(text[at : at + size])
        at, turn = at + size, turn + 1
    assert b"".join(rewritten(iter(chunks), OLD, NEW)) == text.replace(OLD, NEW)


def test_frames_of_any_type_are_asked_for_as_stored() -> None:
    as_stored = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
    for accept in (None, "*/*", 'multipart/related; type="*/*"', "multipart/related"):
        assert pacs_accept("frames", accept) == as_stored
        assert pacs_accept("bulkdata", accept) == as_stored
    explicit = 'multipart/related; type="image/jls"'
    assert pacs_accept("frames", explicit) == explicit
    assert pacs_accept("rendered", None) == "*/*"
    assert pacs_accept("metadata", "application/dicom+json") == "application/dicom+json"


def test_the_pacs_root_is_shown_without_credentials_and_lists_keep_commas() -> None:
    assert public_root("http://u:p@127.0.0.1:8042/dicom-web/") == "http://127.0.0.1:8042/dicom-web"
    assert public_root("https://pacs.example/dicom-web") == "https://pacs.example/dicom-web"
    assert (
        _with_query("http://x/rendered", (("viewport", "64,64"), ("window", "40,400,linear")))
        == "http://x/rendered?viewport=64,64&window=40,400,linear"
    )
    assert _with_query("http://x/studies", ()) == "http://x/studies"
    assert _with_query("http://x/studies", (("PatientName", "张*"),)).endswith(
        "PatientName=%E5%BC%A0%2A"
    )
