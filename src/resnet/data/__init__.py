"""Data: CIFAR (official binary release), ImageFolder directories and the embedded digits set, as
memory-resident uint8 arrays or streamed files, with the paper's augmentations and evaluation views.

    ds = load_dataset("cifar10", val_size=5000)
    loader = make_loader(ds.splits["train"], 128, train=True, augment="cifar", mean=ds.mean, std=ds.std)
    for x, y in loader.iter_epoch(epoch): ...

See docs/contracts.md ("Data") for the interface and docs/data.md for the choices made.
"""

from .augment import AugmentConfig
from .dataset import Dataset, MemorySplit, SkippedImageWarning, StreamSplit, load_dataset
from .decode import BadImage, decode_image
from .loader import MemoryLoader, StreamLoader, make_loader
from .sources import default_cache_dir, default_data_dir
from .views import ViewBatch, view_logits

__all__ = [
    "AugmentConfig",
    "BadImage",
    "Dataset",
    "MemoryLoader",
    "MemorySplit",
    "SkippedImageWarning",
    "StreamLoader",
    "StreamSplit",
    "ViewBatch",
    "decode_image",
    "default_cache_dir",
    "default_data_dir",
    "load_dataset",
    "make_loader",
    "view_logits",
]
