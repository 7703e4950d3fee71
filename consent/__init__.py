"""Patient consent for hrx: the FHIR Consent a patient grants, its ``consent.granted`` and
``consent.revoked`` ledger entries, the pseudonym that stands for the patient on the ledger,
and the deny-by-default policy (docs/spec.md §14) as a pure function of ledger entries and an access
request, so that every member and the offline auditor reach the same decision."""
