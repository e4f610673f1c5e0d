"""`kolora sweep` in process: the product of --vary values as normal run folders, ingest/filter/cache run once
(the second variant adopts them: cache encoded=0), a self-contained sweep.html + sweep.png that ranks the
variants, and `kolora status` per sweep and per variant."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import DEMO as DEMO_PATH
from drawn_figures import error_bars, flat
from test_launch import LOCAL, fake_slurm, sbatch_scripts  # noqa: F401 - fake_slurm is a fixture

from kolora.core.errors import ConfigError
from kolora.pipeline.registry import NAMES
from kolora.sweep.plan import parse_vary, plan, variant_names
from kolora.sweep.ranking import RunScore, rank

DEMO = str(DEMO_PATH)
FAST = ["--set", "train.steps=6", "--set", "train.checkpoint_every=3", "--set", "render.steps=2"]


def test_vary_is_the_cartesian_product_in_order():
    vary = parse_vary(["train.lr=1e-4,3e-4", "train.rank=8,16"])
    assert vary == {"train.lr": ["1e-4", "3e-4"], "train.rank": [8, 16]}  # YAML scalars, like --set
    names = [n for n, _ in variant_names(vary)]
    assert names == ["lr-1e-4_rank-8", "lr-1e-4_rank-16", "lr-3e-4_rank-8", "lr-3e-4_rank-16"]
    # two varied fields with the same last part are named by their whole path
    assert [n for n, _ in variant_names({"seed": [1], "train.seed": [2]})] == ["seed-1_train-seed-2"]
    assert parse_vary(["train.target_modules=[[to_q], [to_k, to_v]]"]) == {
        "train.target_modules": [["to_q"], ["to_k", "to_v"]]}


@pytest.mark.parametrize("items, message", [
    (["train.lr"], "expected FIELD=V1,V2"),
    (["train.lr=1e-3,1e-3"], "repeated"),
    (["train.lr=1e-3", "train.lr=2e-3"], "varied twice"),
    ([], "at least one --vary"),
])
def test_bad_vary_names_the_argument(items, message):
    with pytest.raises(ConfigError, match=message):
        parse_vary(items)


def test_unknown_field_or_bad_value_names_the_variant(tmp_path, tiny_diffusers):
    base = ["model.path=" + str(tiny_diffusers)]
    with pytest.raises(ConfigError, match="no config field train.learning_rate"):
        plan(DEMO, ["train.learning_rate=1,2"], tmp_path, overrides=base)
    with pytest.raises(ConfigError, match=r"variant rank-0 \(train.rank=0\)"):
        plan(DEMO, ["train.rank=4,0"], tmp_path, overrides=base)


def test_ranking_contract():
    def s(name, aesthetic=None, clip=None, loss=None):
        return RunScore(name, Path(name), aesthetic=aesthetic, clip=clip, final_loss=loss, step=1 if loss else None)

    # not given in the expected order: the tie on the aesthetic score must be resolved by CLIP, not by position
    ranked = rank([s("none"), s("loss-high", loss=0.9), s("scored-low", 4.0, 0.30, 0.1), s("loss-low", loss=0.2),
                   s("scored-tie", 5.0, 0.28, 0.05), s("scored-tie-better-clip", 5.0, 0.31, 0.5)])
    assert [r.name for r in ranked] == ["scored-tie-better-clip", "scored-tie", "scored-low", "loss-low",
                                        "loss-high", "none"]


def _write_tile_scores(run: Path, aesthetic: list[float], clip: list[float]) -> None:
    """eval/scores.json as the evaluate stage writes it for these LoRA tile scores (base: 4.0 and 0.2)."""
    from kolora.evaluate.stage import intervals

    tiles = [{"index": i, "prompt": "p", "seed": i, "clip": {"lora": c, "base": 0.2}, "aesthetic": {"lora": a, "base": 4.0}}
             for i, (a, c) in enumerate(zip(aesthetic, clip, strict=True))]
    summary = {m: {w: sum(t[m][w] for t in tiles) / len(tiles) for w in ("lora", "base")} for m in ("clip", "aesthetic")}
    (run / "eval").mkdir(parents=True, exist_ok=True)
    (run / "eval" / "scores.json").write_text(json.dumps({"models": {}, "tiles": tiles, "summary": summary,
                                                          "intervals": intervals(tiles)}))


def test_the_sheet_says_when_the_best_is_not_distinguishable_from_the_runner_up(tmp_path):
    from kolora.sweep import sheet
    from kolora.sweep.ranking import indistinct_runner_up

    sweep = tmp_path / "s"
    names = ["worst", "close", "first"]  # the manifest's order is not the ranking's
    (sweep).mkdir()
    (sweep / "sweep.json").write_text(json.dumps({"name": "s", "config": "demo.yaml", "vary": {"train.lr": [1, 2, 3]},
                                                  "variants": [{"name": n, "overrides": {}} for n in names]}))
    clip = [0.3, 0.31, 0.29, 0.3]
    _write_tile_scores(sweep / "first", [5.0, 5.6, 5.2, 5.4], clip)  # mean 5.3
    _write_tile_scores(sweep / "close", [4.9, 5.5, 5.1, 5.3], clip)  # mean 5.2: the intervals overlap
    _write_tile_scores(sweep / "worst", [4.0, 4.01, 3.99, 4.0], clip)
    manifest, ranked = sheet.collect(sweep)
    assert [r.name for r in ranked] == ["first", "close", "worst"]
    first = ranked[0].intervals["aesthetic"]
    assert first.mean == pytest.approx(5.3) and first.low < 5.3 < first.high and first.n == 4
    assert ranked[0].intervals["aesthetic"].overlaps(ranked[1].intervals["aesthetic"])
    assert indistinct_runner_up(ranked).name == "close"
    page = sheet.write(sweep)[0].read_text()
    assert "not distinguishable from close" in page and "Best:" not in page
    cell = re.search(r'<tbody><tr><td>1</td><td>first</td><td></td><td>([^<]+)</td>', page).group(1)
    assert cell == f"5.3 [{first.low:.4g}, {first.high:.4g}]"
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', page)) == 2  # the loss curves, the scores
    assert 'id="scores"' in page
    from kolora.launch.sweep_status import format_status, status

    text = format_status(status(sweep))
    assert "best so far (by scores): first: aesthetic 5.3 [" in text
    assert "not distinguishable from close (their 95 % intervals overlap)" in text

    _write_tile_scores(sweep / "close", [4.5, 4.6, 4.4, 4.5], clip)  # now clearly behind
    assert indistinct_runner_up(sheet.collect(sweep)[1]) is None
    page = sheet.write(sweep)[0].read_text()
    assert "<p class=best>Best: <b>first</b>" in page and "not distinguishable" not in page
    assert "not distinguishable" not in format_status(status(sweep))

    # an exact tie on the aesthetic score: CLIP ordered them, so CLIP's intervals decide
    _write_tile_scores(sweep / "close", [5.0, 5.6, 5.2, 5.4], [0.1, 0.11, 0.09, 0.1])
    ranked = sheet.collect(sweep)[1]
    assert [r.name for r in ranked][:2] == ["first", "close"] and indistinct_runner_up(ranked) is None
    _write_tile_scores(sweep / "close", [5.0, 5.6, 5.2, 5.4], [0.29, 0.30, 0.28, 0.29])
    assert indistinct_runner_up(sheet.collect(sweep)[1]).name == "close"


def test_sweep_png_draws_each_variants_scores_with_their_intervals_and_marks_the_indistinct(tmp_path):
    from matplotlib import pyplot as plt

    from kolora.core.stats import mean_interval
    from kolora.sweep import sheet
    from kolora.sweep.ranking import lora_intervals, read_scores

    sweep = tmp_path / "s"
    sweep.mkdir()
    manifest = {"name": "s", "config": "demo.yaml", "vary": {"train.lr": [1, 2, 3]},
                "variants": [{"name": n, "overrides": {}} for n in ("worst", "close", "first")]}
    (sweep / "sweep.json").write_text(json.dumps(manifest))
    clip = [0.3, 0.31, 0.29, 0.3]
    # skewed scores: intervals not symmetric about their means
    _write_tile_scores(sweep / "first", [5.0, 5.1, 5.2, 5.9], clip)
    _write_tile_scores(sweep / "close", [4.9, 5.0, 5.1, 5.8], clip)  # its interval overlaps first's
    _write_tile_scores(sweep / "worst", [4.0, 4.01, 3.99, 4.0], [0.2, 0.22, 0.21, 0.2])

    def drawn():
        ranked = sheet.collect(sweep)[1]
        fig = sheet.summary_figure(ranked, {}, manifest)
        bars = error_bars(fig)
        ticks = {t.get_text() for ax in fig.axes for t in ax.get_xticklabels()}
        titles = [ax.get_title() for ax in fig.axes] + [fig.get_suptitle()]
        plt.close(fig)
        return bars, ticks, titles

    bars, ticks, titles = drawn()
    # every variant's LoRA mean per scorer, its bar from eval/scores.json's interval
    expected = {(metric, name): (iv.mean, iv.low, iv.high) for name in ("first", "close", "worst")
                for metric, iv in lora_intervals(read_scores(sweep / name)).items()}
    assert len(expected) == 6
    assert flat({(title.split()[0], name): bar for (title, name), bar in bars.items()}) == pytest.approx(flat(expected))
    # the runner-up not distinguishable from the best is marked, in the bars' labels and its thumbnail's title
    assert {"first", f"close\n{sheet.NOT_DISTINGUISHABLE}", "worst"} <= ticks
    assert any("close" in t and "not distinguishable from #1" in t for t in titles)
    assert "not distinguishable from close" in titles[-1]

    _write_tile_scores(sweep / "close", [4.4, 4.4, 4.5, 4.8], clip)  # now clearly behind: nothing marked
    bars, ticks, titles = drawn()
    close = mean_interval([4.4, 4.4, 4.5, 4.8])  # as the evaluate stage computes it
    assert bars[("aesthetic (LoRA), 95 % intervals", "close")] == pytest.approx((close.mean, close.low, close.high))
    assert not any(sheet.NOT_DISTINGUISHABLE in t for t in ticks | set(titles))

    for name in ("first", "close", "worst"):  # eval/scores.json older than the intervals: no bars, a PNG still
        _write_scores(sweep / name, aesthetic=5.0, clip=0.3)
    bars, ticks, titles = drawn()
    assert bars == {} and not {"first", "close", "worst"} & ticks  # no score panels
    assert sheet.write(sweep)[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _write_scores(run: Path, aesthetic: float, clip: float) -> None:
    (run / "eval").mkdir(exist_ok=True)
    (run / "eval" / "scores.json").write_text(json.dumps({
        "models": {"clip": "tiny", "aesthetic": "tiny"}, "tiles": [],
        "summary": {"clip": {"lora": clip, "base": 0.2}, "aesthetic": {"lora": aesthetic, "base": 4.0}}}))


def test_sweep_in_process_shares_the_cache_and_compares_the_variants(tmp_path, tiny_diffusers, capsys):
    from kolora.cli.main import main

    runs = tmp_path / "runs"
    rc = main(["sweep", DEMO, "--runs-dir", str(runs), "--set", f"model.path={tiny_diffusers}", *FAST,
               "--vary", "train.lr=1e-3,3e-3"])
    out = capsys.readouterr()
    assert rc == 0, out.err[-3000:]
    sweep = runs / "demo-sweep"
    manifest = json.loads((sweep / "sweep.json").read_text())
    assert [(v["name"], v["overrides"]) for v in manifest["variants"]] == [
        ("lr-1e-3", {"train.lr": 0.001}), ("lr-3e-3", {"train.lr": 0.003})]
    first, second = sweep / "lr-1e-3", sweep / "lr-3e-3"
    for run in (first, second):  # two complete, normal runs
        assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file() and (run / "grid.png").is_file()
        assert json.loads((run / "manifest.json").read_text())["name"] == run.name
    assert (first / "lora" / "pytorch_lora_weights.safetensors").read_bytes() != \
        (second / "lora" / "pytorch_lora_weights.safetensors").read_bytes()

    # ingest/filter/cache ran once: the second variant's are hard links to the first's, nothing encoded twice
    cache = [json.loads((r / "manifest.json").read_text())["stages"]["cache"]["summary"] for r in (first, second)]
    assert cache[0]["encoded"] > 0 and cache[1]["encoded"] == 0
    assert cache[1]["reused"] == cache[0]["encoded"] + cache[0]["reused"]
    meta = Path("trainset/train/metadata.csv")
    assert (first / meta).stat().st_ino == (second / meta).stat().st_ino
    assert json.loads((second / "cache" / "index.json").read_text())["store"] == str(sweep / "cache")

    # the sheet: both variants, images embedded, nothing fetched from elsewhere
    page = (sweep / "sweep.html").read_text()
    assert "lr-1e-3" in page and "lr-3e-3" in page
    # loss curves, the scores with their intervals (the demo evaluates), 2 grids
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', page)) == 4
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert (sweep / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # status of the sweep: each variant, and the best by the demo's scores (it evaluates), else by final loss
    assert main(["status", "demo-sweep", "--runs-dir", str(runs)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"lr-1e-3 +train.lr=0.001 +complete .*cache encoded [1-9]", text), text
    assert re.search(r"lr-3e-3 +train.lr=0.003 +complete .*cache encoded 0, reused", text), text
    scored = {r.name: json.loads((r / "eval" / "scores.json").read_text())["summary"] for r in (first, second)}
    best = max(scored, key=lambda n: (scored[n]["aesthetic"]["lora"], scored[n]["clip"]["lora"]))
    assert f"best so far (by scores): {best}:" in text
    # the runner-up is named when the two aesthetic intervals overlap (no clear best), and only then
    lora = {n: json.loads((sweep / n / "eval" / "scores.json").read_text())["intervals"]["lora"]["aesthetic"]
            for n in scored}
    a, b = lora.values()
    overlap = a["low"] <= b["high"] and b["low"] <= a["high"]
    other = next(n for n in scored if n != best)
    assert (f"not distinguishable from {other} (their 95 % intervals overlap)" in text) == overlap, text
    for r in (first, second):  # without scores
        (r / "eval").rename(r / "eval.kept")
    assert main(["status", "demo-sweep", "--runs-dir", str(runs)]) == 0
    losses = {r.name: json.loads((r / "manifest.json").read_text())["stages"]["train"]["summary"]["last_loss"]
              for r in (first, second)}
    assert f"best so far (by final training loss (no scores yet)): {min(losses, key=losses.get)}:" in \
        capsys.readouterr().out
    for r in (first, second):
        (r / "eval.kept").rename(r / "eval")

    # scores (the evaluate stage's eval/scores.json) rank before losses: the scored variant is best
    worst = max(losses, key=losses.get)
    _write_scores(sweep / worst, aesthetic=5.5, clip=0.3)
    from kolora.sweep.plan import write_sheet

    write_sheet(sweep)
    assert main(["status", "demo-sweep", "--runs-dir", str(runs)]) == 0
    assert f"best so far (by scores): {worst}: aesthetic 5.5, clip 0.3" in capsys.readouterr().out
    first_row = re.search(r'<tbody><tr><td>1</td><td>([^<]+)</td>', (sweep / "sweep.html").read_text())
    assert first_row and first_row.group(1) == worst

    # every variant is a normal run: status and export work on it
    assert main(["status", str(second)]) == 0
    assert "cache encoded 0, reused" in capsys.readouterr().out
    assert main(["export", str(second), "--format", "kohya", "--to", str(tmp_path / "k.safetensors")]) == 0
    assert (tmp_path / "k.safetensors").is_file()

    # a second sweep of the same config does nothing again
    assert main(["sweep", DEMO, "--runs-dir", str(runs), "--set", f"model.path={tiny_diffusers}", *FAST,
                 "--vary", "train.lr=1e-3,3e-3"]) == 0
    assert capsys.readouterr().err.count("complete, skipped") == 2 * len(NAMES)


def test_sweep_submission_is_one_graph_with_a_train_array(tmp_path, tiny_diffusers, fake_slurm, capsys):  # noqa: F811
    """The Slurm graph, against a fake sbatch (the dev-cluster run is tests/test_sweep_slurm.py)."""
    from kolora.cli.main import main

    runs = tmp_path / "runs"
    assert main(["sweep", DEMO, "--cluster", LOCAL, "--runs-dir", str(runs), "--name", "g",
                 "--set", f"model.path={tiny_diffusers}", "--vary", "train.lr=1e-3,3e-3",
                 "--vary", "train.rank=4,8"]) == 0
    assert "train array 1003 (4 tasks, at most 2 at once)" in capsys.readouterr().out
    scripts = sbatch_scripts(fake_slurm)
    assert sorted(scripts) == [1001, 1002, 1003, 1004]  # prep, cache, train array, sheet
    assert "--dependency" not in scripts[1001] and "#SBATCH --partition=cpu\n" in scripts[1001]
    assert "#SBATCH --dependency=afterok:1001\n" in scripts[1002] and "#SBATCH --gres=gpu:1\n" in scripts[1002]
    # a task per variant, at most jobs.render.array_throttle at once, time for training + rendering
    assert "#SBATCH --array=0-3%2\n" in scripts[1003] and "#SBATCH --dependency=afterok:1002\n" in scripts[1003]
    assert "#SBATCH --time=60\n" in scripts[1003] and "#SBATCH --gres=gpu:1\n" in scripts[1003]
    assert "#SBATCH --dependency=afterany:1003\n" in scripts[1004]  # the sheet, also when a variant failed
    assert all("#SBATCH --requeue\n" in s for s in scripts.values())

    sweep = json.loads((runs / "g" / "sweep.json").read_text())
    names = [v["name"] for v in sweep["variants"]]
    assert names == ["lr-1e-3_rank-4", "lr-1e-3_rank-8", "lr-3e-3_rank-4", "lr-3e-3_rank-8"]
    assert sweep["slurm"]["task_ids"] == {n: f"1003_{i}" for i, n in enumerate(names)}
    for i, name in enumerate(names):  # each variant records the jobs that run its stages, like `kolora submit`
        slurm = json.loads((runs / "g" / name / "manifest.json").read_text())["slurm"]
        sub = slurm["submissions"][slurm["latest"]]
        assert slurm["jobs"] == ({"filter": "1001"} if i == 0 else {}) | {
            "train": f"1003_{i}", "render": f"1003_{i}", "grid": f"1003_{i}"}
        from kolora.core.config import load_config

        cfg = load_config(sub["config_file"])
        assert (cfg.name, cfg.train.rank, cfg.cache.dir) == (name, [4, 8][i % 2], runs / "g" / "cache")

    (fake_slurm / "sacct.txt").write_text(
        "1001|COMPLETED|cpu|0:0|||||\n1002|COMPLETED|gpu|0:0|||||\n1003_0|RUNNING|gpu|0:0|||||\n"
        "1003_1|RUNNING|gpu|0:0|||||\n1003_[2-3%2]|PENDING|gpu|0:0|||||\n1004|PENDING|cpu|0:0|||||\n")
    assert main(["status", "g", "--runs-dir", str(runs)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"train +1003_\[0-3\]%2 +RUNNING 2/4, PENDING 2/4", out), out
    assert re.search(r"lr-1e-3_rank-8 +train.lr=0.001, train.rank=8 +RUNNING", out), out
    assert re.search(r"lr-3e-3_rank-4 +train.lr=0.003, train.rank=4 +PENDING", out), out

    # cancelling one variant cancels its own array task, not the others'; cancelling the sweep, all of it
    (fake_slurm / "squeue.txt").write_text("1003_1|RUNNING|gpu|None\n")
    assert main(["cancel", "g/lr-1e-3_rank-8", "--runs-dir", str(runs)]) == 0
    assert (fake_slurm / "scancel.log").read_text().split() == ["1003_1"]
    (fake_slurm / "squeue.txt").write_text("1003_2|PENDING|gpu|None\n1004|PENDING|cpu|Dependency\n")
    assert main(["cancel", "g", "--runs-dir", str(runs)]) == 0
    assert (fake_slurm / "scancel.log").read_text().split()[1:] == ["1003", "1004"]
