"""The line between the sans-I/O core and the I/O shell: no core module imports an I/O library
or the server shell.

The core is every module of `broker/` outside the shell's packages (broker.server,
broker.client, broker.cluster, broker.demo) and the command line (broker.cli and the
`python -m broker` entry that runs it). Each is imported alone, in a fresh interpreter, so one
module cannot hide another's import.
"""

import subprocess
import sys
from pathlib import Path

import pytest

BROKER = Path(__file__).resolve().parent.parent / "broker"
SHELL = {"server", "client", "cluster", "demo", "cli", "__main__"}
FORBIDDEN = ("asyncio", "uvloop", "picows", "aiohttp", "broker.server")


def core_modules() -> list[str]:
    names = ["broker"]
    for path in sorted(BROKER.iterdir()):
        name = path.name.split(".")[0]
        if name in SHELL or name.startswith("__"):
            continue
        if path.is_dir() and (path / "__init__.py").exists():
            names.append(f"broker.{name}")
        elif path.suffix == ".py" or (path.suffix in (".so", ".pyd") and name == "_fastpath"):
            names.append(f"broker.{name}")
    return sorted(set(names))


def test_the_core_is_every_module_outside_the_shell():
    core = core_modules()
    for name in ("broker.router", "broker.session", "broker.limits", "broker.pressure", "broker.backplane", "broker.fastpath"):
        assert name in core
    assert not [name for name in core if name.split(".")[1:2] and name.split(".")[1] in SHELL]


@pytest.mark.parametrize("module", core_modules())
def test_a_core_module_imports_no_io_library_nor_the_shell(module):
    code = f"import sys\nimport {module}\nbad = [m for m in {FORBIDDEN!r} if m in sys.modules]\nprint(' '.join(bad))\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == [], f"{module} imports {done.stdout.strip()}"
