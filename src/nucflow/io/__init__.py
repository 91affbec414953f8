"""Open microscopy stacks lazily as dask arrays; write OME-Zarr images and label images.

Only this package and ``pipeline`` touch disk. Readers never load pixels when opening: they
read metadata, then build a dask array whose tasks open the file *by path* and read only
their region, so the graph pickles and runs on process, LocalCluster and SLURM workers.

Layout: ``source`` (the ``Source`` protocol every format produces), ``formats`` (the registry
``open_stack`` consults), one module per format family (``zarr_format``, ``tiff_format``),
``stack`` (``Stack``, ``open_stack`` and the axis policy), ``writers`` (OME-Zarr output),
``timelapse`` (one time point of a label image with a time axis).
"""

from nucflow.io.formats import Format, input_paths, register_format, supported_formats
from nucflow.io.source import SUPPORTED_DTYPES, ChunkListing, Source
from nucflow.io.stack import Stack, open_stack
from nucflow.io.tiff_format import TiffFormat, TiffSlicesFormat
from nucflow.io.timelapse import TimePoint, clear_timepoint
from nucflow.io.writers import create_label_zarr, image_reference, ome_metadata, write_ome_zarr
from nucflow.io.zarr_format import ZarrFormat

# Tried in this order: the first format that claims a path opens it (a zarr folder may also
# hold .tif files; a folder of slices is what is left).
register_format(ZarrFormat())
register_format(TiffFormat())
register_format(TiffSlicesFormat())

SUPPORTED_FORMATS = supported_formats()

__all__ = [
    "SUPPORTED_DTYPES",
    "SUPPORTED_FORMATS",
    "ChunkListing",
    "Format",
    "Source",
    "Stack",
    "TimePoint",
    "clear_timepoint",
    "create_label_zarr",
    "image_reference",
    "ome_metadata",
    "input_paths",
    "open_stack",
    "register_format",
    "write_ome_zarr",
]
