"""Packaging: the wheel carries its catalog (`pip install .` then `gateway routes` works in a
fresh venv, outside the checkout), docker-compose passes every documented variable, and the
image's healthcheck is the only one."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import yaml

from tests.gateway.test_cli import clean_env

REPO = Path(__file__).resolve().parents[2]


def documented_variables() -> set[str]:
    """Every variable named in the first column of README's settings table."""
    readme = (REPO / "README.md").read_text()
    names: set[str] = set()
    for line in readme.splitlines():
        if line.startswith("| `"):
            first = line.split("|")[1]
            names.update(re.findall(r"`([A-Z][A-Z0-9_]+)`", first))
    return names


def test_compose_passes_every_documented_variable_and_keeps_one_healthcheck() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    gateway = compose["services"]["gateway"]
    passed = set(gateway["environment"])
    documented = documented_variables()
    assert {
        "REDIS_URL",
        "LOCAL_MODEL_DIR",
        "OPENROUTER_REFERER",
        "DEEPINFRA_BASE_URL",
    } <= documented
    assert documented - passed == set()
    assert "healthcheck" not in gateway  # the Dockerfile's applies, with its timeout
    dockerfile = (REPO / "Dockerfile").read_text()
    check = dockerfile[dockerfile.index("HEALTHCHECK") :]
    assert "--timeout=" in check and "--start-period=" in check
    # the image runs from its source tree: gateway/pricing.yaml links to the top-level catalog,
    # so the image must carry that file too
    assert (REPO / "gateway" / "pricing.yaml").resolve() == (REPO / "pricing.yaml").resolve()
    assert "COPY pricing.yaml ./" in dockerfile.splitlines()


def _copy_source(dest: Path) -> None:
    """What the wheel is built from, outside the checkout (no build/ or egg-info left there)."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("gateway", "providers", "local_backend"):
        shutil.copytree(REPO / package, dest / package, ignore=ignore)


def test_wheel_installs_in_a_fresh_venv_and_gateway_routes_works(tmp_path: Path) -> None:
    source, dist, venv = tmp_path / "src", tmp_path / "dist", tmp_path / "venv"
    _copy_source(source)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(source)]
    subprocess.run(build, check=True, timeout=300)
    (wheel,) = dist.glob("moe_gateway-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "gateway/pricing.yaml" in names and "gateway/py.typed" in names
    assert any(n.startswith("local_backend/formats/tokenizer_data/") for n in names)

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    # The dependencies come from the shared environment (no network): a path entry, not a
    # site dir, so its editable install of the checkout is not loaded.
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "shared-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", str(wheel)], check=True)

    env = clean_env()
    env.pop("GATEWAY_CONFIG")  # the packaged catalog is the default
    env.pop("PYTHONPATH", None)
    env["LEPTON_API_KEY"] = "k-lepton"
    where = subprocess.run(
        [python, "-c", "import gateway; print(gateway.__file__)"],
        env=env,
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert where.startswith(str(venv)), where  # the installed wheel, not the checkout
    done = subprocess.run(
        [venv / "bin" / "gateway", "routes"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "lepton/wizardlm-2-8x22b" in done.stdout and "live" in done.stdout
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    shown = subprocess.run(
        [venv / "bin" / "gateway", "--version"], env=env, capture_output=True, text=True
    )
    assert shown.returncode == 0 and shown.stdout.strip() == f"gateway (moe-gateway) {version}"
