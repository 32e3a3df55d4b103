# Shared set-up for scripts/serve and scripts/test: a virtualenv in .venv with torch 2.13.0 first.
# Sourced, not run. Idempotent: a second run only checks what is there.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VENV="${BRIDGE_VENV:-$ROOT/.venv}"
# torch first, pinned: an unpinned torch pulls several GB of CUDA packages on a CPU machine.
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo -n "$@"; else
    echo "need root to run: $*" >&2; return 1; fi
}

apt_install() {
  # Install Debian packages that are missing; quiet and non-interactive.
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "==> apt-get install ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

make_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "==> creating $VENV"
    if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
      rm -rf "$VENV"
      command -v apt-get >/dev/null && apt_install python3-venv
      "$PYTHON" -m venv "$VENV"
    fi
  fi
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
  if ! python -c "import torch" 2>/dev/null; then
    echo "==> pip install $TORCH_SPEC"
    python -m pip install -q "$TORCH_SPEC"
  fi
}

install_project() {
  local extra="$1"
  local stamp="$VENV/.bridge-installed$extra"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "==> pip install -e .$extra"
    python -m pip install -q -e ".$extra"
    touch "$stamp"
  fi
}
