#!/usr/bin/env bash
# Install the project and the Debian packages its boards need, on a fresh Debian/Ubuntu machine.
#   ./install.sh          the project (pip install -e .)
#   ./install.sh test     with the test tools (pip install -e ".[test]")
# Packages: the aarch64 cross linker (ARM builds), qemu-user (the emulated board, host.emulate),
# an OpenSSH server (the real SSH test) and PoCL (compiles the generated OpenCL kernels on the CPU).
# nvcc, where installed (/usr/local/cuda), compiles the CUDA kernels ahead of time.
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v aarch64-linux-gnu-g++ >/dev/null || ! command -v qemu-aarch64-static >/dev/null \
   || [ ! -x /usr/sbin/sshd ] || [ ! -e /etc/OpenCL/vendors/pocl.icd ]; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends g++-aarch64-linux-gnu qemu-user-static openssh-server \
    pocl-opencl-icd ocl-icd-libopencl1
fi
PIP_DISABLE_PIP_VERSION_CHECK=1 python3 -m pip install -q -e ".${1:+[$1]}"
# FID/IS (compiler.evaluate --inception-weights): torch-fidelity without its torchvision, whose
# PyPI wheel is built for CUDA torch and fails to import beside the CPU one; the Inception
# network we use needs only torch.
PIP_DISABLE_PIP_VERSION_CHECK=1 python3 -m pip install -q --no-deps "torch-fidelity>=0.4,<0.5"
