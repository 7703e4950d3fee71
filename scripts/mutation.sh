#!/usr/bin/env sh
# Mutation testing of the trust core with mutmut 3 (pip install -e '.[mutation]'); the settings
# are pyproject.toml's [tool.mutmut], the outcome is recorded in docs/spec.md §18.12.
#
#   scripts/mutation.sh                                 # every trust-core module
#   scripts/mutation.sh ledger.canonical ledger.merkle  # some of them, by module name
#
# MUTATION_CHILDREN sets how many mutants run at once (default 2). mutmut keeps its work in
# mutants/ (ignored by git): without arguments it tests only the mutants it has no verdict on
# yet; the modules named are tested again in full. mutmut maps tests to functions again only
# when a test's name is new: after changing a test in place, delete mutants/mutmut-stats.json
# (or all of mutants/, for a fresh run). `python3 -m mutmut show NAME` prints a mutant's change.
set -euf
cd "$(dirname "$0")/.."
patterns=""
for module in "$@"; do
    patterns="$patterns $module.*"
done
# shellcheck disable=SC2086
python3 -m mutmut run --max-children "${MUTATION_CHILDREN:-2}" $patterns
python3 -m mutmut results
