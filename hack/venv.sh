#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment and prints its path.
# The environment lives outside the checkout, keyed by a hash of pyproject.toml's dependency
# lists (not its tool settings), so a fresh clone reuses it; pip's own cache (~/.cache/pip) makes a rebuild cheap. The project itself is
# (re)installed editable on every call so the venv always points at *this* checkout.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${QJOB_CACHE:-$HOME/.cache/qjob-operator}
key=$(python3 - "$root/pyproject.toml" <<'PY' | sha256sum | cut -c1-12
import json, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
print(json.dumps([project["dependencies"], project["optional-dependencies"]], sort_keys=True))
PY
)
venv=${QJOB_VENV:-$cache/venv-$key}
if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.complete" ]; then
  echo "hack/venv.sh: creating $venv (first run downloads torch and friends: several minutes)" >&2
  rm -rf "$venv"
  mkdir -p "$cache"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip >&2
  "$venv/bin/pip" install -q -e "$root[operator,runner,dev]" >&2
  touch "$venv/.complete"
fi
# Point the editable install at this checkout (cheap; needed when the checkout moved or gained a
# package): every top-level package pyproject.toml lists must import from this checkout.
if ! "$venv/bin/python" - "$root" <<'PY' >/dev/null 2>&1
import fnmatch, importlib.util, pathlib, sys, tomllib
root = pathlib.Path(sys.argv[1]).resolve()
find = tomllib.load(open(root / "pyproject.toml", "rb"))["tool"]["setuptools"]["packages"]["find"]
packages = [
    d.name
    for where in find["where"]
    for d in (root / where).iterdir()
    if (d / "__init__.py").is_file() and any(fnmatch.fnmatch(d.name, pattern) for pattern in find["include"])
]
for name in packages:
    spec = importlib.util.find_spec(name)
    if spec is None or not pathlib.Path(spec.origin).resolve().is_relative_to(root):
        sys.exit(1)
PY
then
  "$venv/bin/pip" install -q --no-deps -e "$root" >&2
fi
echo "$venv"
