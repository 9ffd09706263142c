"""README's main job and every example of its Experiments section, in README order, in a fresh
directory (tiny budgets through $KFQN_OVERRIDES): each exits 0, makes its own run or sweep, and
none changes what an earlier one wrote."""
from __future__ import annotations

import hashlib
import re
import shlex
from pathlib import Path

import pytest

from kfqn import cli

README = Path(__file__).resolve().parents[2] / "README.md"


def _blocks(section: str) -> list[str]:
    text = README.read_text()
    start = text.index(section)
    end = text.index("\n## ", start + 1)
    return re.findall(r"```bash\n(.*?)```", text[start:end], re.S)


def readme_commands() -> list[list[str]]:
    """The main job's kfqn command, then the Experiments examples, as argv lists."""
    main_job = _blocks("## Set up and run")[0].strip().split("&&")[-1]
    lines = [main_job] + _blocks("## Experiments:")[0].strip().splitlines()
    out = []
    for line in lines:
        argv = shlex.split(line, comments=True)
        assert argv and argv[0].endswith("bin/kfqn"), line
        out.append(argv[1:])
    return out


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()
            and p.name in ("status.json", "config.yaml", "checkpoint.pt", "epochs.csv")}


def test_readme_lists_the_expected_commands():
    cmds = readme_commands()
    assert cmds[0] == ["sweep", "quickstart"]
    assert [c[0] for c in cmds[1:]] == ["train", "train", "sweep", "sweep", "report",
                                         "components"]


@pytest.mark.slow
def test_readme_examples_run_in_order_and_lose_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KFQN_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("KFQN_OVERRIDES", " ".join([
        "budget.steps=2", "logging.progress=false", "sweep.presets=[adam]",
        "sweep.fresh_process=false",
        "tasks.curves.data.options.n_train=200", "tasks.curves.data.options.n_test=100",
        "tasks.curves.data.batch_size=100"]))
    runs = tmp_path / "runs"
    seen_dirs: set[str] = set()
    before: dict[str, str] = {}
    for argv in readme_commands():
        code = cli.main(argv)
        out, err = capsys.readouterr()
        assert code == 0, (argv, err)
        now = _snapshot(runs) if runs.exists() else {}
        # what earlier commands wrote is unchanged (the report rewrites only report files)
        assert {k: now.get(k) for k in before} == before, argv
        new = {str(Path(k).parent) for k in now if k not in before}
        if argv[0] in ("train", "sweep"):
            assert new, f"{argv} made no new run"
            assert not (new & seen_dirs)
            seen_dirs |= new
        before = now
    assert (runs / "quickstart" / "train" / "curves" / "kbfgs" / "seed0" / "status.json").exists()
    assert (runs / "quickstart" / "train" / "digits" / "kfbfgs_cnn-lr=0.1" / "seed0").is_dir()
    assert len(list((runs / "quickstart-seeds=0,1,2").glob("*/*/seed*"))) == 6
    assert len(list((runs / "lr_grid").glob("*/*/seed0"))) == 6
    report = (runs / "quickstart" / "report.md").read_text()
    assert "target loss for digits: 0.05" in report
