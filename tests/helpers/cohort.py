"""A small synthetic cohort shaped like US Core 6.1, as FHIR R4 JSON transaction Bundles, for the
tests that load a "standard feed" into a node unchanged.

:func:`cohort` makes one transaction Bundle per patient (Patient, Encounters, Conditions,
laboratory and vital-sign Observations, DiagnosticReports, MedicationRequests,
AllergyIntolerances, Procedures, Immunizations and a discharge-summary DocumentReference), every
entry a ``POST`` with a ``urn:uuid:`` fullUrl that the bundle's references use. The hospitals
and doctors are in :func:`shared`, one Bundle of conditional creates (``ifNoneExist``, so loading
it twice creates nothing new), which the patients' bundles name by conditional reference
(``Organization?identifier=system|value``). With ``conditional_references=False`` each patient
bundle carries the Organizations and Practitioners it needs instead, as ``PUT Type/id`` with
fixed ids, referred to as ``Type/id``, for servers without conditional references.

Everything comes from :class:`random.Random` seeded with strings, so a seed gives the same
output in every process; patient ``i`` depends only on the seed and ``i``. Resident ID numbers
are 18 characters with the GB 11643-1999 check character; times are in +08:00. Glucose is in
mg/dL (LOINC 2345-7) for even-numbered patients and in mmol/L (15074-8) for odd ones.
"""

from __future__ import annotations

import base64
import datetime as dt
import random
import uuid
from typing import Any

Json = dict[str, Any]

RESIDENT_ID = "urn:oid:2.16.156.10011.1.3"
MRN = "urn:oid:2.16.156.10011.1.11"
ORG_ID = "urn:oid:2.16.156.10011.1.5"
PRACTITIONER_ID = "urn:oid:2.16.156.10011.1.4"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
ICD10 = "http://hl7.org/fhir/sid/icd-10"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
CVX = "http://hl7.org/fhir/sid/cvx"
THO = "http://terminology.hl7.org/CodeSystem/"
TZ = dt.timezone(dt.timedelta(hours=8))
START = dt.datetime(2023, 1, 1, tzinfo=TZ)
HANGZHOU = {"postalCode": "310000", "country": "CN"}
US_CORE_DOCUMENTS = "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category"
DOSAGES = ("每日一次，每次一片，口服", "每日两次，每次一片，饭后口服")

