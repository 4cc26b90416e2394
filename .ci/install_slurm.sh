#!/usr/bin/env bash
# Installs Debian's SLURM (22.05) and munge for tests/slurm: run as root; needs no systemd (the test
# starts its own daemons). About 10 s.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge
