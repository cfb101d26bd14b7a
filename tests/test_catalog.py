"""dvc.yaml against the catalog: every stage, command, input, output and `foreach` list, read by DVC itself."""

from __future__ import annotations

from pathlib import Path

import pytest
from dvc.repo import Repo

from components import catalog
from components.catalog import GENERATORS, MODELS, STAGES

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dvc_stages() -> dict[str, object]:
    """{addressing (`train_zoo@vae`): DVC's stage} for every stage dvc.yaml expands to."""
    with Repo(str(REPO)) as repo:
        return {stage.addressing: stage for stage in repo.index.stages}


def _deps(stage) -> set[str]:
    return {d.def_path for d in stage.deps if d.def_path != "params.yaml"}


def _outs(stage) -> set[str]:
    return {o.def_path for o in stage.outs}


def _covered(path: str, deps: set[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def test_dvc_yaml_has_exactly_the_catalogs_stages_and_commands(dvc_stages):
    expected = {}
    for spec in STAGES:
        if spec.name == "promote":
            expected[spec.name] = f"genpipe promote {' '.join(m.name for m in GENERATORS)}"
        elif spec.arg:
            expected |= {f"{spec.name}@{v}": f"genpipe {spec.name} {v}" for v in spec.variants}
        else:
            expected[spec.name] = f"genpipe {spec.name}"
    assert {k: s.cmd for k, s in dvc_stages.items()} == expected


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.name)
def test_each_training_stage_reads_its_inputs_and_writes_its_model(dvc_stages, model):
    stage = dvc_stages[model.command]
    deps, outs = _deps(stage), _outs(stage)
    assert model.folder in outs and f"reports/train_{model.name}.json" in outs
    missing = [p for p in (model.data, *model.inputs, f"pipelines/{model.stage}.py") if p not in deps]
    if model.code is not None:
        missing += [] if _covered(f"{model.code}/generator.py", deps) or model.code in deps else [model.code]
    assert not missing, f"{model.command} lacks the dependencies {missing}"
    assert {p.def_path for p in stage.deps if p.def_path == "params.yaml"}, "no params tracked"


@pytest.mark.parametrize("model", GENERATORS, ids=lambda m: m.name)
def test_each_generator_is_judged_on_its_own_code(dvc_stages, model):
    stage = dvc_stages[f"evaluate@{model.name}"]
    deps = _deps(stage)
    needed = [model.folder, "models/evaluator", catalog.IMAGES, model.code, "pipelines/evaluate.py"]
    assert not [p for p in needed if not _covered(p, deps)], deps
    assert _outs(stage) == {f"reports/evaluate/{model.name}.json", f"reports/evaluate/{model.name}.png"}


def test_report_and_promote_read_every_generators_evaluation(dvc_stages):
    evaluations = {f"reports/evaluate/{m.name}.json" for m in GENERATORS}
    trainings = {f"reports/train_{m.name}.json" for m in GENERATORS}
    assert evaluations | trainings <= _deps(dvc_stages["report"])
    assert evaluations <= _deps(dvc_stages["promote"])
    assert "reports/promote.json" in _outs(dvc_stages["promote"])


def test_every_stage_module_exists_and_names_are_unique():
    for spec in STAGES:
        assert (REPO / "pipelines" / f"{spec.name}.py").is_file(), spec.module
    for field in ("name", "registered", "folder"):
        values = [getattr(m, field) for m in MODELS]
        assert len(values) == len(set(values)), f"duplicate model {field}s: {values}"
    assert len({s.name for s in STAGES}) == len(STAGES)


def test_lookups_name_the_valid_choices():
    assert catalog.model("vae").registered == "genpipe-vae"
    assert catalog.trained_by("train_diffusion", "latent").name == "diffusion_latent"
    with pytest.raises(
        ValueError, match=r"unknown train_zoo variant 'gann'; valid: vae, gan, wgan, flow, pixelcnn"
    ):
        catalog.trained_by("train_zoo", "gann")
    with pytest.raises(ValueError, match=r"unknown stage 'trian'; valid: prepare, "):
        catalog.stage("trian")


def test_repro_headlines_find_each_models_report_through_the_catalog(tmp_path):
    from pipelines.repro import headline

    reports = tmp_path / "reports"
    (reports / "evaluate").mkdir(parents=True)
    for model in GENERATORS:
        (reports / f"train_{model.name}.json").write_text(f'{{"val/loss": {len(model.name)}}}')
        assert headline(model.command, tmp_path) == f"val loss {len(model.name)}", model.command
    (reports / "evaluate" / "gan.json").write_text('{"fid_over_floor": 4.5, "cond_accuracy": 0.9}')
    assert headline("evaluate@gan", tmp_path) == "FD 4.50x floor, cond. acc 90.0%"
    assert headline("train_zoo@gann", tmp_path) == "" and headline("nothing", tmp_path) == ""
