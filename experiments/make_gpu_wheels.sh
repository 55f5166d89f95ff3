#!/usr/bin/env bash
# The wheels a GPU node without internet lacks for this project, in one small folder (docs/install-gpu-offline.md).
# Run it on any machine that reaches PyPI:
#
#   bash experiments/make_gpu_wheels.sh                 # -> wheels-gpu/ for CPython 3.12, manylinux x86-64
#   PYVER=3.11 ARCH=aarch64 bash experiments/make_gpu_wheels.sh wheels-gpu-arm
#
# The node is assumed to have its own CUDA torch and the usual scientific stack: NODE_HAS below and
# everything those pull in (resolved from PyPI's metadata, nothing of theirs is downloaded). The folder holds
# the rest of requirements-no-torch.txt's closure (gymnasium, gymnasium-robotics, mujoco, minari, tyro and
# their dependencies), pytest-xdist for a parallel test run, and typing-extensions (tyro needs a recent one).
# Left out unless asked for:
#   - wandb and its dependencies (about 24 MB; WITH_WANDB=1 adds them): runs without --track never import it;
#   - MuJoCo's viewer, mujoco-studio, with PyOpenGL and websockets (about 16 MB; WITH_VIEWER=1 adds them):
#     nothing here renders on screen. mujoco declares them, so the folder installs with --no-deps, from the
#     exact list it writes to its requirements.txt:
#
#       python -m pip install --no-index --no-deps --find-links wheels-gpu -r wheels-gpu/requirements.txt
#
#   (experiments/gpu_session.py does this, then `pip check`, which names the viewer's packages as missing.)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-wheels-gpu}
PYVER=${PYVER:-3.12}
ARCH=${ARCH:-x86_64}
PIP=${PIP:-python -m pip}
NODE_HAS=${NODE_HAS:-"numpy h5py matplotlib pyarrow tqdm huggingface-hub pytest rich pandas \
  filelock typing-extensions setuptools sympy networkx jinja2 fsspec"}  # the second line: torch's own requirements
KEEP="typing-extensions"  # shipped even if the node has one: pip --no-deps installs this exact version
DROP="wandb"
[[ ${WITH_WANDB:-0} == 1 ]] && DROP=""
[[ ${WITH_VIEWER:-0} == 1 ]] || VIEWER="mujoco-studio pyopengl websockets"
ABI=cp${PYVER/./}
PLATFORM=(--only-binary=:all: --python-version "$PYVER" --implementation cp --abi "$ABI"
          --platform "manylinux_2_28_$ARCH" --platform "manylinux_2_17_$ARCH" --platform "manylinux2014_$ARCH")
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# 1. What this project needs beyond the node: requirements-no-torch.txt without the node's packages and the linter
grep -v '^\s*#' requirements-no-torch.txt | grep -v '^\s*$' \
  | grep -viE "^(numpy|tqdm|matplotlib|pytest|ruff${DROP:+|$DROP})\b" > "$TMP/need.txt"
echo "pytest-xdist" >> "$TMP/need.txt"
echo "needed beyond the node: $(tr '\n' ' ' < "$TMP/need.txt")"
$PIP download --quiet --disable-pip-version-check "${PLATFORM[@]}" -d "$TMP/all" -r "$TMP/need.txt"

# 2. What the node has: its packages and their whole closure, resolved for the same Python and platform
# shellcheck disable=SC2086
$PIP install --quiet --disable-pip-version-check --dry-run --ignore-installed --report "$TMP/node.json" \
  "${PLATFORM[@]}" --target "$TMP/node-target" $NODE_HAS

# 3. The folder: every needed wheel the node lacks (or in KEEP), minus the viewer; and its exact install list
if [[ -e $DEST ]] && find "$DEST" -mindepth 1 ! -name '*.whl' ! -name requirements.txt | grep -q .; then
  echo "$DEST holds more than wheels; give another folder" >&2; exit 1
fi
rm -rf "$DEST" && mkdir -p "$DEST"
python - "$TMP/all" "$TMP/node.json" "$DEST" "$KEEP" "${VIEWER:-}" <<'EOF'
import json, re, shutil, sys
from pathlib import Path

src, report, dest, keep, viewer = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4].split(), sys.argv[5].split()
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
node = {norm(i["metadata"]["name"]) for i in json.load(open(report))["install"]}
keep, viewer = {norm(n) for n in keep}, {norm(n) for n in viewer}
kept, left = [], []
for wheel in sorted(src.glob("*.whl")):
    name, version = wheel.name.split("-")[:2]
    if norm(name) in viewer or (norm(name) in node and norm(name) not in keep):
        left.append(wheel.name)
        continue
    shutil.copy(wheel, dest)
    kept.append(f"{norm(name)}=={version}")
(dest / "requirements.txt").write_text(
    "# Install with: python -m pip install --no-index --no-deps --find-links wheels-gpu -r wheels-gpu/requirements.txt\n"
    + "\n".join(kept) + "\n"
)
print(f"left out (the node has them, or MuJoCo's viewer): {', '.join(left)}")
EOF

WHEELS=$(find "$DEST" -name '*.whl' | wc -l)
BYTES=$(du -cb "$DEST"/* | tail -1 | cut -f1)
REPO=$(git archive HEAD | wc -c)
echo "$DEST: $WHEELS wheels, $(python -c "print(f'{$BYTES / 2**20:.1f} MiB')") ($BYTES bytes); the repository" \
     "(git archive HEAD): $(python -c "print(f'{$REPO / 2**20:.1f} MiB')"); together" \
     "$(python -c "print(f'{($BYTES + $REPO) / 2**20:.1f} MiB')")"
