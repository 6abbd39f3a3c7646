"""The dataset on disk: OME-Zarr stores (``omezarr``), the manifest (``manifest``) and image statistics
(``stats``). Nothing else knows the layout's paths."""

from unetcore.store import manifest, omezarr, stats
from unetcore.store.manifest import ManifestEntry
from unetcore.store.stats import StreamingStats, fit_normalization, normalize, percentile

__all__ = ["ManifestEntry", "StreamingStats", "fit_normalization", "manifest", "normalize", "omezarr", "percentile",
           "stats"]
