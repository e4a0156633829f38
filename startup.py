"""What must be in place before any library loads; every entry point (train.py, infer.py, each
script in scripts/) imports this first.

bitsandbytes 0.50 on a CPU with AVX512-BF16 tries, at import, to fetch a 4-bit kernel from the hub
through the optional `kernels` package and, without it, logs "Failed to load CPU gemm_4bit_forward
from kernels-community: No module named 'kernels'" (peft imports bitsandbytes, so every run
printed it). 4-bit runs without that kernel, and `kernels` would download code at run time, which
an offline machine cannot do: nothing for a user to act on. Only that exact message is dropped;
any other bitsandbytes message still shows. The filter sits on bitsandbytes' logger before the
module creating it is imported (logging returns the same logger object by name).

A process killed by a signal (SIGABRT from a library's C++ thread, a segfault in a kernel) prints
nothing of its own: under torchrun the launcher reports only "Signal 6 (SIGABRT) received".
faulthandler writes every thread's Python stack to stderr first, so the report says where each
thread was (a rank's rare "terminate called without an active exception" at exit).
"""

from __future__ import annotations

import faulthandler
import logging

BITSANDBYTES_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
MISSING_KERNELS_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'"


def is_missing_kernels_notice(record: logging.LogRecord) -> bool:
    return record.getMessage().startswith(MISSING_KERNELS_NOTICE)


def drop_missing_kernels_notice(record: logging.LogRecord) -> bool:
    """A logging filter: False (drop) for bitsandbytes' notice that `kernels` is not installed."""
    return not is_missing_kernels_notice(record)


_logger = logging.getLogger(BITSANDBYTES_CPU_LOGGER)
if drop_missing_kernels_notice not in _logger.filters:  # once, however often this is imported
    _logger.addFilter(drop_missing_kernels_notice)

if not faulthandler.is_enabled():  # a user's own PYTHONFAULTHANDLER / -X faulthandler wins
    try:
        faulthandler.enable(all_threads=True)
    except (RuntimeError, AttributeError, ValueError, OSError):  # no stderr, or one with no file descriptor
        pass
