#!/usr/bin/env bash
# Packages for the single-node SLURM test cluster (tests/test_slurm.py starts and stops it itself).
# Idempotent: installs nothing when the programs are already there. Needs root (apt-get); without it, says so and
# leaves the SLURM tests to skip with the reason.
set -euo pipefail
need=()
for prog in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge mungekey:munge; do
  command -v "${prog%%:*}" >/dev/null 2>&1 || need+=("${prog##*:}")
done
if [ ${#need[@]} -eq 0 ]; then
  echo "slurm_setup: slurm and munge present"; exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "slurm_setup: missing ${need[*]} and cannot apt-get here (not root or not Debian); the SLURM tests will skip"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# slurm-wlm pulls slurmctld, slurmd and the client; no daemon is started (no systemd here, and the tests use their own)
apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
echo "slurm_setup: installed $(slurmctld -V)"
