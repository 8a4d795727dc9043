"""The file MLflow loads the E2Rank pyfunc from (models from code: no pickled Python object in the model)."""

import mlflow.models

from trainer.mlflow_model import E2RankPyfunc

mlflow.models.set_model(E2RankPyfunc())
