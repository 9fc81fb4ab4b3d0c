"""Paper-reproduction layer: manifests (orchestration/paper.py), reproduce (dry run, a tiny real run on Ray)
and report (from real MLflow runs in a temporary SQLite store; no mocks)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from orchestration.paper import PAPER_DIR, available_tables, load_table
from orchestration.report import report
from orchestration.reproduce import list_cells, reproduce, run_tags, trial_specs
from s4mc.config import ConfigError, load_config
from s4mc.data.splits import DEFAULT_SPLITS_DIR

TABLES = ["table1", "table2", "table3", "table4", "table5", "table6", "table7", "table8", "tableF1", "table9",
          "embedded"]
# A literal copy of docs/method.md §8 (the source of every published value), parsed here independently of the
# manifests. If docs/method.md sits beside the repository (CI), the copy is checked against it as well.
METHOD_MD_S8 = """\
Table 1, VOC classic, R101 (labels 92 / 183 / 366 / 732 / 1464):
- Supervised only: 45.77 / 54.92 / 65.88 / 71.69 / 72.50
- CutMix-Seg: 52.16 / 63.47 / 69.46 / 73.73 / 76.54
- CutMix-Seg + S4MC: 70.96 / 71.6 / 75.41 / 77.73 / 80.58
- FixMatch + S4MC: 73.13 / 74.72 / 77.27 / 79.07 / 79.6
- UniMatch (as re-run by the authors): 366 → 77.7; UniMatch (its own paper): 75.2 / 77.2 / 78.8 / 79.9 / 81.2
- UniMatch + S4MC: 74.72 / 75.21 / 79.09 ± 0.18 / 80.12 / 81.56
Table 2, VOC classic, R50: S4MC 72.62 at 92.
Table 3, VOC blended, R101 (662 / 1323 / 2646 / 5291): CutMix-Seg + S4MC 78.84 at 662.
Table 4, Cityscapes, R101 (186 / 372 / 744 / 1488): UniMatch (re-run) 75.99 and UniMatch + S4MC 77.0 at 186;
  UniMatch's own paper: 76.6 / 77.9 / 79.2 / 79.5.
Table 5, COCO, Xception-65 (1/512 / 1/256 / 1/128 / 1/64 / 1/32):
- Supervised only 22.9 / 28.0 / 33.6 / 37.8 / 42.2; PseudoSeg 29.8 / 37.1 / 39.1 / 41.8 / 43.6;
  PC²Seg 29.9 / 37.5 / 40.1 / 43.7 / 46.1; UniMatch (re-run) 31.9 / 38.9 / 43.86 / 47.8 / 49.8;
  UniMatch + S4MC 32.9 / 40.4 / 43.78 / 47.98 / 50.58.
