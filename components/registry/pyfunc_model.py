"""The file MLflow logs as a genpipe generator's pyfunc model ("models from code": nothing pickled).

`registry.log_generator` passes this file's path as `python_model`; MLflow stores it beside the
`components` package (`code_paths`, in the model's `code/`) and the exported generator folder
(artifact `generator`). At load, MLflow runs this file and calls `load_context`, which rebuilds the
generator with `components.generators.load_generator` from safetensors and JSON. The request and
response tables are described in `components.registry.serving`, the limits in
`components.registry.deadline`.

Every version carries its own `components`, but a process has one `sys.modules`: the first
`import components` would win for every model loaded after it (and a process that imported its own
checkout would run that). So each model keeps its own module objects and puts them into
`sys.modules` while it loads or predicts (`OwnCode`), then puts back what was there. One model's
code is in place at a time: concurrent predicts of one model run together, another model's wait.
This file imports nothing from `components` at module level: it runs before any swap.
"""

from __future__ import annotations

import os
import sys
import threading
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

GENERATOR_ARTIFACT = "generator"  # the artifact key of the exported generator folder
PACKAGE = "components"
_OWNER = "_genpipe_code_owner"  # a process-wide record shared by every loaded genpipe model


def _owner_record() -> types.ModuleType:
    """Which model's code is in sys.modules (`owner`), how many blocks use it, what it displaced."""
    record = sys.modules.get(_OWNER)
    if record is None:
        fresh = types.ModuleType(_OWNER, "the genpipe model whose `components` is in sys.modules")
        fresh.cond, fresh.owner, fresh.count, fresh.displaced = threading.Condition(), None, 0, {}
        record = sys.modules.setdefault(_OWNER, fresh)  # atomic: one record even when racing
    return record


def _take_package() -> dict[str, types.ModuleType]:
    """Remove `components` and its submodules from sys.modules and return them."""
    names = [n for n in list(sys.modules) if n == PACKAGE or n.startswith(PACKAGE + ".")]
    return {n: sys.modules.pop(n) for n in names}


class OwnCode:
    """`with own_code():` runs a block with this model's `components` (imported from `code_dir`)."""

    def __init__(self, code_dir: str) -> None:
        self.code_dir = code_dir
        self.modules: dict[str, types.ModuleType] = {}  # filled by the first block (the load)

    @contextmanager
    def __call__(self) -> Iterator[None]:
        record = _owner_record()
        with record.cond:
            while record.owner not in (None, self):
                record.cond.wait()
            if record.owner is None:
                record.displaced = _take_package()
                sys.modules.update(self.modules)
                sys.path.insert(0, self.code_dir)  # the package's own __path__ finds the rest
                record.owner = self
            record.count += 1
        try:
            yield
        finally:
            with record.cond:
                record.count -= 1
                if record.count == 0:
                    self.modules = _take_package()  # with whatever the block imported lazily
                    sys.modules.update(record.displaced)
                    record.displaced, record.owner = {}, None
                    sys.path.remove(self.code_dir)
                    record.cond.notify_all()


class GeneratorModel(PythonModel):
    """predict(table of label, seed, options) -> table of base64 PNG images."""

    def load_context(self, context) -> None:
        code_dir = os.path.normpath(Path(__file__).parent / "code")
        while code_dir in sys.path:  # MLflow prepends it for good; this model puts it there itself
            sys.path.remove(code_dir)
        self.own_code = OwnCode(code_dir)
        with self.own_code():
            from components.registry import deadline
            from components.registry.serving import load, predict

            self.generator = load(context.artifacts[GENERATOR_ARTIFACT])
            self.deadline = deadline.Deadline(self.generator)
            self._predict, self._timeout = predict, deadline.request_timeout
            self._timeout()  # a bad GENPIPE_REQUEST_TIMEOUT stops the load, not every request
            self._errors = (deadline.RequestError, deadline.bad_request)

    # A DataFrame hint: MLflow neither validates nor infers from it (the table is checked in
    # serving.predict, the signature is given at log time) and stops asking for type hints.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        request_error, bad_request = self._errors
        with self.own_code():
            try:
                with self.deadline.limit(self._timeout()):
                    return self._predict(self.generator, model_input)
            except request_error:
                raise
            except (ValueError, TypeError) as err:  # the request's fault: HTTP 400, one line
                raise bad_request(err) from None

    def stop(self) -> None:
        """Stop every predict in flight at its next network forward (server shutdown)."""
        self.deadline.stopping.set()


mlflow.models.set_model(GeneratorModel())
