#!/usr/bin/env bash
# Builds a wheel from this checkout, installs it into a fresh virtual
# environment that has only what the wheel and its test extras ask for (no
# torch, no build tools), and runs the test suite against that install.
set -euo pipefail
cd "$(dirname "$0")/.."

dist=$(mktemp -d)
python -m pip wheel --quiet --no-deps -w "$dist" .
wheel=$(ls "$dist"/tileattn-*.whl)
echo "built $(basename "$wheel")"

venv=$(mktemp -d)/venv
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet "${wheel}[test]"
# Run from outside the checkout so the installed wheel, not the source
# tree, is what gets imported.
cd "$(dirname "$venv")"
"$venv/bin/python" -c "import tileattn; tileattn.show_config()"
"$venv/bin/python" -m pytest -q -p no:cacheprovider "$OLDPWD/tests"
