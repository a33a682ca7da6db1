"""The reference training loop for isometric regularisation (needs the ``isofast[train]`` extra:
scikit-learn, matplotlib, tqdm).

Modules, one job each: :mod:`.data` (datasets, splits, ``geodesic_fidelity``), :mod:`.models`
(AE / VAE / IRAE / IRVAE), :mod:`.loop` (train / evaluate), :mod:`.checkpoint` (checksummed
checkpoints), :mod:`.distributed` (torchrun / DDP plumbing), :mod:`.cli_train` and
:mod:`.cli_compare` (the commands).
"""

from .data import DataBundle, Split, geodesic_fidelity, load_dataset
from .loop import TrainConfig, evaluate, train, train_step
from .models import IsoAutoencoder, build_model

__all__ = [
    "DataBundle", "IsoAutoencoder", "Split", "TrainConfig", "build_model", "evaluate",
    "geodesic_fidelity", "load_dataset", "train", "train_step",
]
