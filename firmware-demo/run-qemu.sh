#!/usr/bin/env bash
# Runs a firmware ELF on QEMU's Cortex-M4 board; semihosting carries its output and exit code. A timeout
# (QEMU_TIMEOUT seconds, default 300) ends a hung run with 124.
set -euo pipefail
exec timeout "${QEMU_TIMEOUT:-300}" qemu-system-arm -cpu cortex-m4 -machine mps2-an386 -nographic \
  -semihosting-config enable=on,target=native ${QEMU_EXTRA:-} -kernel "$1"
