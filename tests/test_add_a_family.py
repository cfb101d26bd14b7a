"""docs/generators.md's "Add a family", kept true: a family is one component module plus catalog rows.

A copy of the `components` package gets one new file (a tiny family with its ZooFamily recipe) and
its rows in catalog.py, and nothing else. A subprocess that imports that copy validates the new
`train_zoo.tiny` params section, runs the real `train_zoo` stage's --dry-run on prepared data, trains
the recipe's task with the real loop, exports it with the recipe's export, judges it, logs and
registers it in a real MLflow store and samples it back through the registry's pyfunc model (which
runs the logged copy's code). A DVC run also needs its params.yaml section and dvc.yaml `foreach`
key, which tests/test_catalog.py checks against the rows.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FAMILY = '''
"""A tiny family: images are a learned mean image plus tempered Gaussian noise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from components.schema import StrictConfig
from components.training.config import LoopConfig
from components.training.task import Task
from components.zoo.common import ZooGenerator, export_zoo, load_zoo
from components.zoo.families import TemperatureSamplingConfig, ZooFamily

FAMILY = "tiny"


class TinyConfig(StrictConfig):
    noise: float = 0.1


class TinyNet(nn.Module):
    def __init__(self, cfg: TinyConfig, *, image_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        self.cfg, self.image_shape, self.num_classes = cfg, tuple(image_shape), num_classes
        self.mean = nn.Parameter(torch.zeros(num_classes or 1, *image_shape))


class TinyTask(Task):
    ema_module = "net"

    def __init__(self, cfg: TinyConfig, loop: LoopConfig, *, image_shape, num_classes: int) -> None:
        super().__init__()
        self.cfg, self.loop, self.image_shape, self.num_classes = cfg, loop, image_shape, num_classes

    def build(self, *, device, wrap) -> None:
        self.modules = {"net": TinyNet(self.cfg, image_shape=self.image_shape, num_classes=self.num_classes).to(device)}
        self.wrapped = {k: wrap(m) for k, m in self.modules.items()}

    def optimizers(self):
        return {"main": torch.optim.Adam(self.modules["net"].parameters(), lr=self.loop.lr)}

    def step(self, phase, batch, *, step):
        mean = self.wrapped["net"].mean[batch["label"].clamp(min=0)]
        loss = (mean - batch["image"]).pow(2).mean()
        return loss, {"mse": loss.detach()}


class TinyGenerator(ZooGenerator):
    option = "temperature"

    def draw(self, y, *, n: int, generator: torch.Generator, temperature: float) -> torch.Tensor:
        rows = y if y is not None else torch.zeros(n, dtype=torch.long, device=self.device)
        noise = torch.randn((n, *self.image_shape), generator=generator, device=generator.device)
        return (self.net.mean[rows] + self.net.cfg.noise * temperature * noise.to(self.device)).clamp(-1, 1)


def export(path: str | Path, *, temperature: float = 1.0, **model: Any) -> None:
    export_zoo(path, family=FAMILY, sampling={"temperature": temperature}, **model)


def load(model_dir: str | Path, *, device: torch.device) -> TinyGenerator:
    return load_zoo(model_dir, device=device, config_cls=TinyConfig, network=TinyNet, generator_cls=TinyGenerator)


class TinyVariantConfig(StrictConfig):
    """`train_zoo.tiny`: the params section train_zoo reads for this family."""

    model: TinyConfig = TinyConfig()
    sampling: TemperatureSamplingConfig = TemperatureSamplingConfig()
    loop: LoopConfig


RECIPE = ZooFamily(TinyVariantConfig, TinyTask, export, lambda m: {"noise": m.noise})
'''

ROWS = """
MODELS = (*MODELS, ModelSpec("tiny", "tiny", "tiny (test)", stage="train_zoo", variant="tiny", code="components/zoo",
                             recipe="components.zoo.tiny:RECIPE"))
GENERATORS = tuple(m for m in MODELS if m.generator)
LOADERS["tiny"] = "components.zoo.tiny"
"""

SCRIPT = """
import json, sys, torch
from pathlib import Path
import mlflow.pyfunc, pandas as pd
from mlflow import MlflowClient

import components
from components import catalog
from components.evaluation.evaluator import Evaluator, EvaluatorConfig
from components.evaluation.judge import judge
from components.evaluation.reference import compute_reference
from components.generators import load_generator
from components.registry.registry import log_generator, register_version
from components.registry.serving import decode_images
from components.training.loop import train

out, uri, repo = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])

# The stage's params section gains `train_zoo.tiny` from the row alone; the real stage reads it,
# builds the task through the recipe and checks it on prepared data (--dry-run: no Ray).
import yaml
from components.config import ParamsError, validate_section
from components.data.build import build_dataset
from components.data.config import PrepareConfig
from pipelines import train_zoo
params = yaml.safe_load((repo / "params.yaml").read_text())
params["train_zoo"]["tiny"] = {"model": {"noise": 0.05}, "loop": {"steps": 60, "batch_size": 12, "lr": 0.1, "log_every": 30}}
(out / "params.yaml").write_text(yaml.safe_dump(params))
build_dataset(PrepareConfig.model_validate(params["prepare"]), out / "data" / "processed", log=lambda *a: None)
train_zoo.main(params=out / "params.yaml", variant="tiny", dry_run=True)
section = validate_section("train_zoo", params["train_zoo"])
try:
    validate_section("train_zoo", {**params["train_zoo"], "tiny": {"loop": {"steps": 0}}})
    bad = None
except ParamsError as err:
    bad = str(err)
tags = train_zoo.tags("tiny", section.tiny)

torch.manual_seed(0)
shape, k = (1, 8, 8), 3
images = torch.stack([torch.full(shape, -0.5 + 0.5 * c) for c in range(k)]).repeat(20, 1, 1, 1)
labels = torch.arange(k).repeat(20)

def batches(epoch):
    for i in range(0, len(images), 12):
        yield {"image": images[i : i + 12], "label": labels[i : i + 12]}

spec = catalog.model("tiny")
family, cfg = catalog.recipe(spec), section.tiny
task = family.task(cfg.model, cfg.loop, image_shape=shape, num_classes=k)
metrics = train(task, loop=cfg.loop, batches=batches, device=torch.device("cpu"), progress=False)
family.export(out / spec.folder, state=task.modules["net"].state_dict(), config=cfg.model,
              image_shape=shape, num_classes=k, **cfg.sampling.model_dump())
generator = load_generator(out / spec.folder)
evaluator = Evaluator(EvaluatorConfig(widths=(8,), feature_dim=8), in_channels=1, num_classes=k).eval()
reference = compute_reference(evaluator, train=images, test=images)
result = judge(generator, evaluator=evaluator, test_images=images, test_stats=reference.test,
               floor=reference.floor, n=30, seed=0, batch_size=10)
client = MlflowClient(tracking_uri=uri)
run_id = client.create_run(client.create_experiment("tiny")).info.run_id
logged = log_generator(tracking_uri=uri, run_id=run_id, model_dir=out / spec.folder)
version = register_version(tracking_uri=uri, name=spec.registered, run_id=run_id, tags={}, model_id=logged.model_id)
mlflow.set_tracking_uri(uri)
model = mlflow.pyfunc.load_model(f"models:/{spec.registered}/{version}")
served = decode_images(model.predict(pd.DataFrame({"label": [2, 0], "seed": [1, 1]}))["image"])
print(json.dumps({
    "components": components.__file__, "tags": tags, "bad_params": bad, "mse": metrics.get("main/mse", metrics.get("mse")),
    "judge": {k2: float(v) for k2, v in result.metrics.items() if isinstance(v, (int, float))},
    "registered": spec.registered, "version": version,
    "served_means": [float(x.mean()) for x in served],
}))
"""


def test_a_new_family_is_one_module_plus_catalog_rows(tmp_path):
    package = shutil.copytree(
        REPO / "components", tmp_path / "pkg" / "components", ignore=shutil.ignore_patterns("__pycache__")
    )
    (package / "zoo" / "tiny.py").write_text(textwrap.dedent(FAMILY))
    with (package / "catalog.py").open("a") as catalog:
        catalog.write(ROWS)
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {  # the copy's components first; pipelines/ from the checkout, unchanged
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path / "pkg"), str(REPO)]),
        "GENPIPE_ROOT": str(tmp_path),
        "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
    }
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path), f"sqlite:///{tmp_path / 'mlflow.db'}", str(REPO)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["components"].startswith(str(tmp_path))  # the copy, with the new module, ran
    # the real stage's --dry-run printed the section it read
    assert "train_zoo:\n  model:\n    noise: 0.05" in proc.stdout
    assert out["registered"] == "genpipe-tiny" and out["version"] == "1"
    assert out["tags"] == {"family": "tiny", "noise": "0.05", "temperature": "1.0"}  # the recipe's knobs
    assert out["bad_params"].startswith("train_zoo.tiny.loop.steps=0"), out["bad_params"]
    judged = out["judge"]
    assert judged["cond_accuracy"] >= 0 and judged["fid"] >= 0 and judged["images_per_s"] > 0
    label_2, label_0 = out["served_means"]  # learned class means: -0.5 (0) and 0.5 (2), in uint8
    assert label_2 > 160 and label_0 < 100, out["served_means"]
