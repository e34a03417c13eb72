# Sourced by scripts/setup and scripts/demo: make .venv a working virtualenv with fleet
# installed, whatever state a previous run (or a clone from another machine) left it in.
#
#   ensure_venv PROFILE PIP_TARGET   e.g. ensure_venv base .   /   ensure_venv dev '.[dev]'
#
# .venv is recreated when it is missing, a symlink (dangling or not: never ours to use), a
# plain file, or a venv whose interpreter no longer runs. An install is recorded by a stamp
# file written only after pip succeeded, holding a hash of pyproject.toml: a run killed in
# the middle of `pip install`, or a changed dependency list, installs again.

fleet_stamp() { # the stamp's content for this checkout's dependency list
  { cat pyproject.toml; echo "$1"; } | sha256sum | cut -d' ' -f1
}

ensure_venv() {
  local profile=$1 target=$2 py=${PYTHON:-python3} stamp=.venv/.fleet-installed-$1
  if ! command -v "$py" >/dev/null 2>&1; then
    echo "error: $py not found; install Python 3.11+ or set PYTHON=/path/to/python3" >&2
    return 1
  fi
  if [ -L .venv ] || { [ -e .venv ] && [ ! -d .venv ]; }; then
    echo "setup: .venv is $( [ -L .venv ] && echo "a symlink to $(readlink .venv)" || echo "not a directory"); replacing it with a fresh virtualenv" >&2
    rm -f .venv
  elif [ -d .venv ] && ! .venv/bin/python -c 'import sys' >/dev/null 2>&1; then
    echo "setup: .venv/bin/python does not run (moved or upgraded Python?); recreating .venv" >&2
    rm -rf .venv
  fi
  if [ ! -d .venv ]; then
    if ! "$py" -m venv .venv; then
      rm -rf .venv
      echo "error: '$py -m venv' failed; on Debian/Ubuntu install python3-venv (apt-get install python3-venv)" >&2
      return 1
    fi
  fi
  local want
  want=$(fleet_stamp "$profile")
  if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    return 0
  fi
  rm -f .venv/.fleet-installed-*
  if ! .venv/bin/python -m pip install -q -e "$target"; then
    echo "error: installing fleet into .venv failed (see pip's message above); fix it and run again" >&2
    return 1
  fi
  echo "$want" >"$stamp"
  if [ "$profile" = dev ]; then
    fleet_stamp base >.venv/.fleet-installed-base # dev includes everything base has
  fi
}
