# Rebuild, on the development machine, the git-ignored folders that device calls carry (README.md here): a fresh
# checkout has none of them. Each is made only where it is missing; teachers cannot be rebuilt here (they are
# trained on a GPU: frontier_trials.sh's TEACHERS).
#     bash benchmarks/device/carry.sh [whl] [data] [shared] [minilm] [text]      # default: all five
set -eu
cd "$(dirname "$0")/../.."
WHAT=${*:-"whl data shared minilm text"}
SHARED=${STTP_SHARED:-../shared}
for w in $WHAT; do case $w in
  whl)  # typer and friends for the device's Python 3.12 (the device has torch, not these)
    [ -n "$(ls .whl/*.whl 2>/dev/null)" ] || python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux2014_x86_64 -d .whl typer click rich shellingham markdown-it-py mdurl \
      pygments typing_extensions pytest pluggy iniconfig pydantic pydantic-core annotated-types typing-inspection annotated-doc ;;
  data)
    [ -f .carry/data/cifar10-jpg.tar.xz ] || { mkdir -p .carry/data && cp "$SHARED/data/cifar10-jpg.tar.xz" .carry/data/; } ;;
  shared)  # the shared CIFAR ResNet-18 and its architecture file
    if [ ! -f .carry/shared/models/resnet18_cifar10.pt ]; then
      if [ -f "$SHARED/models/resnet18_cifar10.pt" ]; then mkdir -p .carry/shared && cp -r "$SHARED/models" .carry/shared/ && chmod -R u+w .carry/shared
      else echo "carry.sh: $SHARED/models/resnet18_cifar10.pt is absent: .carry/shared not made" >&2; fi
    fi ;;
  text)
    [ -f .data/text/heldout.txt ] || python benchmarks/make_text_data.py ;;
  minilm)  # needs .data/text/heldout.txt for its closeness check
    [ -f .data/text/heldout.txt ] || python benchmarks/make_text_data.py
    [ -d .carry/minilm16 ] || python benchmarks/pack_minilm.py --out .carry/minilm16 ;;
  *) echo "carry.sh: unknown folder '$w' (whl, data, shared, minilm, text)" >&2; exit 2 ;;
esac; done
du -sh .whl .carry/* .data/text 2>/dev/null || true
