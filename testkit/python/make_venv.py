#!/usr/bin/env python3
"""Creates the virtualenv with Modal's official Python client that the modal_official_client test
runs (controller/tests/modal_official_client.rs).

    ${TAILBOX_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tailbox}/modal-official-client/venv

It installs exactly requirements.txt (next to this file) from PyPI with pip, then copies that
file into the venv as `requirements.stamp`: the stamp is written last, so it marks a complete
install, and the test compares it with requirements.txt to know the venv is current. Re-running
is a no-op while they match. Parallel runs wait on a lock. Prints the venv's python. Needs only
python3 (with its venv module) and PyPI.
"""

import fcntl
import os
import pathlib
import shutil
import subprocess
import sys
import venv

HERE = pathlib.Path(__file__).resolve().parent
REQUIREMENTS = HERE / "requirements.txt"


def cache_dir() -> pathlib.Path:
    if os.environ.get("TAILBOX_CACHE_DIR"):
        return pathlib.Path(os.environ["TAILBOX_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(xdg) / "tailbox"


def main() -> int:
    base = cache_dir() / "modal-official-client"
    base.mkdir(parents=True, exist_ok=True)
    target = base / "venv"
    stamp = target / "requirements.stamp"
    python = target / "bin" / "python"
    wanted = REQUIREMENTS.read_text()
    with open(base / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.is_file() and stamp.read_text() == wanted and python.exists():
            print(python)
            return 0
        print(f"make_venv.py: installing {REQUIREMENTS.name} into {target}", file=sys.stderr)
        shutil.rmtree(target, ignore_errors=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(target)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             "--no-deps", "--only-binary=:all:", "--requirement", str(REQUIREMENTS)],
            check=True,
        )
        # pip installed exactly the pins (--no-deps); make sure they are consistent.
        subprocess.run([str(python), "-m", "pip", "check"], check=True, stdout=subprocess.DEVNULL)
        stamp.write_text(wanted)
    print(python)
    return 0


if __name__ == "__main__":
    sys.exit(main())
