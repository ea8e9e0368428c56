"""tf-influence: influence functions for TensorFlow 2 and Keras 3.

    import tf_influence as tfi
    im = tfi.InfluenceModel(model)
    im.compile(solver="cg", damping=1e-3)
    im.fit(x_train, y_train)
    scores = im.explain(x_test, y_test)   # (n_test, n_train), I_up,loss

``scores[i, j] = -grad L(z_test_i)^T inv(H) grad L(z_j)``: positive means training
example j is harmful to test point i, negative means helpful.
"""

from tf_influence import callbacks, config, distribute, engine, evaluation, solvers
from tf_influence._version import __version__
from tf_influence.influence_model import InfluenceModel
from tf_influence.neighbors import Candidates
from tf_influence.outputs import TopK
from tf_influence.serving import load_served_model
from tf_influence.tracin import TracIn

__all__ = [
    "Candidates",
    "InfluenceModel",
    "TopK",
    "TracIn",
    "__version__",
    "callbacks",
    "config",
    "distribute",
    "engine",
    "evaluation",
    "load_served_model",
    "solvers",
]
