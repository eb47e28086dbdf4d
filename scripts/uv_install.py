"""``uv pip install ARGS`` into this interpreter's environment, with pip's own index settings.

``make install`` runs it with the virtual environment's python after ``pip install uv``.
uv does not read pip's configuration, so the indexes, find-links, constraints and
certificate that ``pip config list`` reports (``/etc/pip.conf``, ``PIP_*`` variables,
user and site files) are passed to uv: both install from the same places, and, as
pip does, uv picks the best version across all indexes (``unsafe-best-match``).
Should uv fail, pip installs the same requirements. Standard library only: it runs
before the project is installed.

    python scripts/uv_install.py -e '.[dev]'
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

#: pip config key (after its ``global.``/``install.``/``:env:.`` scope) -> uv option; None: environment.
OPTIONS = {"index-url": "--default-index", "extra-index-url": "--index", "find-links": "--find-links",
           "constraint": "--constraint", "cert": None}


def pip_config() -> dict[str, list[str]]:
    """pip's effective settings of interest, each a list of values (later scopes win for a key)."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                            check=False).stdout
    found: dict[str, list[str]] = {}
    for line in listed.splitlines():
        name, _, value = line.partition("=")
        key = name.rsplit(".", 1)[-1]
        if key in OPTIONS:
            found[key] = shlex.split(value.strip().strip("'\""))
    return found


def uv_command(args: list[str], config: dict[str, list[str]]) -> tuple[list[str], dict[str, str]]:
    """The uv command line and environment for ``uv pip install ARGS`` under ``config``."""
    uv = Path(sys.executable).with_name("uv")
    cmd = [str(uv), "pip", "install", "--python", sys.executable]
    env = dict(os.environ)
    for key, values in config.items():
        option = OPTIONS[key]
        if option is None:
            env.setdefault("SSL_CERT_FILE", values[0])
            continue
        for value in values:
            if missing_local(value):
                continue  # pip skips a local index or find-links that is not there (with a warning)
            cmd += [option, value]
    return cmd + ["--index-strategy", "unsafe-best-match", *args], env


def missing_local(location: str) -> bool:
    """Whether ``location`` is a local path or ``file://`` URL that does not exist."""
    if "://" in location and not location.startswith("file://"):
        return False
    return not Path(location.removeprefix("file://")).exists()


def main() -> int:
    cmd, env = uv_command(sys.argv[1:], pip_config())
    code = subprocess.call(cmd, env=env)
    if code == 0:
        return 0
    print(f"uv exited with {code}; installing with pip instead (slower)", file=sys.stderr)
    return subprocess.call([sys.executable, "-m", "pip", "install", "--progress-bar", "on", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
