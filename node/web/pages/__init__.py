"""The pages people use in a browser: the patient portal (:mod:`.portal`), the doctors' clinic
(:mod:`.clinic`), browser sign-in with server-side sessions and CSRF (:mod:`.browser_sessions`),
and the words in Simplified Chinese and English (:mod:`.text`), with their templates and
static files."""
