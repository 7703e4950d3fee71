"""The one compiled part of hrx: the verifier's hot paths (ledger/_speedups.c: a reader of
canonical ledger text, and Merkle hashing through OpenSSL's libcrypto). It is optional: where
it cannot be built, the pure-Python paths give the same verdicts, more slowly (docs/spec.md
§18.5)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "ledger._speedups",
            sources=["ledger/_speedups.c"],
            libraries=["crypto"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
            optional=True,
        )
    ]
)
