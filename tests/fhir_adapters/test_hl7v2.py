"""The HL7 v2 adapter without sockets: character sets, parsing, the mapping to FHIR, ACKs, and
storing messages in a real node database (idempotence, corrections, quarantine, replay)."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa

from fhir_adapters import hl7v2
from fhir_adapters.hl7v2 import Hl7Error, Systems, build_ack, parse_ack, parse_message
from fhir_adapters.store.resources import validate
from fhir_adapters.ucum import to_ucum
from node.base.config import load_config
from node.db.schema import messages_table, quarantine_table
from node.intake.hl7 import Hl7Intake, patients_with
from node.intake.quarantine import quarantined
from node.services import Services, open_services
from tests.helpers.hl7_messages import (
    ALL_SAMPLES,
    CBC,
    CHEM,
    CHEM_CORRECTION,
    CODECS,
    URINE,
    cbc,
    get_field,
    remove_segments,
    resident_id,
    sample,
    set_field,
)
from tests.helpers.nodes import free_port, init_node

SYSTEMS = Systems("hosp-a")
RESIDENT = "urn:oid:2.16.156.10011.1.3"


def mapped(message: bytes) -> list[hl7v2.PatientResults]:
    return hl7v2.read_results(parse_message(message), SYSTEMS)


def observations(message: bytes) -> list[dict[str, Any]]:
    found = []
    for group in mapped(message):
        for order in group.orders:
            found += [result.observation("p1") for result in order.results]
    return found


def by_code(message: bytes, code: str) -> dict[str, Any]:
    for observation in observations(message):
        if any(c["code"] == code for c in observation["code"]["coding"]):
            return observation
    raise KeyError(code)


def refused(message: bytes) -> Hl7Error:
    with pytest.raises(Hl7Error) as caught:
        mapped(message)
    return caught.value


# -- units --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "ucum"),
    [
        ("10^9/L", "10*9/L"),
        ("×10^12/L", "10*12/L"),
        ("10E9/L", "10*9/L"),
        ("10*9/L", "10*9/L"),
        ("μmol/L", "umol/L"),
        ("µmol/l", "umol/L"),
        ("mIU/mL", "m[IU]/mL"),
        ("IU/L", "[IU]/L"),
        ("U/L", "U/L"),
        ("mmHg", "mm[Hg]"),
        ("％", "%"),
        ("个/HP", "/[HPF]"),
        ("mL/min/1.73m2", "mL/min/{1.73_m2}"),
    ],
)
def test_units_lis_write_are_recognised_as_ucum(written: str, ucum: str) -> None:
    assert to_ucum(written) == ucum


def test_unknown_units_are_not_guessed() -> None:
    assert to_ucum("拷贝/毫升") is None
    assert to_ucum("") is None
    assert to_ucum("G/L") is None  # giga per litre, not grams: not in the table


# -- character sets -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "declared", ["GB 18030-2000", "GB18030", "gb-18030", "GB18030-2005", "GBK", "GB2312"]
)
def test_gb18030_is_read_under_every_spelling(declared: str) -> None:
    message = set_field(sample(CHEM), "MSH", 18, declared, codec="gb18030")
    parsed = parse_message(message)
    assert parsed.charset.codec == "gb18030"
    assert parsed.charset.declared == declared
    assert parsed.sending_facility == "浙江省人民医院"
    patient = mapped(message)[0].patient
    assert patient.demographics["name"][0]["text"] == "李四"


@pytest.mark.parametrize("declared", ["UNICODE UTF-8", "UTF-8", "utf8"])
def test_utf8_is_read_under_its_names(declared: str) -> None:
    parsed = parse_message(set_field(sample(CBC), "MSH", 18, declared))
    assert (parsed.charset.codec, parsed.charset.note) == ("utf-8", None)


def test_empty_msh18_means_utf8_and_gb18030_is_read_with_a_note() -> None:
    utf8 = set_field(sample(CBC), "MSH", 18, "")
    assert parse_message(utf8).charset.codec == "utf-8"
    gb = set_field(sample(CHEM), "MSH", 18, "", codec="gb18030")
    parsed = parse_message(gb)
    assert parsed.charset.codec == "gb18030"
    assert parsed.charset.note is not None and "MSH-18 is empty" in parsed.charset.note
    assert mapped(gb)[0].patient.demographics["name"][0]["text"] == "李四"


def test_bytes_not_in_the_declared_character_set_are_rejected() -> None:
    utf8_declared = set_field(sample(CHEM), "MSH", 18, "UNICODE UTF-8", codec="gb18030")
    error = refused(utf8_declared)
    assert (error.ack_code, error.code, str(error.location)) == ("AR", 102, "MSH-18")
    assert "UNICODE UTF-8" in error.text


@pytest.mark.parametrize("declared", ["UNICODE UTF-16", "ISO IR87", "UNICODE", "KOI8"])
def test_unsupported_character_sets_are_rejected_with_the_ones_supported(declared: str) -> None:
    error = refused(set_field(sample(CBC), "MSH", 18, declared))
    assert (error.ack_code, error.code, str(error.location)) == ("AR", 103, "MSH-18")
    assert "GB 18030" in error.text and declared in error.text


def test_gb18030_bytes_that_look_like_separators_do_not_split_fields() -> None:
    # 東 and 瑋 end in 0x7C ("|"), 繼 in 0x5E ("^"): split before decoding, they would move
    # MSH-18 and cut the name; the message is decoded first, so they do neither
    assert "東".encode("gb18030")[1:] == b"|" and "繼".encode("gb18030")[1:] == b"^"
    message = set_field(sample(CHEM), "MSH", 4, "東瑋檢驗所", codec="gb18030")
    message = set_field(message, "PID", 5, "王^繼瑋", codec="gb18030")
    parsed = parse_message(message)
    assert parsed.charset.codec == "gb18030"
    assert parsed.sending_facility == "東瑋檢驗所"
    name = mapped(message)[0].patient.demographics["name"][0]
    assert (name["family"], name["given"], name["text"]) == ("王", ["繼瑋"], "王繼瑋")


# -- the header ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "code", "location"),
    [
        (9, "ADT^A01^ADT_A01", 200, "MSH-9.1"),
        (9, "ORU^R30", 201, "MSH-9.2"),
        (9, "", 101, "MSH-9"),
        (10, "", 101, "MSH-10"),
        (11, "T", 202, "MSH-11"),
        (11, "", 101, "MSH-11"),
        (12, "2.2", 203, "MSH-12"),
        (12, "2.6", 203, "MSH-12"),
        (12, "", 101, "MSH-12"),
        (7, "20261399", 102, "MSH-7"),
        (7, "", 101, "MSH-7"),
    ],
)
def test_headers_not_taken_in_are_rejected_naming_the_field(
    field: int, value: str, code: int, location: str
) -> None:
    error = refused(set_field(sample(CBC), "MSH", field, value))
    assert (error.ack_code, error.code, str(error.location)) == ("AR", code, location)


@pytest.mark.parametrize("version", ["2.3", "2.3.1", "2.4", "2.5", "2.5.1"])
def test_every_supported_version_is_read(version: str) -> None:
    parsed = parse_message(set_field(sample(URINE), "MSH", 12, version))
    assert parsed.version == version


@pytest.mark.parametrize(
    "payload",
    [b"", b"PID|1||123", b"hello", b"MSH", b"MSH|", b"MSH|^~", b"MSHa^~\\&|x", b"MSH|^^^^|A|B"],
)
def test_what_is_no_message_header_is_rejected(payload: bytes) -> None:
    with pytest.raises(Hl7Error) as caught:
        parse_message(payload)
    assert caught.value.ack_code == "AR"


def test_segment_order_and_structure_errors_are_rejected() -> None:
    message = sample(URINE)
    lines = message.split(b"\r")
    obr = next(line for line in lines if line.startswith(b"OBR"))
    swapped = b"\r".join([*[line for line in lines if line != obr][:4], obr])
    assert refused(swapped).code == 100  # an OBX before any OBR
    assert refused(remove_segments(message, "OBR")).code == 100
    assert refused(message + b"MSH|^~\\&|X|Y\r").code == 100  # two messages in one
    assert refused(message.replace(b"\rPID|", b"\rP D|")).code == 100


# -- times, numbers, identifiers ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "date_time"),
    [
        ("2026", "2026"),
        ("202603", "2026-03"),
        ("20260310", "2026-03-10"),
        ("2026031008", "2026-03-10T08:00:00+08:00"),
        ("202603100805", "2026-03-10T08:05:00+08:00"),
        ("20260310080512.25", "2026-03-10T08:05:12.25+08:00"),
        ("20260310080512+0000", "2026-03-10T08:05:12+00:00"),
        ("20260310080512-0530", "2026-03-10T08:05:12-05:30"),
    ],
)
def test_hl7_times_keep_their_precision_and_default_to_china_time(
    text: str, date_time: str
) -> None:
    message = set_field(sample(URINE), "OBR", 7, text)
    assert mapped(message)[0].orders[0].effective == date_time


@pytest.mark.parametrize(
    "text", ["2026131", "20261301", "20260230", "2026031025", "x", "2026+2400"]
)
def test_malformed_times_are_application_errors_naming_the_field(text: str) -> None:
    error = refused(set_field(sample(URINE), "OBR", 7, text))
    assert (error.ack_code, error.code, str(error.location)) == ("AE", 102, "OBR[1]-7")


@pytest.mark.parametrize(
    ("text", "value", "comparator"),
    [
        ("13.50", "13.50", None),
        ("+5", "5", None),
        ("-0.5", "-0.5", None),
        (".5", "0.5", None),
        ("007.10", "7.10", None),
        ("<0.5", "0.5", "<"),
        ("≥ 100", "100", ">="),
    ],
)
def test_numbers_are_exact_decimals(text: str, value: str, comparator: str | None) -> None:
    parsed = hl7v2.number(text)
    assert parsed is not None
    assert (str(parsed[0]), parsed[1]) == (value, comparator)


@pytest.mark.parametrize("text", ["abc", "1.2.3", "", "--1", "1e5", "<", "1,5"])
def test_what_is_not_a_number_is_refused(text: str) -> None:
    assert hl7v2.number(text) is None
    message = set_field(sample(URINE), "OBX", 5, text or "x", occurrence=3)
    error = refused(message)
    assert (error.ack_code, error.code, str(error.location)) == ("AE", 102, "OBX[3]-5")


def test_resident_ids_are_checked_and_never_shown_whole() -> None:
    good = resident_id("33010619850315001")
    assert hl7v2.resident_id_problem(good) is None
    assert hl7v2.resident_id_problem("330106850315001") is None  # first generation
    bad = good[:-1] + ("0" if good[-1] != "0" else "1")
    error = refused(cbc("C1", "F1", resident=bad))
    assert (error.ack_code, error.code, str(error.location)) == ("AE", 102, "PID[1]-3")
    assert bad not in error.text and bad[-4:] in error.text
    lower_x = resident_id("11010519491231002")
    assert lower_x.endswith("X")
    patient = mapped(cbc("C1", "F1", resident=lower_x.lower()))[0].patient
    assert (RESIDENT, lower_x) in patient.match_keys


def test_patient_identifiers_map_to_the_resident_id_mrn_and_oid_systems() -> None:
    message = set_field(
        sample(CBC),
        "PID",
        3,
        "M1^^^HZSY^MR~330106198503150016^^^CHN^NNCHN~N9^^^&2.16.156.10011.99.1&ISO~P7^^^^PI~M2",
    )
    patient = mapped(message)[0].patient
    systems = [(i["system"], i["value"]) for i in patient.identifiers]
    assert systems == [
        (SYSTEMS.mrn, "M1"),
        (RESIDENT, "330106198503150016"),
        ("urn:oid:2.16.156.10011.99.1", "N9"),
        (SYSTEMS.patient_id("PI"), "P7"),
        (SYSTEMS.mrn, "M2"),
    ]
    assert SYSTEMS.mrn == "urn:hrx:member:hosp-a:mrn"
    assert (SYSTEMS.patient_id("PI"), "P7") not in patient.match_keys
    authority_named = set_field(sample(CBC), "PID", 3, "330106198503150016^^^居民身份证")
    assert mapped(authority_named)[0].patient.resident_id == "330106198503150016"
    assert refused(set_field(sample(CBC), "PID", 3, "")).code == 101
    assert refused(remove_segments(sample(CBC), "PID")).code == 101


# -- the mapping of the samples ----------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_SAMPLES)
def test_every_sample_maps_to_valid_fhir_resources(name: str) -> None:
    for group in mapped(sample(name)):
        validate(hl7v2.new_patient(group.patient), "Patient")
        for order in group.orders:
            validate(order.report("p1"), "DiagnosticReport")
            for result in order.results:
                validate(result.observation("p1"), "Observation")


def test_a_cbc_in_v251_maps_loinc_ucum_ranges_flags_times_specimen_and_lab() -> None:
    message = sample(CBC)
    [group] = mapped(message)
    patient = hl7v2.new_patient(group.patient)
    assert patient["name"] == [{"use": "official", "text": "张三", "family": "张", "given": ["三"]}]
    assert patient["gender"] == "male" and patient["birthDate"] == "1985-03-15"
    assert patient["telecom"] == [{"system": "phone", "value": "13800138000", "use": "mobile"}]
    assert patient["address"][0]["city"] == "杭州市"
    [order] = group.orders
    report = order.report("p1")
    assert report["status"] == "final"
    assert [c["coding"][0]["code"] for c in report["category"]] == ["LAB", "HM"]
    assert report["code"]["coding"][0] == {
        "system": "http://loinc.org",
        "code": "58410-2",
        "display": "CBC panel - Blood by Automated count",
    }
    assert [(i["type"]["coding"][0]["code"], i["value"]) for i in report["identifier"]] == [
        ("FILL", "LAB20260310-0001"),
        ("PLAC", "HIS20260310-88"),
    ]
    assert report["issued"] == "2026-03-10T09:30:00+08:00"
    assert len(report["result"]) == 7
    wbc = by_code(message, "6690-2")
    assert wbc["status"] == "final"
    assert wbc["category"][0]["coding"][0]["code"] == "laboratory"
    assert wbc["valueQuantity"] == {
        "value": Decimal("11.2"),
        "unit": "10^9/L",
        "system": "http://unitsofmeasure.org",
        "code": "10*9/L",
    }
    assert wbc["referenceRange"][0]["low"]["value"] == Decimal("3.5")
    assert wbc["referenceRange"][0]["high"]["code"] == "10*9/L"
    assert wbc["referenceRange"][0]["text"] == "3.5-9.5"
    assert wbc["interpretation"][0]["coding"][0]["code"] == "H"
    assert wbc["effectiveDateTime"] == "2026-03-10T08:05:00+08:00"
    assert wbc["note"] == [{"text": "已人工复检"}]
    assert wbc["performer"] == [
        {
            "identifier": {"system": "urn:oid:2.16.156.10011.99.330100.1", "value": "HZSY-LAB"},
            "display": "杭州市第一人民医院检验科",
        }
    ]
    specimen = wbc["contained"][0]
    assert specimen["receivedTime"] == "2026-03-10T08:30:00+08:00"
    assert specimen["collection"] == {"collectedDateTime": "2026-03-10T08:05:00+08:00"}
    assert specimen["type"]["coding"][0]["code"] == "BLD"
    assert wbc["specimen"] == {"reference": "#specimen"}
    assert wbc["identifier"] == [
        {"system": "urn:hrx:member:hosp-a:lis-result:XYLIS", "value": "LAB20260310-0001/6690-2"}
    ]
    assert by_code(message, "770-8")["valueQuantity"]["value"].as_tuple().exponent == -2  # 78.50
    assert by_code(message, "718-7")["interpretation"][0]["coding"][0]["code"] == "L"


def test_a_chemistry_panel_in_v23_maps_local_codes_producer_and_structured_numbers() -> None:
    message = sample(CHEM)
    [group] = mapped(message)
    assert group.patient.resident_id == "330102197208224326"
    assert group.patient.demographics["telecom"] == [
        {"system": "phone", "value": "13900139000", "use": "mobile"},
        {"system": "phone", "value": "0571-85893000", "use": "work"},
    ]
    glucose = by_code(message, "GLU")
    assert glucose["code"]["coding"] == [
        {"system": "urn:hrx:member:hosp-a:lis", "code": "GLU", "display": "葡萄糖"}
    ]
    assert glucose["valueQuantity"]["code"] == "mmol/L"
    assert glucose["effectiveDateTime"] == "2026-03-11T07:15:00+08:00"  # no zone: +08:00
    assert glucose["performer"][0]["display"] == "浙江省人民医院检验中心"
    creatinine = by_code(message, "14682-9")
    assert creatinine["valueQuantity"]["unit"] == "μmol/L"
    assert creatinine["valueQuantity"]["code"] == "umol/L"
    crp = by_code(message, "1988-5")
    assert crp["valueQuantity"]["comparator"] == "<"
    assert crp["valueQuantity"]["value"] == Decimal("0.5")
    hbsag = by_code(message, "HBSAG")
    assert hbsag["valueString"] == "阴性"
    assert hbsag["referenceRange"] == [{"text": "阴性"}]
    specimen = glucose["contained"][0]
    assert specimen["receivedTime"] == "2026-03-11T07:50:00+08:00"  # OBR-14


def test_a_urinalysis_in_v24_maps_coded_text_and_preliminary_results() -> None:
    message = sample(URINE)
    [group] = mapped(message)
    assert (SYSTEMS.mrn, "X0000777") in group.patient.match_keys  # untyped: an MRN
    name = group.patient.demographics["name"][0]
    assert (name["family"], name["text"]) == ("欧阳", "欧阳小梅")
    report = group.orders[0].report("p1")
    assert report["status"] == "preliminary"
    assert report["category"][1]["coding"][0]["code"] == "URN"
    protein = by_code(message, "PRO")
    assert protein["valueCodeableConcept"]["coding"][0]["code"] == "POS"
    assert protein["interpretation"][0]["coding"][0]["code"] == "A"
    assert by_code(message, "GLU-U")["valueString"] == "1+"
    red_cells = by_code(message, "RBC-U")
    assert red_cells["interpretation"][0]["coding"][0]["code"] == "H"  # ↑
    assert red_cells["valueQuantity"]["code"] == "/[HPF]"
    micro = by_code(message, "MICRO")
    assert micro["status"] == "preliminary"
    assert micro["valueString"] == "红细胞形态：多形性\n建议复查"
    assert micro["note"] == [{"text": "镜检结果待审核"}]
    assert "referenceRange" not in micro


@pytest.mark.parametrize(
    ("value_type", "value", "element", "expected"),
    [
        (
            "SN",
            "^1^:^128",
            "valueRatio",
            {"numerator": {"value": 1}, "denominator": {"value": 128}},
        ),
        ("SN", "^10^-^20", "valueRange", None),
        ("SN", ">^40", "valueQuantity", None),
        ("DT", "20260301", "valueDateTime", "2026-03-01"),
        ("TS", "202603011230", "valueDateTime", "2026-03-01T12:30:00+08:00"),
        ("TM", "1230", "valueTime", "12:30:00"),
        ("CE", "^阳性", "valueCodeableConcept", {"text": "阳性"}),
    ],
)
def test_value_types_map_to_their_fhir_values(
    value_type: str, value: str, element: str, expected: Any
) -> None:
    message = set_field(sample(URINE), "OBX", 2, value_type, occurrence=3)
    message = set_field(message, "OBX", 5, value, occurrence=3)
    observation = by_code(message, "SG")
    assert element in observation
    if expected is not None:
        assert observation[element] == expected
    validate(observation, "Observation")


def test_results_without_a_value_say_why() -> None:
    message = set_field(sample(URINE), "OBX", 5, "", occurrence=3)
    assert by_code(message, "SG")["dataAbsentReason"]["coding"][0]["code"] == "unknown"
    cancelled = set_field(message, "OBX", 11, "X", occurrence=3)
    observation = by_code(cancelled, "SG")
    assert observation["status"] == "cancelled"
    assert observation["dataAbsentReason"]["coding"][0]["code"] == "not-performed"
    deleted = set_field(message, "OBX", 11, "D", occurrence=3)
    assert by_code(deleted, "SG")["status"] == "entered-in-error"


@pytest.mark.parametrize(
    ("field", "value", "code", "location"),
    [
        (2, "ED", 102, "OBX[3]-2"),
        (2, "", 101, "OBX[3]-2"),
        (3, "", 101, "OBX[3]-3"),
        (11, "", 101, "OBX[3]-11"),
        (11, "Q", 103, "OBX[3]-11"),
        (5, "1~2", 102, "OBX[3]-5"),
    ],
)
def test_results_that_cannot_be_stored_are_application_errors(
    field: int, value: str, code: int, location: str
) -> None:
    error = refused(set_field(sample(URINE), "OBX", field, value, occurrence=3))
    assert (error.ack_code, error.code, str(error.location)) == ("AE", code, location)


def test_orders_need_a_filler_number_and_a_test_and_each_result_once() -> None:
    message = sample(URINE)
    assert str(refused(set_field(message, "OBR", 3, "")).location) == "OBR[1]-3"
    assert str(refused(set_field(message, "OBR", 4, "")).location) == "OBR[1]-4"
    assert refused(set_field(message, "OBR", 25, "Q")).code == 103
    twice = set_field(message, "OBX", 3, "PRO^尿蛋白^L", occurrence=2)
    assert refused(twice).code == 205
    with_sub_ids = set_field(set_field(twice, "OBX", 4, "1", 1), "OBX", 4, "2", 2)
    assert len(observations(with_sub_ids)) == 6


def test_the_orc_gives_the_filler_order_number_when_the_obr_has_none() -> None:
    without = set_field(sample(CBC), "OBR", 3, "")
    assert ids_of(without)[0] == ids_of(sample(CBC))[0]


def test_a_unit_sent_with_an_unescaped_caret_is_understood() -> None:
    message = set_field(sample(CBC), "OBX", 6, "10^9/L")  # "^" splits it into components
    assert by_code(message, "6690-2")["valueQuantity"]["code"] == "10*9/L"


# -- files and acknowledgements ------------------------------------------------------------------


def test_files_are_split_into_messages_at_each_msh() -> None:
    one, two = sample(CBC), sample(URINE)
    as_lines = (one + two).replace(b"\r", b"\r\n")
    assert hl7v2.split_messages(as_lines) == [one, two]
    assert hl7v2.split_messages(one.replace(b"\r", b"\n") + b"\n\n" + two) == [one, two]
    batch = b"FHS|^~\\&\rBHS|^~\\&\r" + one + two + b"BTS|2\rFTS|1\r"
    assert hl7v2.split_messages(batch) == [one, two]
    framed = b"\x0b" + one + b"\x1c\r\x0b" + two + b"\x1c\r"
    assert hl7v2.split_messages(framed) == [one, two]
    orphan = hl7v2.split_messages(b"PID|1||X\r" + one)
    assert orphan == [b"PID|1||X\r", one]


def test_an_ack_answers_in_the_senders_terms_v25_style() -> None:
    message = parse_message(sample(CBC))
    error = Hl7Error("AE", 102, "a|b^c", hl7v2.Location("OBX", 3, 5))
    ack = build_ack(message.header, "AE", codec="utf-8", error=error)
    lines = ack.decode().split("\r")
    msh = lines[0].split("|")
    assert msh[2:6] == ["HRX", "HZSY", "XYLIS", "HZSY^2.16.156.10011.99.330100^ISO"]
    assert msh[8] == "ACK^R01^ACK"
    assert msh[11] == "2.5.1" and msh[17] == "UNICODE UTF-8"
    assert lines[1].startswith("MSA|AE|HZSY2603100001|AE 102 OBX[3]-5: a\\F\\b\\S\\c")
    assert lines[2] == "ERR||OBX^3^5^1|102^Data type error^HL70357|E||||a\\F\\b\\S\\c"
    read = parse_ack(ack)
    assert (read.code, read.control_id, read.error_code) == ("AE", "HZSY2603100001", "102")
    assert read.text == "AE 102 OBX[3]-5: a|b^c"


def test_an_ack_to_a_v23_gb18030_message_is_gb18030_with_an_err_1() -> None:
    message = parse_message(sample(CHEM))
    error = Hl7Error("AR", 203, "version", hl7v2.Location("MSH", 1, 12))
    ack = build_ack(message.header, "AR", codec=message.charset.codec, error=error)
    text = ack.decode("gb18030")
    assert "|浙江省人民医院|" in text and text.split("\r")[0].endswith("|GB 18030-2000")
    assert "ERR|MSH^1^12^203&Unsupported version id&HL70357" in text
    assert parse_ack(ack).error_code == "203"
    with pytest.raises(UnicodeDecodeError):
        ack.decode("utf-8")


# -- storing in a node --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node_services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    directory = tmp_path_factory.mktemp("hl7") / "hosp-a"
    init_node(directory, "hosp-a", None, free_port())
    services = open_services(load_config(directory))
    yield services
    services.close()


@pytest.fixture
def intake(node_services: Services) -> Hl7Intake:
    return Hl7Intake(node_services)


def read(services: Services, resource_type: str, resource_id: str) -> tuple[int, dict[str, Any]]:
    stored = services.store.read(resource_type, resource_id)
    return stored.version, stored.resource()


def patients_of(services: Services, system: str, value: str) -> list[str]:
    with services.database.engine.connect() as conn:
        return patients_with(conn, system, value)


def ids_of(message: bytes) -> tuple[str, list[str]]:
    [group] = mapped(message)
    [order] = group.orders
    return order.resource_id, [result.resource_id for result in order.results]


def counts(services: Services) -> tuple[int, int]:
    with services.database.engine.connect() as conn:
        resources = conn.execute(sa.select(sa.func.count()).select_from(sa.table("fhir_versions")))
        rows = conn.execute(sa.select(sa.func.count()).select_from(quarantine_table))
        return resources.scalar_one(), rows.scalar_one()


def test_a_message_is_stored_once_and_its_resend_changes_nothing(
    intake: Hl7Intake, node_services: Services
) -> None:
    resident = resident_id("33010619850315101")
    message = cbc("ONCE-1", "F-ONCE-1", resident, "MRN-ONCE")
    outcome = intake.take_in(message, "test")
    assert (outcome.status, outcome.ack_code) == ("stored", "AA")
    assert parse_ack(outcome.ack).code == "AA"
    assert len(outcome.written) == 1 + 7 + 1 + 1  # Patient, results, report, AuditEvent
    [patient_id] = patients_of(node_services, RESIDENT, resident)
    report_id, result_ids = ids_of(message)
    version, report = read(node_services, "DiagnosticReport", report_id)
    assert version == 1 and report["subject"] == {"reference": f"Patient/{patient_id}"}
    assert [r["reference"] for r in report["result"]] == [f"Observation/{i}" for i in result_ids]
    before = counts(node_services)
    again = intake.take_in(message, "test")
    assert (again.status, again.ack_code, again.written) == ("duplicate", "AA", ())
    assert parse_ack(again.ack).text == "already stored"
    resent_later = intake.take_in(set_field(message, "MSH", 7, "20260311080000+0800"), "test")
    assert resent_later.status == "duplicate"  # the time of sending is not the content
    # the same results under a new control ID: stored, but nothing new to write
    renumbered = intake.take_in(set_field(message, "MSH", 10, "ONCE-2"), "test")
    assert (renumbered.status, renumbered.written) == ("stored", ())
    assert counts(node_services) == before
    with node_services.database.engine.connect() as conn:
        keys = conn.execute(
            sa.select(messages_table.c.message_key).where(
                messages_table.c.message_key.like("%ONCE-%")
            )
        ).all()
    assert len(keys) == 2


def test_the_same_control_id_with_other_content_is_rejected_and_kept(
    intake: Hl7Intake, node_services: Services
) -> None:
    message = cbc("SAMEID-1", "F-SAMEID-1", resident_id("33010619850315102"), "MRN-SAMEID")
    assert intake.take_in(message, "test").accepted
    other = set_field(message, "OBX", 5, "12.9")
    outcome = intake.take_in(other, "test")
    assert (outcome.status, outcome.ack_code) == ("quarantined", "AR")
    ack = parse_ack(outcome.ack)
    assert ack.error_code == "205" and "already used for another message" in ack.text
    [row] = [r for r in quarantined(node_services.database.engine) if r.id == outcome.quarantine_id]
    assert row.adapter == "hl7" and row.origin == "test" and row.size == len(other)


def test_a_correction_is_a_new_version_of_the_result_and_of_the_report(
    intake: Hl7Intake, node_services: Services
) -> None:
    first = intake.take_in(sample(CHEM), "test")
    assert first.accepted, first.reason
    report_id, result_ids = ids_of(sample(CHEM))
    creatinine_id = result_ids[3]
    version, creatinine = read(node_services, "Observation", creatinine_id)
    assert (version, creatinine["status"], creatinine["valueQuantity"]["value"]) == (1, "final", 98)
    correction = intake.take_in(sample(CHEM_CORRECTION), "test")
    assert correction.accepted, correction.reason
    assert sorted(w.split("/")[0] for w in correction.written) == [
        "AuditEvent",
        "DiagnosticReport",
        "Observation",
    ]
    version, creatinine = read(node_services, "Observation", creatinine_id)
    assert (version, creatinine["status"], creatinine["valueQuantity"]["value"]) == (
        2,
        "corrected",
        128,
    )
    assert creatinine["note"][0]["text"].startswith("标本溶血")
    version, report = read(node_services, "DiagnosticReport", report_id)
    assert (version, report["status"], len(report["result"])) == (2, "corrected", 9)
    assert report["issued"] == "2026-03-11T14:25:00+08:00"
    old = node_services.store.vread("Observation", creatinine_id, 1).resource()
    assert old["valueQuantity"]["value"] == 98  # history keeps what was corrected
    # the original sent again late, under a new control ID: older, so it undoes nothing
    late = intake.take_in(set_field(sample(CHEM), "MSH", 10, "ZJ-LATE", codec="gb18030"), "test")
    assert late.accepted and late.written == ()
    assert read(node_services, "Observation", creatinine_id)[0] == 2


def test_a_patient_is_found_by_any_identifier_and_updated_as_pid_says(
    intake: Hl7Intake, node_services: Services
) -> None:
    resident = resident_id("33010619850315103")
    assert intake.take_in(cbc("PAT-1", "F-PAT-1", resident, "MRN-PAT"), "test").accepted
    [patient_id] = patients_of(node_services, RESIDENT, resident)
    by_mrn_only = cbc("PAT-2", "F-PAT-2", None, "MRN-PAT", phone="13700137000")
    outcome = intake.take_in(by_mrn_only, "test")
    assert outcome.accepted, outcome.reason
    assert f"Patient/{patient_id}/_history/2" in outcome.written
    version, patient = read(node_services, "Patient", patient_id)
    assert version == 2
    assert patient["telecom"] == [{"system": "phone", "value": "13700137000", "use": "mobile"}]
    assert {(i["system"], i["value"]) for i in patient["identifier"]} >= {
        (RESIDENT, resident),
        (SYSTEMS.mrn, "MRN-PAT"),
    }
    report_id, _ = ids_of(by_mrn_only)
    assert read(node_services, "DiagnosticReport", report_id)[1]["subject"] == {
        "reference": f"Patient/{patient_id}"
    }
    # PID saying nothing new writes no new Patient version
    same = intake.take_in(cbc("PAT-3", "F-PAT-3", resident, "MRN-PAT", phone="13700137000"), "t")
    assert not any(w.startswith("Patient/") for w in same.written)


def test_identifiers_naming_two_patients_are_an_error_until_fixed_then_replayed(
    intake: Hl7Intake, node_services: Services
) -> None:
    first, second = resident_id("33010619850315104"), resident_id("33010619850315105")
    assert intake.take_in(cbc("TWO-1", "F-TWO-1", first, "MRN-TWO-A"), "t").accepted
    assert intake.take_in(cbc("TWO-2", "F-TWO-2", second, "MRN-TWO-B"), "t").accepted
    [patient_b] = patients_of(node_services, RESIDENT, second)
    mixed = cbc("TWO-3", "F-TWO-3", first, "MRN-TWO-B")
    before = counts(node_services)[0]
    outcome = intake.take_in(mixed, "lis")
    assert (outcome.status, outcome.ack_code) == ("quarantined", "AE")
    assert "different patients" in str(outcome.reason) and first not in str(outcome.reason)
    assert counts(node_services)[0] == before  # nothing of the message was written
    open_ids = [row.id for row in quarantined(node_services.database.engine)]
    assert outcome.quarantine_id in open_ids
    # the record office corrects Patient B's MRN; the message replays and is stored
    _, patient = read(node_services, "Patient", patient_b)
    patient["identifier"] = [
        i for i in patient["identifier"] if (i["system"], i["value"]) != (SYSTEMS.mrn, "MRN-TWO-B")
    ]
    node_services.store.update("Patient", patient_b, patient)
    assert outcome.quarantine_id is not None
    replayed = intake.replay(outcome.quarantine_id)
    assert (replayed.status, replayed.ack_code) == ("stored", "AA"), replayed.reason
    rows = quarantined(node_services.database.engine, include_replayed=True)
    [row] = [r for r in rows if r.id == outcome.quarantine_id]
    assert row.replayed_at is not None
    assert outcome.quarantine_id not in [r.id for r in quarantined(node_services.database.engine)]
    from node.base.errors import NodeError

    with pytest.raises(NodeError, match="already replayed"):
        intake.replay(outcome.quarantine_id)


def test_a_result_made_final_without_its_value_needs_the_value_first(
    intake: Hl7Intake, node_services: Services
) -> None:
    resident = resident_id("33010619850315106")
    finalise = cbc("U-2", "F-U", resident, "MRN-U", reported="20260310120000+0800")
    finalise = set_field(finalise, "OBX", 5, "", occurrence=1)
    finalise = set_field(finalise, "OBX", 11, "U", occurrence=1)
    refused_first = intake.take_in(finalise, "lis")
    assert refused_first.ack_code == "AE" and "never received" in (refused_first.reason or "")
    preliminary = set_field(cbc("U-1", "F-U", resident, "MRN-U"), "OBX", 11, "P", occurrence=1)
    assert intake.take_in(preliminary, "lis").accepted
    assert refused_first.quarantine_id is not None
    replayed = intake.replay(refused_first.quarantine_id)
    assert replayed.accepted, replayed.reason
    _, result_ids = ids_of(preliminary)
    version, wbc = read(node_services, "Observation", result_ids[0])
    assert (version, wbc["status"], wbc["valueQuantity"]["value"]) == (2, "final", Decimal("11.2"))
    assert "dataAbsentReason" not in wbc


def test_a_message_is_stored_whole_or_not_at_all(
    intake: Hl7Intake, node_services: Services
) -> None:
    # two patients in one message: the first is new, the second's identifiers name two
    # patients already here, which is found only while storing, after the first was written
    x, y = resident_id("33010619850315107"), resident_id("33010619850315108")
    assert intake.take_in(cbc("HALF-X", "F-HALF-X", x, "MRN-HALF-X"), "t").accepted
    assert intake.take_in(cbc("HALF-Y", "F-HALF-Y", y, "MRN-HALF-Y"), "t").accepted
    first = cbc("HALF-1", "F-HALF-1", resident_id("33010619850315109"), "MRN-HALF-NEW")
    conflicting = cbc("HALF-2", "F-HALF-2", x, "MRN-HALF-Y")
    both = first + conflicting.split(b"\r", 1)[1]
    [_, second_group] = mapped(both)
    before = counts(node_services)[0]
    outcome = intake.take_in(both, "lis")
    assert outcome.ack_code == "AE" and "different patients" in (outcome.reason or "")
    assert str(second_group.patient.segment.at(3)) in str(outcome.reason)
    assert counts(node_services)[0] == before
    assert patients_of(node_services, SYSTEMS.mrn, "MRN-HALF-NEW") == []


def test_an_audit_event_records_each_message_for_its_patient(
    intake: Hl7Intake, node_services: Services
) -> None:
    outcome = intake.take_in(cbc("AUD-1", "F-AUD-1", None, "MRN-AUD"), "127.0.0.1:40000")
    [event_location] = [w for w in outcome.written if w.startswith("AuditEvent/")]
    event_id = event_location.split("/")[1]
    _, event = read(node_services, "AuditEvent", event_id)
    [patient_id] = patients_of(node_services, SYSTEMS.mrn, "MRN-AUD")
    entities = [e["what"]["reference"] for e in event["entity"]]
    assert f"Patient/{patient_id}" in entities
    assert len(entities) == 1 + 1 + 7 + 1  # the patient, its version, results, report
    assert event["agent"][0]["who"]["display"] == "hl7:XYLIS"
    assert event["agent"][0]["network"]["address"] == "127.0.0.1"


def test_a_message_for_a_result_of_another_patient_is_refused(
    intake: Hl7Intake, node_services: Services
) -> None:
    assert intake.take_in(cbc("MOVE-1", "F-MOVE", None, "MRN-MOVE-A"), "t").accepted
    moved = intake.take_in(cbc("MOVE-2", "F-MOVE", None, "MRN-MOVE-B"), "t")
    assert moved.ack_code == "AE" and "already stored for Patient/" in (moved.reason or "")


def test_unreadable_bytes_are_quarantined_whole(intake: Hl7Intake, node_services: Services) -> None:
    payload = b"\xff\xfeMSH|garbage\x00"
    outcome = intake.take_in(payload, "lis")
    assert outcome.ack_code == "AR"
    from node.intake.quarantine import quarantine_row

    row = quarantine_row(node_services.database.engine, outcome.quarantine_id or 0)
    assert row.payload == payload
    assert get_field(outcome.ack, "MSA", 1) == "AR"


def test_the_urinalysis_sample_stores_its_preliminary_results(
    intake: Hl7Intake, node_services: Services
) -> None:
    outcome = intake.take_in(sample(URINE), URINE)
    assert outcome.accepted, outcome.reason
    report_id, result_ids = ids_of(sample(URINE))
    assert read(node_services, "DiagnosticReport", report_id)[1]["status"] == "preliminary"
    assert read(node_services, "Observation", result_ids[-1])[1]["status"] == "preliminary"
    assert CODECS[URINE] == "utf-8" and parse_message(sample(URINE)).charset.declared == ""
