"""The package stands alone: built into a wheel and installed (not editable) into a fresh virtual
environment, it runs from outside the checkout with only its own files. The environment borrows the
project's installed dependencies through a .pth line (installing torch and vLLM again would take
minutes); `personamath` itself comes only from the wheel, which the test checks."""
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import DATA, ROOT
from personamath.jsonl import read_jsonl, write_jsonl


def run(*command, cwd, env=None, timeout=300) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The python of a fresh virtual environment holding the wheel of this checkout."""
    tmp = tmp_path_factory.mktemp("package")
    wheels = tmp / "wheels"
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", wheels, ROOT, cwd=tmp)
    (wheel,) = wheels.glob("personamath-*.whl")
    venv = tmp / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp)
    python = venv / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp).stdout.strip())
    # The dependencies, from the project's environment, after the fresh environment's own site-packages.
    (site / "project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel, cwd=tmp)
    return python


def test_installed_package_runs_outside_the_checkout(installed, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # -P: the scripts' own folder (the checkout) is not put on sys.path, so only the installed package is found.
    where = run(installed, "-P", "-c", "import personamath; print(personamath.__file__)", cwd=tmp_path, env=env)
    assert Path(where.stdout.strip()).is_relative_to(installed.parent.parent)

    # A stage's --dry_run: prices and the solve prompt come from the package's data.
    questions = tmp_path / "questions.jsonl"
    write_jsonl(questions, read_jsonl(DATA / "gsm8k" / "train.jsonl")[:5])
    dry = run(installed, "-P", ROOT / "gen_cot.py", "--inputs", questions, "--output_dir", tmp_path / "gen",
              "--model", "gpt-4o-mini", "--dry_run", cwd=tmp_path, env=env)
    assert "5 requests" in dry.stdout and "estimated cost $" in dry.stdout, dry.stdout
    # The persona stage reads the built-in personas from the package.
    cot = [{"id": f"gsm8k/train:{i}", "source": "gsm8k", "problem": r["question"], "response": r["answer"],
            "gold": r["answer"].split("####")[-1].strip()} for i, r in enumerate(read_jsonl(questions))]
    write_jsonl(tmp_path / "gen" / "cot.jsonl", cot)
    persona = run(installed, "-P", ROOT / "persona_augment.py", "--output_dir", tmp_path / "gen", "--k", "2",
                  "--model", "gpt-4o-mini", "--dry_run", cwd=tmp_path, env=env)
    assert "20 requests" in persona.stdout, persona.stdout  # 10 rewrites, each with a persona, and 10 solves

    # Both graders on a few answers, re-grading generations as an eval script does.
    generations = tmp_path / "generations.jsonl"
    write_jsonl(generations, [
        {"id": "1", "question": "2+2?", "gold": "4", "completion": "So the answer is \\boxed{4}."},
        {"id": "2", "question": "Half of 7?", "gold": "3.5", "completion": "The answer is $\\boxed{\\frac{7}{2}}$"},
        {"id": "3", "question": "3*3?", "gold": "9", "completion": "The answer is \\boxed{6}."}])
    run(installed, "-P", ROOT / "eval_math.py", "--generations", generations, "--output_dir", tmp_path / "eval",
        cwd=tmp_path, env=env)
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    # The authors' string comparison does not take \frac{7}{2} for 3.5; math-verify does.
    assert summary["correct"] == {"paper": 1, "verify": 2}, summary["correct"]
    assert summary["provenance"]["code"]["git_commit"] is None  # an installed package has no checkout

    # The embedded model lives in the user cache folder, which $PERSONAMATH_CACHE moves; a converted
    # folder there is found (linked here: converting again would take a minute).
    from personamath.embedded_model import ensure_embedded_model

    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    (cache / "models" / "SmolLM2-135M-Instruct").symlink_to(ensure_embedded_model())
    model = run(installed, "-P", "-m", "personamath.embedded_model", cwd=tmp_path,
                env={**env, "PERSONAMATH_CACHE": str(cache)})
    assert model.stdout.strip() == str(cache / "models" / "SmolLM2-135M-Instruct")


def test_package_data_is_in_the_wheel(installed):
    """Everything the package reads from its own folder is shipped: prompts, prices, personas."""
    site = installed.parent.parent
    package = next(site.glob("lib/python*/site-packages/personamath"))
    shipped = {p.relative_to(package).as_posix() for p in package.rglob("*") if p.is_file() and p.suffix != ".pyc"}
    source = {p.relative_to(ROOT / "personamath").as_posix() for p in (ROOT / "personamath").rglob("*")
              if p.is_file() and "__pycache__" not in p.parts}
    assert shipped == source
