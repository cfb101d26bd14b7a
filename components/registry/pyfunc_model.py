"""The file MLflow logs as a genpipe generator's pyfunc model ("models from code": nothing pickled).

`registry.log_generator` passes this file's path as `python_model`; MLflow stores it beside the
`components` package (`code_paths`) and the exported generator folder (artifact `generator`). At
load, MLflow puts that code first on `sys.path`, runs this file, and calls `load_context`, which
rebuilds the generator with `components.generators.load_generator` from safetensors and JSON.
The request and response tables are described in `components.registry.serving`.
"""

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

GENERATOR_ARTIFACT = "generator"  # the artifact key of the exported generator folder


class GeneratorModel(PythonModel):
    """predict(table of label, seed, options) -> table of base64 PNG images."""

    def load_context(self, context) -> None:
        from components.registry.serving import load

        self.generator = load(context.artifacts[GENERATOR_ARTIFACT])

    # A DataFrame hint: MLflow neither validates nor infers from it (the table is checked in
    # serving.predict, the signature is given at log time) and stops asking for type hints.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from components.registry.serving import predict

        return predict(self.generator, model_input)


mlflow.models.set_model(GeneratorModel())
