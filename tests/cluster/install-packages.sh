#!/usr/bin/env bash
# Debian packages the tests need, installed only when missing:
#   slurm-wlm munge mariadb-server slurmdbd  a real Slurm 22.05 with accounting (tests/cluster)
#   dataset-fashion-mnist                    the real Fashion-MNIST files (tests/test_data.py)
#   lmod                                     a real module system for --sdm env-modules (tests/test_lmod.py)
#   chromium                                 a real browser for the report (tests/browser.py, tests/test_workflow.py)
# Never slurm-wlm-emulator: it replaces slurmctld/slurmd with front-end-mode binaries.
set -euo pipefail
need=()
command -v slurmctld >/dev/null || need+=(slurm-wlm)
command -v munged >/dev/null || need+=(munge)
command -v mariadbd >/dev/null || need+=(mariadb-server)
command -v slurmdbd >/dev/null || need+=(slurmdbd)
[[ -d /usr/share/datasets/fashion-mnist ]] || need+=(dataset-fashion-mnist)
[[ -f /usr/share/lmod/lmod/init/bash ]] || need+=(lmod)
command -v chromium >/dev/null || need+=(chromium)
if ((${#need[@]})); then
  if [[ $(id -u) != 0 ]]; then
    echo "install-packages: not root; cannot install ${need[*]} (the tests that need them will say so)" >&2
    exit 0
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
