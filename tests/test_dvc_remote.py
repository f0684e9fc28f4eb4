"""The DVC remote: the default one sits outside the work tree, and a remote that cannot be written makes `dvc push` fail
with the path it could not write, losing nothing local."""

import configparser
from pathlib import Path

import pytest

from conftest import ROOT, run


def test_the_default_remote_is_a_folder_beside_the_project():
    config = configparser.ConfigParser()
    config.read(ROOT / ".dvc/config")
    assert config["core"]["remote"] == "team"
    url = (ROOT / ".dvc" / config["'remote \"team\"'"]["url"]).resolve()  # relative to .dvc/
    assert url == ROOT.parent / "dvc-remote" and ROOT not in url.parents


@pytest.fixture
def tracked(tmp_path):
    """A git + DVC repository with one file in the DVC cache."""
    repo = tmp_path / "repo"
    repo.mkdir()
    run("git init -q && dvc init -q && echo hello > data.txt && dvc add -q data.txt", repo)
    return repo


@pytest.mark.pipeline  # DVC subprocesses, some seconds each: kept out of the fast tier
@pytest.mark.parametrize(
    "remote, cause",
    [
        ("{tmp}/a-file/remote", "Not a directory"),  # a path that cannot be a folder (a file is in the way)
        ("/sys/dvc-remote", "/sys/dvc-remote"),  # a read-only file system: no folder can be made, even by root
    ],
    ids=["not-a-folder", "read-only"],
)
def test_a_remote_that_cannot_be_written_fails_the_push_and_keeps_the_cache(tracked, tmp_path, remote, cause):
    (tmp_path / "a-file").touch()
    run(["dvc", "remote", "add", "-d", "--local", "broken", remote.format(tmp=tmp_path)], tracked)
    cached = sorted(p for p in (tracked / ".dvc/cache").rglob("*") if p.is_file())
    pushed = run(["dvc", "push"], tracked, check=False)
    print(f"dvc push to {remote.format(tmp='<tmp>')} printed: {pushed.stderr.strip().splitlines()[0]}")
    assert pushed.returncode != 0 and cause in pushed.stderr and "ERROR" in pushed.stderr
    assert cached and sorted(p for p in (tracked / ".dvc/cache").rglob("*") if p.is_file()) == cached
    assert (tracked / "data.txt").read_text() == "hello\n"
    assert not Path(remote.format(tmp=tmp_path)).exists()
