"""bench/reproduce.py --quick end to end on slices of the offline data: every table row, finite numbers, caching."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REPRODUCE = REPO / "bench" / "reproduce.py"
TASKS = {"sst2": "SST-2", "stsb": "STS-B"}  # one classification and one regression task
SOTU_CHARS = {"train": 120_000, "valid": 20_000, "test": 20_000}  # the files hold one address per line


def _head(source: Path, target: Path, lines: int, chars: int | None = None) -> None:
    """The first `lines` lines of `source` (cut to `chars` characters) written to `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(source, encoding="utf-8", newline="") as handle:
        text = "".join(line for line, _ in zip(handle, range(lines), strict=False))
    target.write_text(text[:chars], encoding="utf-8", newline="")


@pytest.fixture(scope="module")
def mini_data(tmp_path_factory, data_dir) -> Path:
    """The data folder's layout with a few addresses, 200 lines of WikiText-2 test and 50-row GLUE splits."""
    root = tmp_path_factory.mktemp("data")
    for split, chars in SOTU_CHARS.items():
        _head(data_dir / "sotu" / f"{split}.txt", root / "sotu" / f"{split}.txt", 10, chars)
    _head(data_dir / "wikitext-2-raw" / "wiki.test.raw", root / "wikitext-2-raw" / "wiki.test.raw", 200)
    for folder in TASKS.values():
        for split in ("train", "dev"):
            _head(data_dir / "glue" / folder / f"{split}.tsv", root / "glue" / folder / f"{split}.tsv", 51)
    return root


def _run(mini_data: Path, work: Path) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(REPRODUCE), "--quick", "--data-dir", str(mini_data), "--work-dir", str(work),
            "--tasks", ",".join(TASKS), "--ablation-tasks", "sst2", "--device", "cpu"]
    env = os.environ | {"HF_DATASETS_CACHE": str(work.parent / "hf-datasets"), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mini_data) -> tuple[dict, dict, Path]:
    """Two runs into the same work folder: the first makes every stage, the second should reuse them."""
    work = tmp_path_factory.mktemp("run") / "work"
    _run(mini_data, work)
    first = json.loads((work / "paper-miniature-quick.json").read_text())
    mtimes = {p: p.stat().st_mtime_ns for p in (work / "models").rglob("*") if p.is_file()}
    _run(mini_data, work)
    second = json.loads((work / "paper-miniature-quick.json").read_text())
    assert mtimes == {p: p.stat().st_mtime_ns for p in (work / "models").rglob("*") if p.is_file()}
    return first, second, work


def _finite(value) -> bool:
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return isinstance(value, int | float) and math.isfinite(value)


def test_every_row_with_finite_numbers(runs):
    report, _, _ = runs
    t = report["tables"]
    assert report["quick"] and report["schema"] == "kninfer-paper-miniature"
    assert [r["model"] for r in t["lm"]] == ["teacher", "distil-lm", "distil-kd", "kngpt2-lm", "kngpt2-ilkd",
                                            "kngpt2-ilkd-kninfer"]
    assert [r["model"] for r in t["ablation"]] == ["kngpt2-init", "kngpt2-lm", "kngpt2-kd-only", "kngpt2-ilkd"]
    assert [(r["model"], r["finetune_kd"]) for r in t["glue"]] == [
        ("teacher", "none"), ("distil-kd", "none"), ("distil-kd", "vanilla"), ("kngpt2-ilkd", "none"),
        ("kngpt2-ilkd", "ilkd")]
    for r in t["lm"] + t["ablation"]:
        assert _finite(r["sotu_test_ppl"]) and _finite(r["wikitext2_test_ppl"]) and r["sotu_test_ppl"] > 1
        assert r["parameters"] > 0
    for r in t["glue"]:
        assert set(r["scores"]) == set(TASKS) and _finite(r["scores"]) and _finite(r["average"])
        assert math.isclose(r["average"], sum(r["scores"].values()) / len(TASKS), rel_tol=1e-12)
    for r in t["ablation"]:
        assert set(r["glue_scores"]) == {"sst2"} and _finite(r["glue_scores"])
    # the shared rows are one run: LM + KD in the ablation is KnGPT2 + ILKD of the other tables
    assert t["ablation"][3]["glue_scores"]["sst2"] == t["glue"][4]["scores"]["sst2"]
    assert t["ablation"][3]["sotu_test_ppl"] == t["lm"][4]["sotu_test_ppl"]
    # equal budget: every pre-trained student saw the same tokens; the un-pretrained one none
    assert len({r["train_tokens"] for r in t["lm"][1:]}) == 1 and t["ablation"][0]["train_tokens"] == 0
    assert t["lm"][0]["paper_wikitext103_ppl"] == 18.8 and t["lm"][1]["paper_wikitext103_ppl"] is None
    assert t["ablation"][0]["paper_ppl"] == 28608
    assert _finite(report["wall_time_s"]) and report["wall_time_s"] > 0


def test_equal_size_check_recorded(runs):
    report, _, work = runs
    size = report["equal_size"]
    kn, distil = size["students"]["kngpt2"]["parameters"], size["students"]["distil"]["parameters"]
    assert math.isclose(size["relative_difference"], (kn - distil) / distil, rel_tol=1e-12)
    assert size["within_3_percent"] == (abs(kn - distil) <= 0.03 * distil)
    assert size["within_3_percent"]  # the quick sizes are chosen so that it holds
    # counted another way: the teacher less what each student removes (dropped blocks; dense minus factors)
    from kninfer.modeling.compress import compress
    from kninfer.modeling.io import load

    teacher, _ = load(work / "models" / "teacher")
    assert size["teacher"] == sum(p.numel() for p in teacher.parameters())  # GPT-2's head is tied: counted once
    dropped = sum(p.numel() for i, block in enumerate(teacher.transformer.h) if i % 2 for p in block.parameters())
    assert distil == size["teacher"] - dropped
    _, rows = compress(teacher, "kngpt2", tie_head=True)
    assert kn == size["teacher"] - sum(r.params_before - r.params_after for r in rows)


def test_rerun_skips_cached_stages(runs):
    first, second, _ = runs
    assert first["stages"] and all(stage["ran"] for stage in first["stages"].values())
    assert set(second["stages"]) == set(first["stages"])
    assert not any(stage["ran"] for stage in second["stages"].values())
    assert second["tables"] == first["tables"]
    assert second["wall_time_s"] < first["wall_time_s"]


def test_outputs_written(runs):
    report, _, work = runs
    markdown = (work / "paper-miniature-quick.md").read_text()
    for row in ("KnGPT2 + ILKD", "Distil + vanilla KD", "No pre-training", "Teacher (fine-tuned, CE)", "see paper"):
        assert row in markdown
    assert "QUICK SMOKE RUN" in markdown and "differs from the paper" in markdown
    assert (work / "paper-miniature-quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (REPO / "bench" / "results" / "paper-miniature-quick.json").exists()


def test_glue_sample_keeps_header_and_rows(runs, mini_data):
    _, _, work = runs
    for folder in TASKS.values():  # 50 of 50 rows: the whole file, header first, in file order
        for split in ("train", "dev"):
            assert (work / "glue-data" / folder / f"{split}.tsv").read_bytes() == \
                (mini_data / "glue" / folder / f"{split}.tsv").read_bytes()


def test_changed_sizes_refused(runs, mini_data):
    _, _, work = runs
    argv = [sys.executable, str(REPRODUCE), "--quick", "--data-dir", str(mini_data), "--work-dir", str(work),
            "--seed", "1", "--tasks", "sst2"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "other settings (seed)" in done.stderr


def test_only_a_missing_stage_reruns(runs, mini_data):
    first, _, work = runs
    (work / "stages" / "ppl" / "distil-lm.json").unlink()
    _run(mini_data, work)
    third = json.loads((work / "paper-miniature-quick.json").read_text())
    assert [name for name, stage in third["stages"].items() if stage["ran"]] == ["ppl/distil-lm"]
    assert third["tables"] == first["tables"]  # perplexity is deterministic: the same figures again


def test_short_keeps_the_teacher_and_its_own_folders(monkeypatch, data_dir):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import reproduce

    args = reproduce.parse_args(["--short", "--data-dir", str(data_dir)])
    assert (args.sizes, args.stem, args.work_dir.name) == ("short", "paper-miniature-short", "paper-miniature-short")
    assert args.results_dir == REPO / "bench" / "results"
    full, short = reproduce.SIZES["full"], reproduce.SIZES["short"]
    teacher = [k for k in full if k.startswith("teacher_") or k in ("n_layer", "n_embd", "n_head", "vocab_size")]
    assert {k: short[k] for k in teacher} == {k: full[k] for k in teacher}
    assert short["student_steps"] * 2 == full["student_steps"]
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--short", "--quick", "--data-dir", str(data_dir)])
