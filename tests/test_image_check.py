"""``deploy/image_check.py`` (the real image build, run by CI after the tests): the parts that need no podman. The
podman configuration stays within this machine's limits, the build's pip setup reproduces the host's and mounts
what it names read-only, and a machine where podman cannot be had is a SKIPPED with its reason, not a failure."""

from __future__ import annotations

import resource

import pytest

from deploy import image_check

pytestmark = pytest.mark.docker


def test_containers_conf_selects_runc_and_limits_within_the_hard_ones(tmp_path, monkeypatch):
    monkeypatch.delenv("CONTAINERS_CONF", raising=False)
    image_check.containers_conf(tmp_path)
    text = (tmp_path / "containers.conf").read_text()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert 'runtime = "runc"' in text and 'cgroup_manager = "cgroupfs"' in text
    if hard != resource.RLIM_INFINITY:
        assert f"nofile={hard}:{hard}" in text
    assert image_check.os.environ["CONTAINERS_CONF"] == str(tmp_path / "containers.conf")


def test_pip_setup_reproduces_the_hosts_and_fails_fast_on_unreachable_indexes(tmp_path):
    mounts = image_check.pip_mounts(tmp_path)
    conf = (tmp_path / "pip.conf").read_text()
    assert conf.startswith("[global]\n") and "timeout = 15" in conf and "retries = 1" in conf
    assert mounts[:2] == ["-v", f"{tmp_path / 'pip.conf'}:/etc/pip.conf:ro"]
    assert all(m.endswith(":ro") for m in mounts[1::2])  # nothing of the host is writable by the build


def test_no_podman_and_no_way_to_install_it_is_a_skip_with_the_reason(monkeypatch, capsys):
    monkeypatch.setattr(image_check.shutil, "which", lambda name: None)
    monkeypatch.setattr(image_check.os, "geteuid", lambda: 1000)
    assert image_check.main([]) == 0
    out = capsys.readouterr().out
    assert "SKIPPED" in out and "podman" in out and "apt-get" in out