Ablations (VOC 366 unless noted): Table 6 α_0 (best 0.4); Table 7 neighbourhood size / k / selection
rule (best 3×3, k = 1, max); Table 8 refinement × DPA on UniMatch, blended 1/2 (refinement alone +1.09,
DPA alone worse, both best); Table F.1 confidence function (margin best); Table 9 Boundary IoU on COCO.
"""
# The specification beside the repository (the project's source) and the repository's own account of it.
SHARED_METHOD_MD = Path(__file__).resolve().parents[2] / "shared" / "method.md"
DOCS_METHOD_MD = Path(__file__).resolve().parents[1] / "docs" / "method.md"


def _numbers(line: str) -> list[float]:
    return [float(x) for x in re.findall(r"\d+(?:\.\d+)?", line.split(":", 1)[1])]


def _table1_published_from_text() -> dict[tuple[str, str], float]:
    labels = ["92", "183", "366", "732", "1464"]
    rows = {"Supervised only": "Supervised", "CutMix-Seg": "CutMix-Seg", "CutMix-Seg + S4MC": "CutMix-Seg + S4MC",
            "FixMatch + S4MC": "FixMatch + S4MC", "UniMatch + S4MC": "UniMatch + S4MC"}
    out = {}
    for line in METHOD_MD_S8.splitlines():
        name = line.removeprefix("- ").split(":", 1)[0]
        if line.startswith("- ") and name in rows:
            values = [v for v in _numbers(line) if v != 0.18]  # "79.09 ± 0.18": the spread, not a cell
            assert len(values) == 5, line
            out.update({(rows[name], label): v for label, v in zip(labels, values, strict=True)})
    return out


@pytest.fixture(autouse=True)
def _own_env(monkeypatch):
    # tracking.configure exports MLFLOW_TRACKING_URI process-wide; each test here starts without it.
    for var in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def loaded():
    return {t: load_table(t) for t in TABLES}


def test_every_table_has_a_manifest():
    assert sorted(available_tables()) == sorted(TABLES)


@pytest.mark.parametrize("table", TABLES)
def test_manifest_loads_and_dry_run_lists_every_cell(table, loaded):
    lt = loaded[table]
    lines = []
    result = reproduce(lt, dry_run=True, echo=lines.append)
    text = "\n".join(lines)
    rows = list_cells(lt)
    assert result["cells"] == len(rows) == len(lt.spec.cells) > 0
    for r in rows:
        assert re.search(rf"^{r['id']}\s+{re.escape(r['row'][:34])}\s+{re.escape(r['column'])}\s", text, re.M), r
        for path, sha in r["split_files"]:
            assert f"{path} ({sha[:12]})" in text
    trials = 0 if lt.spec.runs_from else len(rows) * len(lt.spec.seeds)
    assert f"{len(rows)} cells x {len(lt.spec.seeds)} seeds = {trials} trials" in text
    assert lt.spec.seeds == [0, 1, 2]


def test_table1_counts_and_published_values_equal_method_md(loaded):
    lt = loaded["table1"]
    assert len(lt.cells) == 25 and len(trial_specs(lt)) == 75
    expected = _table1_published_from_text()
    got = {(rc.cell.row, rc.cell.column): rc.cell.published for rc in lt.cells}
    assert got == expected
    uni = next(rc.cell for rc in lt.cells if (rc.cell.row, rc.cell.column) == ("UniMatch + S4MC", "366"))
    assert (uni.published, uni.published_std) == (79.09, 0.18)
    cfg = next(rc.config for rc in lt.cells if rc.cell.row == "UniMatch + S4MC")
    assert (cfg.host.w_fp, cfg.host.w_s1, cfg.host.w_s2) == (0.0, 0.5, 0.5)  # the paper's variant (docs/method.md §5)


def test_docs_method_md_holds_every_published_number():
    text = DOCS_METHOD_MD.read_text()
    for line in METHOD_MD_S8.splitlines():
        assert line in text, f"docs/method.md §8 lacks: {line!r}"


def test_the_specification_beside_the_repository_is_unchanged():
    if not SHARED_METHOD_MD.is_file():
        pytest.skip("the project's method.md is not beside the repository (a user's clone)")
    text = SHARED_METHOD_MD.read_text()
    for line in METHOD_MD_S8.splitlines():
        assert line in text, f"method.md §8 changed: {line!r}"


def test_every_published_value_is_in_method_md(loaded):
    # Unknown cells stay null: a value that §8 does not contain would be a guess.
    quoted = set(re.findall(r"\d+\.\d+|\d+", METHOD_MD_S8))
    for table, lt in loaded.items():
        for rc in lt.cells:
            for value in (rc.cell.published, rc.cell.published_std, rc.cell.published_delta):
                if value is not None:
                    assert any(float(q) == abs(value) for q in quoted), (table, rc.cell.row, rc.cell.column, value)


@pytest.mark.parametrize("table", TABLES)
def test_every_cell_config_validates_as_the_trial_builds_it(table, loaded, tmp_path):
    from orchestration.trial import build_trial_config

    lt = loaded[table]
    for rc in lt.cells:
        cfg = load_config(None, base=rc.config)  # the stored config is a valid training config
        assert cfg.host.name == rc.cell.host and cfg.data.split == str(rc.cell.split)
    if lt.spec.runs_from:
        return
    for spec in trial_specs(lt)[:: len(lt.spec.seeds)]:  # one seed per cell: what a Ray trial would train
        built = build_trial_config(spec.settings, spec.overrides, spec.seed, tmp_path / spec.key, spec.key)
        rc = next(c for c in lt.cells if c.id == spec.cell)
        for section in ("model", "data", "host", "s4mc", "eval"):
            assert built[section] == rc.config[section], (spec.key, section)
        assert built.train.lr == rc.config.train.lr and built.train.epochs == rc.config.train.epochs


def test_embedded_budget_is_one_override():
    lt = load_table("embedded")
    assert len(lt.cells) == 15 and {rc.cell.column for rc in lt.cells} == {"30", "50", "all"}
    assert [str(rc.cell.split) for rc in lt.cells].count("all") == 1  # one full-supervision cell
    assert {(rc.config.train.steps, rc.config.train.eval_every, rc.config.train.device) for rc in lt.cells} == {
        (1200, 300, "cpu")}  # the calibrated budget (README "Paper tables")
    # Every cell keeps the benchmark's recipe from _base.yaml: digit-pretrained encoder, SGD, warm-up.
    assert {(rc.config.model.pretrained, rc.config.train.optimizer, rc.config.train.sup_only_steps)
            for rc in lt.cells} == {("embedded", "sgd", 300)}
    assert all(rc.cell.published is None and rc.gpu_hours == 0.0 for rc in lt.cells)
    longer = load_table("embedded", ["overrides.train.steps=500"])
    assert {rc.config.train.steps for rc in longer.cells} == {500}


def _write(tmp_path: Path, data: dict, name: str = "t.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return path


def _table1_copy(cells: slice = slice(0, 4)) -> dict:
    """table1.yaml with a few of its cells: each load validates every cell, so fewer keep the test fast."""
    data = yaml.safe_load((PAPER_DIR / "table1.yaml").read_text())
    data["cells"] = data["cells"][cells]
    return data


@pytest.mark.parametrize("edit, named", [
    (lambda d: d.update(tolerence=2.0), "tolerence"),
    (lambda d: d["cells"][3].update(rowz="x"), "rowz"),
    (lambda d: d["cells"][3]["overrides"].setdefault("s4mc", {}).update(alpha=0.3), "s4mc.alpha"),
    (lambda d: d.setdefault("overrides", {}).setdefault("train", {}).update(epochs="eighty"), "train.epochs"),
    (lambda d: d["cells"][0].update(host="meanteacher"), "host.name"),
])
def test_bad_key_fails_with_one_line_naming_it(tmp_path, edit, named):
    data = _table1_copy()
    edit(data)
    with pytest.raises(ConfigError) as err:
        load_table(_write(tmp_path, data))
    message = str(err.value)
    assert "\n" not in message and named in message


def test_tampered_split_hash_fails_naming_the_file(tmp_path):
    data = _table1_copy()
    entry = data["cells"][2]["split_files"][0]
    entry["sha256"] = "0" * 64
    with pytest.raises(ConfigError, match=re.escape(entry["path"])) as err:
        load_table(_write(tmp_path, data))
    assert "\n" not in str(err.value)


def test_changed_vendored_split_file_fails_naming_it(tmp_path):
    splits = tmp_path / "splits"
    shutil.copytree(DEFAULT_SPLITS_DIR, splits)
    victim = splits / "unimatch" / "pascal" / "366" / "labeled.txt"
    victim.write_text(victim.read_text() + "2007_000032.jpg SegmentationClass/2007_000032.png\n")
    manifest = _write(tmp_path, _table1_copy(slice(15, 18)))  # FixMatch + S4MC 92 / 183 / 366: unimatch lists
    with pytest.raises(ConfigError, match=re.escape(str(victim))):
        load_table(manifest, splits_dir=splits)


def test_split_files_must_be_the_ones_the_loader_reads(tmp_path):
    data = _table1_copy()
    data["cells"][0]["split_files"].pop(1)  # drop unlabeled.txt
    with pytest.raises(ConfigError, match="differ from the files the loader reads"):
        load_table(_write(tmp_path, data))


def test_real_run_needs_data_root_and_weights(monkeypatch, tmp_path):
    for var in ("S4MC_VOC_ROOT", "S4MC_PRETRAINED_R101"):
        monkeypatch.delenv(var, raising=False)
    manifest = _write(tmp_path, _table1_copy())
    with pytest.raises(ConfigError, match="S4MC_VOC_ROOT"):
        reproduce(manifest)
    monkeypatch.setenv("S4MC_PRETRAINED_R101", "/w/r101.pth")
    lt = load_table(manifest, data_root="/data/voc")
    assert not lt.unset and lt.cells[0].config.data.root == "/data/voc"
    assert lt.cells[0].config.model.pretrained == "/w/r101.pth"


# ---------------------------------------------------------------------------------------------- report
def _record(client, exp_id: str, parent: str, table: str, rc, seed: int, final: float, status="FINISHED"):
    """A child run as the reproduce path leaves it: identity + table tags, eval metrics per evaluation."""
    key = f"{table}-{rc.id}-t{seed:03d}"
    tags = {"s4mc.role": "trial", "trial_key": key, "mlflow.parentRunId": parent, **run_tags(table, rc, seed)}
    run = client.create_run(exp_id, tags=tags, run_name=key)
    for step, value in ((100, final - 5.0), (200, final)):  # the report takes the final value
        client.log_metric(run.info.run_id, "eval/mIoU", value, step=step)
    client.set_terminated(run.info.run_id, status=status)


def test_report_from_recorded_mlflow_runs(tmp_path, loaded, sqlite_tracking_uri):
    from mlflow import MlflowClient
    from PIL import Image

    lt = loaded["table1"]
    client = MlflowClient(sqlite_tracking_uri)
    exp_id = client.create_experiment("s4mc-paper", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp_id, tags={"s4mc.role": "sweep", "table": "table1"}).info.run_id
    cell = {(rc.cell.row, rc.cell.column): rc for rc in lt.cells}
    uni, sup, cut = cell[("UniMatch + S4MC", "366")], cell[("Supervised", "92")], cell[("CutMix-Seg", "92")]
    _record(client, exp_id, parent, "table1", uni, 0, 60.0)  # superseded by the newer run of seed 0
    for seed, value in ((0, 79.0), (1, 79.3), (2, 78.8)):
        _record(client, exp_id, parent, "table1", uni, seed, value)
    _record(client, exp_id, parent, "table1", sup, 0, 40.0)  # one seed of three: partial
    for seed, value in ((0, 70.0), (1, 70.5)):  # two seeds to pair UniMatch + S4MC with at 366
        _record(client, exp_id, parent, "table1", cell[("Supervised", "366")], seed, value)
    _record(client, exp_id, parent, "table1", cut, 0, 55.0, status="FAILED")  # not finished: missing
    _record(client, exp_id, parent, "other", uni, 1, 10.0)  # another table's run is ignored

    out = report("table1", tracking_uri=sqlite_tracking_uri, out_dir=tmp_path / "reports", echo=lambda *_: None)
    rows = {(r["row"], r["column"]): r for r in out["rows"]}
    u = rows[("UniMatch + S4MC", "366")]
    assert u["seeds_finished"] == 3 and u["mean"] == pytest.approx(79.0333333)
    assert u["std"] == pytest.approx(0.2516611, abs=1e-6)  # sample std (ddof 1) of 79.0, 79.3, 78.8
    assert u["difference"] == pytest.approx(79.0333333 - 79.09) and u["within_tolerance"] is True
    s = rows[("Supervised", "92")]
    assert (s["status"], s["std"], s["within_tolerance"]) == ("partial", None, False)  # 40.0 vs 45.77
    assert rows[("CutMix-Seg", "92")]["status"] == "missing"
    assert len(out["missing"]) == 22
    want = ("UniMatch + S4MC", "Supervised", "366")
    comp = next(c for c in out["comparisons"] if (c["a"], c["b"], c["column"]) == want)
    p = comp["paired"]  # diffs 9.0, 8.8: mean 8.9, half width t(0.975, 1) x 0.1414 / sqrt(2) = 1.2706
    assert p["n"] == 2 and p["mean"] == pytest.approx(8.9) and p["lo"] == pytest.approx(8.9 - 1.27062, abs=1e-4)
    assert p["excludes_zero"] is True
    assert comp["published"] == pytest.approx(79.09 - rows[("Supervised", "366")]["published"])

    md = out["files"]["md"].read_text()
    assert "| UniMatch + S4MC | 366 | 3/3 | 79.03 ± 0.25 | 79.09 ± 0.18 | -0.06 | yes |" in md
    assert "| Supervised | 92 | 1/3 | 40.00 (n = 1, no interval; 1/3 seeds) | 45.77 | -5.77 | **no** |" in md
    assert "| UniMatch + S4MC − Supervised | 366 | 2 | +8.90 [+7.63, +10.17] * | excludes 0 |" in md
    assert "| c05 | CutMix-Seg | 92 | 0/3 | — | 52.16 | — | — |" in md
    assert "## Missing cells (22)" in md and "- c05 CutMix-Seg | 92: no FINISHED run" in md
    csv_text = out["files"]["csv"].read_text().splitlines()
    assert len(csv_text) == 26 and csv_text[0].startswith("table,cell,row,column")
    line = next(x for x in csv_text if ",UniMatch + S4MC,366," in x)
    assert ",3,3,79.0000;79.3000;78.8000,79.03333" in line and ",complete" in line
    with Image.open(out["files"]["png"]) as img:
        img.verify()
        assert img.size[0] > 300 and img.size[1] > 200


def test_report_published_difference_table8(tmp_path, loaded, sqlite_tracking_uri):
    from mlflow import MlflowClient

    lt = loaded["table8"]
    client = MlflowClient(sqlite_tracking_uri)
    exp_id = client.create_experiment("s4mc-paper", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp_id, tags={"s4mc.role": "sweep"}).info.run_id
    for rc, value in zip(lt.cells[:2], (70.0, 71.5), strict=True):
        _record(client, exp_id, parent, "table8", rc, 0, value)
    out = report("table8", tracking_uri=sqlite_tracking_uri, out_dir=tmp_path, echo=lambda *_: None)
    refined = out["rows"][1]
    assert refined["ours_delta"] == pytest.approx(1.5) and refined["published_delta"] == 1.09
    assert refined["within_tolerance"] is True
    assert "vs UniMatch (no refinement, no DPA): ours +1.50, published +1.09" in out["files"]["md"].read_text()


# ---------------------------------------------------------------------------------------------- real run
@pytest.mark.services
def test_tiny_reproduce_on_ray_then_report(tmp_path, ray_cluster):
    """2 cells x 1 seed of an embedded table with very small budgets, on the session's Ray cluster."""
    import time

    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    manifest = _write(tmp_path, {
        "table": "tiny", "title": "tiny embedded", "source": "none", "project": str(tmp_path),
        "base": str(PAPER_DIR.parent / "embedded" / "_base.yaml"),
        # _base.yaml's digit-pretrained encoder and 300-step warm-up are off: 4 steps from scratch.
        "overrides": {"model": {"width": 0.25, "head_channels": 32, "pretrained": None},
                     "data": {"crop_size": 32, "embedded": {"image_size": 32, "num_train": 48, "num_val": 6}},
                     "train": {"steps": 4, "eval_every": 4, "log_every": 2, "device": "cpu", "sup_only_steps": 0},
                     "eval": {"batch_size": 6}},
        "seeds": [0], "resources": {"cpu": 1, "gpu": 0}, "max_concurrent": 2, "tracking": {"uri": uri},
        "cells": [{"row": "Supervised", "column": "20", "host": "supervised", "split": "20",
                   "overrides": {"s4mc": {"enabled": False}}},
                  {"row": "CutMix-Seg + S4MC", "column": "20", "host": "cutmix_seg", "split": "20",
                   "overrides": {"s4mc": {"enabled": True}}, "published": 10.0}]}, "tiny.yaml")
    t0 = time.monotonic()
    result = reproduce(manifest, echo=lambda *_: None)
    assert not result["interrupted"] and result["errors"] == [] and len(result["trials"]) == 2
    assert time.monotonic() - t0 < 120

    out = report(manifest, tracking_uri=uri, out_dir=tmp_path / "reports", echo=lambda *_: None)
    assert [r["status"] for r in out["rows"]] == ["complete", "complete"] and not out["missing"]
    assert all(0.0 <= r["mean"] <= 100.0 for r in out["rows"])
    again = reproduce(manifest, resume=True, echo=lambda *_: None)  # everything FINISHED: nothing to run
    assert again["trials"] == [] and not again["interrupted"]
    with pytest.raises(ConfigError, match="--resume"):
        reproduce(manifest, echo=lambda *_: None)
