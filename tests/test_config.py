"""Config schema, overrides and the checks that must fail before any stage runs."""

from __future__ import annotations

import pytest
import yaml
from conftest import DEMO, PROMPTS, REPO

from kolora.cli.main import main
from kolora.core.config import load_config
from kolora.core.errors import ConfigError
from kolora.core.prompts import load_prompts


def test_shipped_configs_validate():
    demo = load_config(DEMO)
    assert demo.name == "demo" and demo.model.tiny
    anime = load_config(REPO / "configs" / "kolors-anime.yaml")
    t = anime.train
    assert (t.rank, t.alpha, t.lr, t.steps, t.resolution, t.precision) == (16, 4.0, 1e-4, 500, 1024, "16-mixed")
    assert t.gradient_checkpointing and t.center_crop
    assert (anime.render.cfg, anime.render.steps, anime.render.width, anime.render.height) == (4, 50, 1024, 1024)
    assert anime.filter.ops == [
        {"image_shape_filter": {"min_width": 1024, "min_height": 1024, "any_or_all": "any"}},
        {"image_aspect_ratio_filter": {"min_ratio": 0.5, "max_ratio": 2.0, "any_or_all": "any"}},
    ]
    assert (anime.grid.columns, anime.grid.rows) == (2, 4)


def test_story_prompts_are_the_tutorials():
    items = load_prompts(PROMPTS, "unused")
    assert [p.seed for p in items] == [1, 1, 2, 5, 0, 1, 7, 0]
    assert items[0].prompt.startswith("二次元,日系动漫,演唱会的观众席")
    assert items[7].prompt == "二次元,紫色长发少女,穿着黑色礼服,连衣裙,在台上唱歌"
    assert items[3].negative_prompt == "丑陋、变形、嘈杂、模糊、低对比度,扭曲的手指,多余的手指"
    assert items[1].negative_prompt.endswith(",色情擦边")


def test_set_overrides_are_validated_and_resolved(tmp_path):
    cfg = load_config(DEMO, ["train.steps=200", "grid.captions=prompt", "model.path=rel/models"])
    assert cfg.train.steps == 200 and cfg.grid.captions == "prompt"
    assert cfg.model.path.is_absolute()
    with pytest.raises(ConfigError, match=r"train\.steps.*integer"):
        load_config(DEMO, ["train.steps=lots"])
    with pytest.raises(ConfigError, match=r"train\.stepz: unknown field"):
        load_config(DEMO, ["train.stepz=3"])
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(DEMO, ["train.steps"])


def test_paths_in_a_file_resolve_against_the_file(tmp_path):
    cfg = load_config(DEMO)
    assert cfg.render.prompts == PROMPTS


def _write(tmp_path, mutate) -> str:
    raw = yaml.safe_load(DEMO.read_text())
    raw["render"]["prompts"] = str(PROMPTS)
    raw["model"]["path"] = str(tmp_path / "model-to-build")
    mutate(raw)
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(raw, allow_unicode=True))
    return str(p)


@pytest.mark.parametrize("mutate, field, fix", [
    (lambda r: r["train"].update(rank="sixteen"), "train.rank", "integer"),
    (lambda r: r["train"].update(precision="fp8"), "train.precision", "'16-mixed', 'bf16-mixed', '32'"),
    (lambda r: r["filter"].update(ops=[{"image_shape_filterr": {}}]), "filter.ops[0]", "image_shape_filter"),
    (lambda r: r["render"].update(prompts="/nonexistent/prompts.yaml"), "render.prompts",
     "configs/prompts/anime-story.yaml"),
    (lambda r: r["model"].update(path="/nonexistent/kolors", tiny=False), "model.path", "Download Kolors"),
    (lambda r: r["data"].update(source="jsonl", path="/nonexistent/metadata.jsonl"), "data.path", "fix the path"),
    (lambda r: r["grid"].update(rows=2), "grid", "raise grid.rows"),
])
def test_bad_config_fails_before_any_stage(tmp_path, capsys, mutate, field, fix):
    cfg = _write(tmp_path, mutate)
    runs = tmp_path / "runs"
    rc = main(["run", cfg, "--runs-dir", str(runs)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert field in err and fix in err, err
    assert not runs.exists(), "a stage ran (or the run dir was created) although the config was invalid"


def test_validate_command(capsys, tmp_path):
    assert main(["validate", str(DEMO), "--set", f"model.path={tmp_path / 'm'}"]) == 0
    assert "OK" in capsys.readouterr().out
