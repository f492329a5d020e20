#!/usr/bin/env bash
# System packages from Debian where apt is usable, each one only when missing:
#  - dataset-fashion-mnist: real image data (MIT licence); elsewhere the vision pipeline falls back to torchvision's
#    download.
#  - bible-kjv: the King James Bible (public domain) with its `bible` reader, part of the pd-english corpus
#    (llm/data/corpus.py); elsewhere that corpus is refused with the command that installs it.
#  - slurm-wlm + munge: a real 2-node SLURM cluster for the tests (tests/slurm_cluster.py); elsewhere those tests skip.
# Never fails the install: it says what it did.
set -u

sudo=""
apt_usable=1
if ! command -v apt-get >/dev/null 2>&1; then
  apt_usable=0; why="apt-get not available"
elif [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; else
    apt_usable=0; why="not root and no passwordless sudo"
  fi
fi
export DEBIAN_FRONTEND=noninteractive
updated=0

# apt_install PKG...: install the packages; on failure refresh the package lists once (a fresh image has none) and
# retry. Returns apt's status; its output is kept quiet because the caller says what happened.
apt_install() {
  $sudo apt-get install -y -q --no-install-recommends "$@" >/dev/null 2>&1 && return 0
  if [ "$updated" = 0 ]; then
    updated=1
    $sudo apt-get update -q >/dev/null 2>&1 || return 1
    $sudo apt-get install -y -q --no-install-recommends "$@" >/dev/null 2>&1
  else
    return 1
  fi
}

# Fashion-MNIST
target=/usr/share/datasets/fashion-mnist
if [ -d "$target" ] && ls "$target"/*train-images* >/dev/null 2>&1; then
  echo "fashion-mnist: present at $target"
elif [ "$apt_usable" = 0 ]; then
  echo "fashion-mnist: $why; vision training will download it with torchvision when online"
elif apt_install dataset-fashion-mnist; then
  echo "fashion-mnist: installed at $target"
else
  echo "fashion-mnist: apt install failed; vision training will download it with torchvision when online"
fi

# King James Bible: the `bible` program and its compressed text (bible-kjv-text, a dependency).
if command -v bible >/dev/null 2>&1 && [ -f /usr/lib/bible.data ]; then
  echo "bible-kjv: present"
elif [ "$apt_usable" = 0 ]; then
  echo "bible-kjv: missing; $why; the pd-english corpus needs it (apt-get install bible-kjv)"
elif apt_install bible-kjv; then
  echo "bible-kjv: installed"
else
  echo "bible-kjv: apt install failed; the pd-english corpus needs it (apt-get install bible-kjv)"
fi

# SLURM: the daemons and client commands the cluster fixture runs, plus munge for its authentication.
slurm_missing=""
for cmd in slurmctld slurmd sbatch srun scontrol squeue sinfo munged munge unmunge mungekey; do
  command -v "$cmd" >/dev/null 2>&1 || slurm_missing="$slurm_missing $cmd"
done
if [ -z "$slurm_missing" ]; then
  echo "slurm: present ($(slurmctld -V 2>/dev/null), munge)"
elif [ "$apt_usable" = 0 ]; then
  echo "slurm: missing$slurm_missing; $why; the SLURM tests will skip (apt-get install slurm-wlm munge)"
elif apt_install slurm-wlm munge; then
  # Debian starts the services on install where systemd runs; the fixture runs its own daemons, from its own
  # slurm.conf, so nothing else is configured here.
  echo "slurm: installed slurm-wlm and munge ($(slurmctld -V 2>/dev/null))"
else
  echo "slurm: apt install of slurm-wlm munge failed; the SLURM tests will skip"
fi
exit 0
