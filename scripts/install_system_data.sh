#!/usr/bin/env bash
# Real image data from Debian (Fashion-MNIST, MIT licence) where apt is usable; elsewhere the vision pipeline
# falls back to torchvision's download. Never fails the install: it says what it did.
set -u
target=/usr/share/datasets/fashion-mnist
if [ -d "$target" ] && ls "$target"/*train-images* >/dev/null 2>&1; then
  echo "fashion-mnist: present at $target"; exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "fashion-mnist: apt-get not available; vision training will download it with torchvision when online"; exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; else
    echo "fashion-mnist: not root and no passwordless sudo; run 'apt-get install dataset-fashion-mnist' yourself"; exit 0
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
  || { $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } \
  && echo "fashion-mnist: installed at $target" \
  || echo "fashion-mnist: apt install failed; vision training will download it with torchvision when online"
exit 0
