"""The fuzz targets by name: each a function that checks one drawn case, and
the hypothesis strategy that draws the cases. tests/test_fuzz.py runs the
non-selftest names, with a case count per target."""

from __future__ import annotations

from .selftest import crash_cases, target_selftest_crash, target_selftest_untyped, untyped_cases
from .target_cache import cache_cases, target_cache
from .target_files import file_cases, target_files
from .target_mha import mha_cases, target_mha
from .target_modules import module_cases, target_modules
from .target_rope import rope_cases, target_rope
from .target_sdpa import sdpa_cases, target_sdpa
from .target_sinusoidal import sinus_cases, target_sinusoidal
from .target_state_dict import sd_cases, target_state_dict
from .target_threads import target_threads, threads_cases

TARGETS = {
    "selftest_crash": (target_selftest_crash, crash_cases),
    "selftest_untyped": (target_selftest_untyped, untyped_cases),
    "sdpa": (target_sdpa, sdpa_cases()),
    "threads": (target_threads, threads_cases),
    "rope": (target_rope, rope_cases()),
    "sinusoidal": (target_sinusoidal, sinus_cases),
    "mha": (target_mha, mha_cases()),
    "cache": (target_cache, cache_cases()),
    "state_dict": (target_state_dict, sd_cases()),
    "files": (target_files, file_cases()),
    "modules": (target_modules, module_cases()),
}