_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
DISTRICTS = {"330102": "上城区", "330105": "拱墅区", "330106": "西湖区", "330108": "滨江区"}
FAMILY = "王李张刘陈杨赵黄周吴徐孙胡朱高林何郭马罗"
GIVEN = {
    "male": ("伟", "强", "磊", "军", "建国", "志明"),
    "female": ("芳", "娜", "敏", "静", "丽华", "秀英"),
}
HOSPITALS = ("杭州市第一人民医院", "西湖区人民医院", "上城区湖滨街道社区卫生服务中心")
ENCOUNTER_TYPES = {  # class -> (SNOMED type, display, hours)
    "AMB": ("185349003", "Encounter for check up", 1),
    "EMER": ("50849002", "Emergency room admission", 4),
    "IMP": ("32485007", "Hospital admission", 96),
}
CONDITIONS = (  # ICD-10, SNOMED, display, chronic
    ("E11.9", "44054006", "2型糖尿病 Type 2 diabetes mellitus", True),
    ("I10", "38341003", "高血压 Hypertensive disorder", True),
    ("E78.5", "55822004", "高脂血症 Hyperlipidemia", True),
    ("J45.9", "195967001", "哮喘 Asthma", True),
    ("K29.7", "4556007", "胃炎 Gastritis", False),
    ("J06.9", "54150009", "急性上呼吸道感染 Upper respiratory infection", False),
)
GLUCOSE = (  # LOINC, display, UCUM unit, low, high, decimals
    ("2345-7", "Glucose [Mass/volume] in Serum or Plasma", "mg/dL", 70, 200, 0),
    ("15074-8", "Glucose [Moles/volume] in Blood", "mmol/L", 3.9, 11.0, 1),
)
LABS = (
    ("718-7", "Hemoglobin [Mass/volume] in Blood", "g/dL", 11.0, 17.0, 1),
    ("2160-0", "Creatinine [Mass/volume] in Serum or Plasma", "mg/dL", 0.6, 1.4, 2),
    ("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "%", 5.0, 9.0, 1),
    ("2093-3", "Cholesterol [Mass/volume] in Serum or Plasma", "mg/dL", 150, 260, 0),
    ("6690-2", "Leukocytes [#/volume] in Blood by Automated count", "10*3/uL", 4.0, 11.0, 1),
    ("777-3", "Platelets [#/volume] in Blood by Automated count", "10*3/uL", 150, 400, 0),
    ("2823-3", "Potassium [Moles/volume] in Serum or Plasma", "mmol/L", 3.5, 5.1, 1),
    ("2951-2", "Sodium [Moles/volume] in Serum or Plasma", "mmol/L", 135, 145, 0),
    ("3094-0", "Urea nitrogen [Mass/volume] in Serum or Plasma", "mg/dL", 7, 20, 0),
)
VITALS = (("29463-7", "Body weight", "kg", 45, 95, 1), ("8867-4", "Heart rate", "/min", 55, 110, 0))
PANELS = (("24323-8", "Comprehensive metabolic panel"), ("58410-2", "CBC panel - Blood"))
MEDICATIONS = (
    ("860975", "24 HR metformin hydrochloride 500 MG Extended Release Oral Tablet"),
    ("314076", "lisinopril 10 MG Oral Tablet"),
    ("197361", "amlodipine 5 MG Oral Tablet"),
    ("259255", "atorvastatin 80 MG Oral Tablet"),
    ("313782", "acetaminophen 325 MG Oral Tablet"),
)
ALLERGIES = (  # SNOMED substance, display, category, reaction SNOMED, reaction display
    ("373270004", "Penicillin -class of antibiotic-", "medication", "247472004", "Wheal"),
    ("256349002", "Peanut - dietary", "food", "39579001", "Anaphylaxis"),
    ("387207008", "Ibuprofen", "medication", "271807003", "Eruption of skin"),
)
PROCEDURES = (
    ("268400002", "12 lead electrocardiogram"),
    ("399208008", "Plain chest X-ray"),
    ("73761001", "Colonoscopy"),
)
VACCINES = (
    ("140", "Influenza, seasonal, injectable, preservative free"),
    ("115", "Tdap"),
    ("33", "pneumococcal polysaccharide vaccine, 23 valent"),
    ("43", "Hep B, adult"),
)


def check_character(first17: str) -> str:
    """The GB 11643-1999 check character (ISO 7064 MOD 11-2) of a resident ID's first 17 digits."""
    total = sum(int(d) * w for d, w in zip(first17, _WEIGHTS, strict=True))
    return "10X98765432"[total % 11]


def _coding(system: str, code: str, display: str | None = None) -> Json:
    coding = {"system": system, "code": code}
    return coding | ({"display": display} if display else {})


def _concept(system: str, code: str, display: str | None = None) -> Json:
    concept: Json = {"coding": [_coding(system, code, display)]}
    return concept | ({"text": display} if display else {})


def _ref(target: str) -> Json:
    return {"reference": target}


def _address(street: str, **extra: str) -> list[Json]:
    return [{**extra, "line": [street], "city": "杭州市", "state": "浙江省", **HANGZHOU}]


def _entry(full_url: str, resource: Json, method: str, url: str, **extra: str) -> Json:
    return {
        "fullUrl": full_url,
        "resource": resource,
        "request": {"method": method, "url": url, **extra},
    }


def _when(moment: dt.datetime) -> str:
    return moment.isoformat(timespec="seconds")


def _uuid(rng: random.Random) -> str:
    return f"urn:uuid:{uuid.UUID(int=rng.getrandbits(128), version=4)}"


def _digits(rng: random.Random, count: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(count))


def _staff(seed: int) -> tuple[list[Json], list[Json]]:
    """The Organizations and Practitioners of a seed."""
    rng = random.Random(f"hrx-cohort-shared:{seed}")
    orgs = [
        {
            "resourceType": "Organization",
            "identifier": [{"system": ORG_ID, "value": f"12330100{_digits(rng, 9)}{i}"}],
            "active": True,
            "type": [_concept(THO + "organization-type", "prov", "Healthcare Provider")],
            "name": name,
            "telecom": [{"system": "phone", "value": f"0571-8{_digits(rng, 7)}", "use": "work"}],
            "address": _address(f"解放路 {rng.randint(1, 300)} 号"),
        }
        for i, name in enumerate(HOSPITALS)
    ]
    practitioners = []
    for i in range(5):
        gender = rng.choice(("male", "female"))
        family, given = rng.choice(FAMILY), rng.choice(GIVEN[gender])
        practitioners.append(
            {
                "resourceType": "Practitioner",
                "identifier": [
                    {"system": PRACTITIONER_ID, "value": f"1103301{_digits(rng, 7)}{i}"}
                ],
                "active": True,
                "name": [{"text": family + given, "family": family, "given": [given]}],
                "gender": gender,
            }
        )
    return orgs, practitioners


def _key(resource: Json) -> str:
    """A shared resource's conditional reference, e.g. ``Organization?identifier=s|v``."""
    identifier = resource["identifier"][0]
    return f"{resource['resourceType']}?identifier={identifier['system']}|{identifier['value']}"


def _fixed_id(resource: Json) -> str:
    prefix = "org" if resource["resourceType"] == "Organization" else "pract"
    return f"{prefix}-{resource['identifier'][0]['value']}"


def shared(seed: int = 0) -> Json:
    """The transaction Bundle that creates, unless they exist, the hospitals and doctors."""
    rng = random.Random(f"hrx-cohort-shared-urls:{seed}")
    orgs, practitioners = _staff(seed)
    entries = [
        _entry(_uuid(rng), r, "POST", r["resourceType"], ifNoneExist=_key(r).partition("?")[2])
        for r in orgs + practitioners
    ]
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def cohort(patients: int, seed: int = 0, conditional_references: bool = True) -> list[Json]:
    """One transaction Bundle per patient; the same ones for the same arguments."""
    orgs, practitioners = _staff(seed)
    return [
        _patient_bundle(
            i, random.Random(f"hrx-cohort:{seed}:{i}"), orgs, practitioners, conditional_references
        )
        for i in range(patients)
    ]


def _patient_bundle(
    index: int, rng: random.Random, orgs: list[Json], practitioners: list[Json], conditional: bool
) -> Json:
    entries: list[Json] = []
    used: list[Json] = []  # the shared resources this bundle refers to, in order

    def add(resource: Json) -> str:
        entries.append(_entry(_uuid(rng), resource, "POST", resource["resourceType"]))
        return str(entries[-1]["fullUrl"])

    def staff(resource: Json) -> Json:
        if resource not in used:
            used.append(resource)
        if conditional:
            return _ref(_key(resource))
        return _ref(f"{resource['resourceType']}/{_fixed_id(resource)}")

    home = rng.choice(orgs)
    doctor = rng.choice(practitioners)
    gender = rng.choice(("male", "female"))
    birth = dt.date(1940, 1, 1) + dt.timedelta(days=rng.randint(0, 65 * 365))
    area = rng.choice(sorted(DISTRICTS))
    sequence = rng.randrange(1 if gender == "male" else 0, 1000, 2)  # odd for men, even for women
    first17 = f"{area}{birth:%Y%m%d}{sequence:03d}"
    resident_id = first17 + check_character(first17)
    mr, number = _concept(THO + "v2-0203", "MR", "Medical record number"), _digits(rng, 4)
    family, given = rng.choice(FAMILY), rng.choice(GIVEN[gender])
    patient_url = add(
        {
            "resourceType": "Patient",
            "identifier": [
                {"use": "official", "system": RESIDENT_ID, "value": resident_id},
                {"use": "usual", "type": mr, "system": MRN, "value": f"MRN{index:06d}{number}"},
            ],
            "active": True,
            "name": [
                {"use": "official", "text": family + given, "family": family, "given": [given]}
            ],
            "telecom": [{"system": "phone", "value": f"13{_digits(rng, 9)}", "use": "mobile"}],
            "gender": gender,
            "birthDate": birth.isoformat(),
            "address": _address(
                f"文三路 {rng.randint(1, 500)} 号", use="home", district=DISTRICTS[area]
            ),
            "managingOrganization": staff(home),
            "generalPractitioner": [staff(doctor)],
        }
    )
    subject = _ref(patient_url)

    encounters: list[tuple[str, dt.datetime, str]] = []  # (fullUrl, start, class)
    days = sorted(rng.sample(range(0, 700), rng.randint(2, 4)))
    for day in days:
        kind = rng.choice(("AMB", "AMB", "EMER", "IMP"))
        code, display, hours = ENCOUNTER_TYPES[kind]
        start = START + dt.timedelta(days=day, hours=rng.randint(16, 35) / 2)
        performer = rng.choice(practitioners)
        url = add(
            {
                "resourceType": "Encounter",
                "status": "finished",
                "class": _coding(THO + "v3-ActCode", kind),
                "type": [_concept(SNOMED, code, display)],
                "subject": subject,
                "participant": [
                    {
                        "type": [_concept(THO + "v3-ParticipationType", "PPRF")],
                        "individual": staff(performer),
                    }
                ],
                "period": {"start": _when(start), "end": _when(start + dt.timedelta(hours=hours))},
                "serviceProvider": staff(home if kind == "AMB" else orgs[0]),
            }
        )
        encounters.append((url, start, kind))

    def during(at: tuple[str, dt.datetime, str]) -> Json:
        return {"subject": subject, "encounter": _ref(at[0])}

    for icd, sct, display, chronic in rng.sample(CONDITIONS, rng.randint(1, 3)):
        at = rng.choice(encounters)
        category = rng.choice(("problem-list-item", "encounter-diagnosis"))
        status = "active" if chronic else "resolved"
        onset = at[1] - dt.timedelta(days=rng.randint(0, 900) if chronic else rng.randint(0, 3))
        add(
            {
                "resourceType": "Condition",
                "clinicalStatus": _concept(THO + "condition-clinical", status),
                "verificationStatus": _concept(THO + "condition-ver-status", "confirmed"),
                "category": [_concept(THO + "condition-category", category)],
                "code": {
                    "coding": [_coding(ICD10, icd, display), _coding(SNOMED, sct, display)],
                    "text": display,
                },
                **during(at),
                "onsetDateTime": _when(onset),
                "recordedDate": _when(at[1]),
            }
        )

    def observation(
        at: tuple[str, dt.datetime, str], category: str, code: str, name: str, **value: Any
    ) -> str:
        effective = at[1] + dt.timedelta(minutes=rng.randint(5, 50))
        return add(
            {
                "resourceType": "Observation",
                "status": "final",
                "category": [_concept(THO + "observation-category", category)],
                "code": _concept(LOINC, code, name),
                **during(at),
                "effectiveDateTime": _when(effective),
                "performer": [staff(doctor)],
                **value,
            }
        )

    def quantity(unit: str, low: float, high: float, decimals: int) -> Json:
        value = round(rng.uniform(low, high), decimals)
        number = int(value) if decimals == 0 else value
        return {"value": number, "unit": unit, "system": UCUM, "code": unit}

    report_encounters = rng.sample(encounters, rng.randint(1, 2))
    tests = [GLUCOSE[index % 2], *rng.sample(LABS, rng.randint(3, 9))]
    results: list[list[str]] = [[] for _ in report_encounters]
    for n, (code, name, unit, low, high, places) in enumerate(tests):
        at, lab = report_encounters[n % len(results)], quantity(unit, low, high, places)
        results[n % len(results)].append(
            observation(at, "laboratory", code, name, valueQuantity=lab)
        )
    for at in encounters[: rng.randint(1, len(encounters))]:
        pressure = [
            {"code": _concept(LOINC, code, name), "valueQuantity": quantity("mm[Hg]", low, high, 0)}
            for code, name, low, high in (
                ("8480-6", "Systolic blood pressure", 105, 165),
                ("8462-4", "Diastolic blood pressure", 60, 100),
            )
        ]
        observation(at, "vital-signs", "85354-9", "Blood pressure panel", component=pressure)
        for code, name, unit, low, high, places in VITALS:
            observation(
                at, "vital-signs", code, name, valueQuantity=quantity(unit, low, high, places)
            )

    for at, urls, (code, name) in zip(report_encounters, results, PANELS, strict=False):
        add(
            {
                "resourceType": "DiagnosticReport",
                "status": "final",
                "category": [_concept(THO + "v2-0074", "LAB", "Laboratory")],
                "code": _concept(LOINC, code, name),
                **during(at),
                "effectiveDateTime": _when(at[1] + dt.timedelta(minutes=5)),
                "issued": _when(at[1] + dt.timedelta(hours=2)),
                "performer": [staff(home)],
                "result": [_ref(url) for url in urls],
            }
        )

    for code, name in rng.sample(MEDICATIONS, rng.randint(1, 3)):
        at = rng.choice(encounters)
        add(
            {
                "resourceType": "MedicationRequest",
                "status": rng.choice(("active", "completed")),
                "intent": "order",
                "medicationCodeableConcept": _concept(RXNORM, code, name),
                **during(at),
                "authoredOn": _when(at[1] + dt.timedelta(minutes=40)),
                "requester": staff(doctor),
                "dosageInstruction": [{"text": rng.choice(DOSAGES)}],
            }
        )

    for code, name, category, reaction, reaction_name in rng.sample(ALLERGIES, rng.randint(0, 2)):
        add(
            {
                "resourceType": "AllergyIntolerance",
                "clinicalStatus": _concept(f"{THO}allergyintolerance-clinical", "active"),
                "verificationStatus": _concept(
                    f"{THO}allergyintolerance-verification", "confirmed"
                ),
                "type": "allergy",
                "category": [category],
                "criticality": rng.choice(("low", "high")),
                "code": _concept(SNOMED, code, name),
                "patient": subject,
                "recordedDate": _when(encounters[0][1]),
                "reaction": [{"manifestation": [_concept(SNOMED, reaction, reaction_name)]}],
            }
        )

    for code, name in rng.sample(PROCEDURES, rng.randint(0, 2)):
        at = rng.choice(encounters)
        add(
            {
                "resourceType": "Procedure",
                "status": "completed",
                "code": _concept(SNOMED, code, name),
                **during(at),
                "performedDateTime": _when(at[1] + dt.timedelta(minutes=rng.randint(10, 55))),
            }
        )

    for code, name in rng.sample(VACCINES, rng.randint(1, 3)):
        given_on = START - dt.timedelta(days=rng.randint(30, 1500), hours=-10)
        add(
            {
                "resourceType": "Immunization",
                "status": "completed",
                "vaccineCode": _concept(CVX, code, name),
                "patient": subject,
                "occurrenceDateTime": _when(given_on),
                "primarySource": True,
            }
        )

    stay = next((e for e in encounters if e[2] == "IMP"), encounters[-1])
    summary = f"出院小结：患者{family}{given}，{stay[1]:%Y年%m月%d日}就诊，病情稳定，予以出院。"
    text = {
        "contentType": "text/plain",
        "language": "zh-CN",
        "data": base64.b64encode(summary.encode()).decode(),
    }
    add(
        {
            "resourceType": "DocumentReference",
            "status": "current",
            "type": _concept(LOINC, "18842-5", "Discharge summary"),
            "category": [_concept(US_CORE_DOCUMENTS, "clinical-note", "Clinical Note")],
            "subject": subject,
            "date": _when(stay[1] + dt.timedelta(hours=ENCOUNTER_TYPES[stay[2]][2])),
            "author": [staff(doctor)],
            "content": [{"attachment": text}],
            "context": {"encounter": [_ref(stay[0])]},
        }
    )

    if not conditional:  # the shared resources themselves, first, at fixed ids
        for one in reversed(used):
            url = f"{one['resourceType']}/{_fixed_id(one)}"
            entries.insert(0, _entry(_uuid(rng), {**one, "id": _fixed_id(one)}, "PUT", url))
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}
