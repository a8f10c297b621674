"""Data: ImageFolder index, the three views of spec section 5, the batch plan and the loader
that executes it (torch or DALI), demo data."""

from epg_fast.data.index import (
    IMAGE_EXTENSIONS,
    DataError,
    DataRootNotFoundError,
    ImageIndex,
    scan_image_folder,
    scan_labelled_folder,
)
from epg_fast.data.loader import VIEW_SETS, ImageLoader, build_loader
from epg_fast.data.plan import BatchPlan
from epg_fast.data.views import make_views, normalize

__all__ = [
    "IMAGE_EXTENSIONS", "VIEW_SETS", "BatchPlan", "DataError", "DataRootNotFoundError", "ImageIndex",
    "ImageLoader", "build_loader", "ensure_demo_data", "make_views", "normalize", "scan_image_folder",
    "scan_labelled_folder",
]


def __getattr__(name: str):
    # ensure_demo_data is imported on first use: importing epg_fast.data.demo here would make
    # `python -m epg_fast.data.demo` find its own module half-imported (runpy's RuntimeWarning).
    if name == "ensure_demo_data":
        from epg_fast.data.demo import ensure_demo_data

        return ensure_demo_data
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
